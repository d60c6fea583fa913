"""Lazy pages over the agents' mutual TLS: CRIU's page-server protocol is plaintext and unauthenticated,
so neither end of it ever listens where another machine can reach it.

- Source: CRIU's page server listens on loopback, on a port the kernel picks (`free_loopback_port`), and
  `Tunnel` listens on the host's overlay address, on another port the kernel picks. It accepts one TLS
  connection whose client certificate the mesh CA signed for the migration's target host (role host, its
  CN, not revoked), and pipes it to the page server. Connections from anyone else are refused without a byte of memory.
- Target: `connect` opens TLS to the source's tunnel, checks the server's certificate is the migration's
  source host, and hands the proxy (pipeline/memory/lazyproxy.py) a plain socket whose other end the
  tunnel pipes into that TLS connection. The proxy itself listens on loopback for CRIU's lazy-pages daemon.

One thread with an asyncio loop per tunnel: asyncio's TLS transport reads and writes one connection from
one thread, which an `ssl.SSLSocket` shared by the proxy's sender and receiver threads would not.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.hostapi import pki

LOOPBACK = "127.0.0.1"
CHUNK = 1 << 16
Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]
log = logging.getLogger("skyferry.pagetunnel")


def peer_of(obj: ssl.SSLObject | None) -> tuple[str | None, str]:
    """(role, name) of the other end's certificate (already verified against the mesh CA)."""
    der = obj.getpeercert(binary_form=True) if obj is not None else None
    return pki.identify(der) if der else (None, "")


def no_check(_: Any) -> None:
    pass


Check = Callable[[Any], None]


def _refusal(tls: ssl.SSLObject | None, role: str | None, who: str, peer: str, check: Check) -> str | None:
    """Why the other end may not take part (None: it may): it must be host `peer` and not revoked."""
    if role != pki.HOST:
        return f"role {role}, not {pki.HOST}"
    if who != peer:
        return f"not {peer}"
    try:
        check(tls)
    except Exception as exc:  # revocation.PeerRevoked, or a certificate it cannot read
        return str(exc)
    return None


def free_loopback_port() -> int:
    """A loopback port the kernel picks now, for a server (CRIU's page server) that takes a port number,
    not a socket. Unpredictable to others, and reachable only from this host's own network namespace."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, cut_after: int | None = None) -> None:
    """Copy until EOF, or until `cut_after` bytes have passed (a fault drill: the link dies mid-stream)."""
    sent = 0
    try:
        while (cut_after is None or sent < cut_after) and (data := await reader.read(CHUNK)):
            data = data if cut_after is None else data[: cut_after - sent]
            writer.write(data)
            await writer.drain()
            sent += len(data)
    except (OSError, ssl.SSLError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def _splice(a: Stream, b: Stream, b_cut_after: int | None = None) -> None:
    """Both directions until either side hangs up (or `b_cut_after` bytes from b have passed); then both
    are closed."""
    _, pending = await asyncio.wait(
        [asyncio.ensure_future(_pipe(a[0], b[1])), asyncio.ensure_future(_pipe(b[0], a[1], b_cut_after))],
        return_when=asyncio.FIRST_COMPLETED,
    )
    for task in pending:
        task.cancel()
    for _, w in (a, b):
        w.close()


class _Loop:
    """An asyncio loop in a daemon thread, running one coroutine until it ends or `stop()`."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name=name)
        self.thread.start()

    def run(self, coro: Awaitable[Any], timeout: float | None = None) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]

    def spawn(self, coro: Callable[[], Awaitable[Any]]) -> None:
        """Run `coro()` on the loop; the task is kept here, since the loop itself keeps only a weak one."""

        def start() -> None:
            task = self.loop.create_task(coro())  # type: ignore[arg-type]
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

        self.loop.call_soon_threadsafe(start)

    def stop(self) -> None:
        def cancel_all() -> None:
            for task in asyncio.all_tasks(self.loop):
                task.cancel()
            self.loop.call_soon(self.loop.stop)

        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(cancel_all)
            self.thread.join(timeout=5)
        if not self.thread.is_alive():
            self.loop.close()


