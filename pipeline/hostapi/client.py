"""Talking to a host agent: HTTPS with the caller's mesh certificate, from a chosen network namespace."""

import http.client
import json
import select
import socket
import ssl
import struct
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from skyferry.netplane.netns import in_netns
from skyferry.netplane.wg import SO_RCVBUFFORCE, SO_SNDBUFFORCE
from skyferry.pipeline.errors import CARRIED, SkyferryError
from tenacity import retry, retry_if_exception, stop_after_delay, wait_exponential

CONNECT_TIMEOUT = 10.0
CALL_TIMEOUT = 900.0  # a checkpoint or stream of a large container takes minutes on a slow link
STALL_TIMEOUT = 30  # seconds a peer may leave our data unacknowledged, or keepalives unanswered
# 1 Gbit/s between clouds (30-100 ms) has a bandwidth-delay product of 4-12 MB. Asked with SO_SNDBUF or
# SO_RCVBUF, a buffer is capped at net.core.wmem_max / rmem_max: 208 KiB on a stock Debian 12 host (Linux 6.1),
# about 100 Mbit/s at 30 ms; newer kernels (this machine's 6.18) cap at 4 MiB. Root may ask past the cap.
STREAM_BUFFER = 8 << 20  # bytes asked for each agent connection's buffers; the kernel doubles it


def bound_stalls(sock: socket.socket) -> None:
    """Give up a connection whose peer stopped answering after STALL_TIMEOUT, not TCP's ~15 minutes: a cut
    link then fails the stage (and the migration rolls back) instead of hanging it. A peer that is merely
    busy (a long checkpoint) still answers keepalives in its kernel, so it is never cut off."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 4)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, STALL_TIMEOUT * 1000)


def size_buffers(sock: socket.socket, size: int = STREAM_BUFFER) -> None:
    """Give `sock` send and receive buffers of `size` past the host's caps if allowed (CAP_NET_ADMIN), else
    as large as the caps let. A fixed size also stops autotuning, which could not grow past tcp_wmem and
    tcp_rmem's maximum (4 and 6 MiB on Debian 12). A listening socket passes them to what it accepts."""
    for force, plain in ((SO_SNDBUFFORCE, socket.SO_SNDBUF), (SO_RCVBUFFORCE, socket.SO_RCVBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, size)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, plain, size)


# A connection whose sends waited on a closed receive window may keep the kernel's clock of that wait
# (icsk_probes_tstamp: reset only if the window reopens wide enough for the whole next segment). With
# TCP_USER_TIMEOUT set, its next wait, STALL_TIMEOUT or more later, then aborts it at the first window probe:
# ETIMEDOUT at once, no packet on the wire (docs/precopy.md). The first probe comes after TCP_RTO_MIN.
HELD_BACK_S = 0.2
_TCPI_RWND_LIMITED = 176  # struct tcp_info: tcpi_rwnd_limited, microseconds (Linux 4.10+)

NOTSENT_LOWAT = 1 << 20  # bytes a socket may hold that it has not sent yet
SEND_BATCH = 64 << 10  # bytes per piece of an upload: each piece is one TLS write and one send(2)
STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)  # a kept-alive one the agent closed
Check = Callable[[ssl.SSLSocket], None]  # sees the peer after the handshake; raises ssl.SSLError to refuse it


class _Connection(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, context: ssl.SSLContext, netns: str | None, check: Check | None) -> None:
        super().__init__(host, port, context=context, timeout=CALL_TIMEOUT)
        self.netns = netns
        self.check = check

    def connect(self) -> None:
        with in_netns(self.netns):
            sock = socket.create_connection((self.host, self.port), CONNECT_TIMEOUT)
        sock.settimeout(CALL_TIMEOUT)
        bound_stalls(sock)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Large buffers, but little of them unsent: a round that stops to let a freeze through
        # (agent/bulk.py) stops the wire within ms.
        size_buffers(sock)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, NOTSENT_LOWAT)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]
        if self.check is not None:
            try:
                self.check(self.sock)
            except ssl.SSLError:
                self.sock.close()
                raise


def _open(sock: ssl.SSLSocket) -> bool:
    """Whether an idle connection is still open. Readable while idle is EOF or an alert, or only the
    session tickets a TLS 1.3 server sends after the handshake (a connection opened ahead of its first
    request, `connect`): reading them without blocking tells the two apart."""
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return True
    timeout = sock.gettimeout()
    sock.settimeout(0)
    try:
        sock.recv(1)  # b"": closed; any data: out of step with the agent. Neither can be reused.
        return False
    except ssl.SSLWantReadError:
        return True  # TLS records only, now consumed
    except OSError:
        return False
    finally:
        sock.settimeout(timeout)


class AgentUnreachable(SkyferryError):
    def __init__(self, message: str, hint: str | None = None, host: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.host = host  # the agent's label (its host's name)


def _transient(exc: BaseException) -> bool:
    # A refused certificate will not fix itself; a refused or timed-out connection may.
    return isinstance(exc, OSError) and not isinstance(exc, ssl.SSLError)


class AgentClient:
    """One agent, over one kept-alive connection (a TLS handshake per call would add round trips to
    every stage, and several stages run inside the freeze). Calls are retried only while the connection
    cannot be made (bounded by tenacity); a request that reached the agent is never repeated. `check`
    refuses an agent whose certificate the CA signed but the controller revoked (hostapi/revocation.py)."""

    def __init__(
        self,
        address: str,
        port: int,
        context: ssl.SSLContext,
        netns: str | None = None,
        label: str | None = None,
        check: Check | None = None,
    ) -> None:
        self.address, self.port, self.context, self.netns = address, port, context, netns
        self.label = label or address
        self.check = check
        self._conn: _Connection | None = None
        self._lock = threading.Lock()  # one request at a time on the shared connection

    def call(
        self, method: str, path: str, body: Any = None, retry_for: float = 5.0, timeout: float | None = None
    ) -> Any:
        """`timeout`: how long the answer may take, for a call that outlasts CALL_TIMEOUT by design."""
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        return self._request(method, path, data, headers, retry_for, timeout=timeout)

    def upload(self, path: str, chunks: Iterable[bytes]) -> Any:
        """PUT a stream with chunked encoding (size unknown up front)."""
        pieces = _batched(chunks)
        return self._request("PUT", path, pieces, {"Content-Type": "application/octet-stream"}, 5.0, chunked=True)

    def connect(self, retry_for: float = 2.0) -> None:
        """Open (or keep) the connection now, so a later call inside a freeze pays no handshake."""
        with self._lock:
            self._reusable(retry_for)

    def peer_certificate(self, retry_for: float = 2.0) -> bytes:
        """The certificate (DER) the agent showed on the kept-alive connection, opened if need be."""
        with self._lock:
            sock = self._reusable(retry_for).sock
            return sock.getpeercert(binary_form=True) or b""

    def recheck(self) -> None:
        """Check the open connection's peer again (a connection kept across migrations may predate a
        revocation); one that fails is closed, and the next call opens and checks a new one."""
        with self._lock:
            conn = self._conn
            if self.check is None or conn is None or conn.sock is None:
                return
            try:
                self.check(conn.sock)
            except ssl.SSLError:
                self.close()

    def drop_if_held_back(self) -> float | None:
        """Close the connection if the agent's receive window held its sends back HELD_BACK_S or more since
        it opened: its next wait on the window could abort it (see HELD_BACK_S), and the next call opens a
        new one. Returns the seconds it was held back, if it closed it."""
        with self._lock:
            conn = self._conn
            if conn is None or conn.sock is None:
                return None
            info = conn.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCPI_RWND_LIMITED + 8)
            held = float(struct.unpack_from("=Q", info, _TCPI_RWND_LIMITED)[0]) / 1e6
            if held < HELD_BACK_S:
                return None
            self.close()
            return held

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _reusable(self, retry_for: float) -> _Connection:
        """The kept-alive connection, unless the agent closed it while idle."""
        conn = self._conn
        if conn is not None and conn.sock is not None and _open(conn.sock):
            return conn
        self.close()
        self._conn = self._connect(retry_for)
        return self._conn

    def _request(
        self,
        method: str,
        path: str,
        body: Any,
        headers: dict[str, str],
        retry_for: float,
        chunked: bool = False,
        timeout: float | None = None,
        again: bool = True,
    ) -> Any:
        with self._lock:
            kept = self._conn
            conn = self._reusable(retry_for)
            send_error: OSError | None = None
            conn.sock.settimeout(timeout or CALL_TIMEOUT)  # each call its own; the kept-alive socket goes on
            try:
                try:
                    conn.request(method, path, body=body, headers=headers, encode_chunked=chunked)
                except OSError as exc:
                    if not chunked:
                        raise
                    # An agent that refuses a stream part-way (a damaged frame) answers and hangs up while we
                    # are still sending: its answer, not our broken pipe, says what went wrong.
                    send_error = exc
                except BaseException:
                    # The body's producer failed part-way (a dump, a read): hang up, so that the agent sees a
                    # truncated stream and lets go, instead of waiting on this kept-alive connection for more.
                    self.close()
                    raise
                resp = conn.getresponse()
                payload = resp.read()
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                lost = send_error or exc
                if not (again and method == "GET" and conn is kept and isinstance(exc, STALE)):
                    raise AgentUnreachable(
                        f"agent {self.label}: connection lost during {method} {path}: {lost}", host=self.label
                    ) from lost
                resp = None
            if resp is not None and (resp.will_close or send_error is not None):
                self.close()
        if resp is None:
            # The agent closed the kept-alive connection (it restarted) just before we asked: a GET changes
            # nothing, so it is asked once more on a new connection, as HTTP clients do with pooled ones.
            return self._request(method, path, body, headers, retry_for, chunked, timeout, again=False)
        if not (resp.getheader("Content-Type") or "").startswith("application/json"):
            return payload  # raw bytes (logs, the metrics' text); every error is JSON
        result = json.loads(payload or b"null")
        if resp.status >= 400:
            error = result.get("error", "?") if isinstance(result, dict) else str(result)
            hint, log = (result.get("hint"), result.get("log")) if isinstance(result, dict) else (None, None)
            kind = CARRIED.get(result.get("restore", "")) if isinstance(result, dict) else None
            raise (kind or SkyferryError)(f"{self.label}: {error}", hint=hint, log=log)
        return result

    def _connect(self, retry_for: float) -> _Connection:
        @retry(
            retry=retry_if_exception(_transient),
            stop=stop_after_delay(retry_for),
            wait=wait_exponential(multiplier=0.05, max=1.0),
            reraise=True,
        )
        def attempt() -> _Connection:
            conn = _Connection(self.address, self.port, self.context, self.netns, self.check)
            conn.connect()
            return conn

        try:
            return attempt()
        except ssl.SSLError as exc:
            raise AgentUnreachable(
                f"agent {self.label} refused our certificate or we refused its: {exc}", host=self.label
            ) from exc
        except OSError as exc:
            raise AgentUnreachable(
                f"agent {self.label} ({self.address}:{self.port}) is unreachable: {exc}",
                hint="is the host up? `skyferry hosts ls`; the agent log is in the host's state root",
                host=self.label,
            ) from exc


def _batched(chunks: Iterable[bytes], size: int = SEND_BATCH) -> Iterator[bytes]:
    """`chunks` joined into pieces of at least `size` bytes (the last one shorter): a tiny container's
    final delta is two dozen frames of a few hundred bytes, one image file each, which went out as two
    dozen TLS writes and sends inside the freeze. Every stream is made from local data (images, files,
    memory), so waiting for a piece to fill only waits for the CPU."""
    held: list[bytes] = []
    size_held = 0
    for chunk in chunks:
        held.append(chunk)
        size_held += len(chunk)
        if size_held >= size:
            yield b"".join(held)
            held, size_held = [], 0
    if held:
        yield b"".join(held)