class Tunnel:
    """The source's end: TLS on (`bind`, a port the kernel picks) for host `peer` only (role host, CN
    `peer`, not revoked: `check` raises for a revoked certificate), piped to the page server on loopback
    port `upstream`. `address` is what the target connects to. `cut_after` (fault drills only): hang up
    after that many bytes of pages, as a lost source would."""

    def __init__(
        self, ctx: ssl.SSLContext, bind: str, peer: str, upstream: int, check: Check = no_check,
        cut_after: int | None = None,
    ) -> None:  # fmt: skip
        self.peer, self.upstream, self.check, self.cut_after = peer, upstream, check, cut_after
        self.refused: list[str] = []  # who tried and was not the peer (for the log and the tests)
        self.served = False
        self._loop = _Loop("pagetunnel")
        try:
            self._server = self._loop.run(asyncio.start_server(self._client, bind, 0, ssl=ctx, backlog=8), 10)
        except BaseException:
            self._loop.stop()
            raise
        host, port = self._server.sockets[0].getsockname()[:2]
        self.address = f"{host}:{port}"

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tls = writer.get_extra_info("ssl_object")
        role, who = peer_of(tls)
        why = _refusal(tls, role, who, self.peer, self.check) or ("served already" if self.served else None)
        if why:
            self.refused.append(f"{writer.get_extra_info('peername')} ({role} {who!r}: {why})")
            log.warning("page tunnel: refused %s: only host %s may fetch these pages", self.refused[-1], self.peer)
            writer.close()
            return
        self.served = True  # CRIU's page server serves one client; nobody else gets a second go
        try:
            up = await asyncio.open_connection(LOOPBACK, self.upstream)
        except OSError as exc:
            log.warning("page tunnel: the page server on port %d is gone: %s", self.upstream, exc)
            writer.close()
            return
        await _splice((reader, writer), up, self.cut_after)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._server.close()
        self._loop.stop()


class Dialled:
    """The target's end: `sock` is a plain socket for the proxy; a thread pipes it through TLS to the
    source's tunnel. `close()` stops the pipe."""

    def __init__(self, ctx: ssl.SSLContext, address: str, peer: str, check: Check = no_check) -> None:
        host, port = address.rsplit(":", 1)
        self.sock, inner = socket.socketpair()
        self._loop = _Loop("pagetunnel-dial")
        try:
            self._loop.run(self._open(ctx, host, int(port), peer, check, inner), 10.0)
        except BaseException as exc:
            self.close()
            inner.close()
            if isinstance(exc, SkyferryError):
                raise
            raise SkyferryError(
                f"lazy restore: cannot reach the source's page tunnel at {address}: {exc}",
                hint="the source's lazy dump is gone; the migration rolls back",
            ) from None

    async def _open(
        self, ctx: ssl.SSLContext, host: str, port: int, peer: str, check: Check, inner: socket.socket
    ) -> None:
        # Beyond the address (its SAN, checked by the context): role host, the CN of the migration's source.
        reader, writer = await asyncio.open_connection(host, port, ssl=ctx, server_hostname=host)
        tls = writer.get_extra_info("ssl_object")
        role, who = peer_of(tls)
        why = _refusal(tls, role, who, peer, check)
        if why:
            writer.close()
            raise SkyferryError(f"lazy restore: the page tunnel at {host}:{port} is {role} {who!r}, not the "
                                f"source {peer!r} ({why})")  # fmt: skip
        local = await asyncio.open_connection(sock=inner)
        self._loop.spawn(lambda: _splice((reader, writer), local))

    def close(self) -> None:
        self._loop.stop()
        with contextlib.suppress(OSError):
            self.sock.close()


@dataclass(frozen=True)
class PageSource:
    """Where the target fetches lazy pages: the source's tunnel at `address`, which must present the
    certificate of host `peer`; `ctx` is this agent's client context (its own certificate for the tunnel)."""

    address: str
    peer: str
    ctx: ssl.SSLContext
    check: Check = no_check  # raises for a revoked certificate (certs.LiveIdentity.check)

    def dial(self) -> Dialled:
        return Dialled(self.ctx, self.address, self.peer, self.check)

    def dial_soon(self) -> Future[Dialled]:
        """`dial` in a thread of its own, from now on: the target dials while the images still arrive."""
        dialled: Future[Dialled] = Future()

        def run() -> None:
            try:
                dialled.set_result(self.dial())
            except BaseException as exc:
                dialled.set_exception(exc)

        threading.Thread(target=run, daemon=True, name="pagetunnel-dial-soon").start()
        return dialled
