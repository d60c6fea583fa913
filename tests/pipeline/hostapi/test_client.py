"""The agent client's stream uploads, against a real mutual-TLS listener on loopback."""

import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from cryptography import x509
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.hostapi import pki
from skyferry.pipeline.hostapi.client import (
    HELD_BACK_S,
    SEND_BATCH,
    STREAM_BUFFER,
    AgentClient,
    AgentUnreachable,
    _batched,
    size_buffers,
)
from skyferry.pipeline.hostapi.revocation import checker, serial
from skyferry.pipeline.hostapi.tlsserver import TLSServer


def test_a_body_that_fails_part_way_hangs_up(tmp_path: Path) -> None:
    """When the producer of a streamed body raises after some chunks went out, the client must close the
    connection: the agent then reads a truncated stream and lets go of the container's lock. Kept open,
    the agent would wait for the next chunk for as long as the connection lives (found in the soft-dirty
    VM test: the rollback's abort on the target hung behind it)."""
    pki.ensure_ca(tmp_path / "ca", "t")
    ca = tmp_path / "ca"
    server = pki.issue(ca, tmp_path / "server", "server", ["127.0.0.1"], role=pki.HOST).server_context()
    client_ctx = pki.issue(ca, tmp_path / "client", "client", ["127.0.0.1"], role=pki.HOST).client_context()
    listener = socket.create_server(("127.0.0.1", 0))
    seen: dict[str, bytes | bool] = {}

    def serve() -> None:
        conn, _ = listener.accept()
        with server.wrap_socket(conn, server_side=True) as tls:
            tls.settimeout(10)
            data = b""
            try:
                while chunk := tls.recv(65536):
                    data += chunk
                seen["eof"] = True
            except (TimeoutError, OSError):
                seen["eof"] = False
            seen["data"] = data

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()

    def body() -> Iterator[bytes]:
        yield b"first chunk" * (SEND_BATCH // 11 + 1)  # a whole piece: it goes out before the failure
        raise SkyferryError("the dump failed")

    client = AgentClient("127.0.0.1", listener.getsockname()[1], client_ctx)
    with pytest.raises(SkyferryError, match="the dump failed"):
        client.upload("/v1/migrations/m/precopy-round?name=c", body())
    thread.join(15)
    listener.close()
    assert seen["eof"] is True, "the client left the half-sent stream open"
    assert b"first chunk" in seen["data"] and seen["data"].startswith(b"PUT /v1/migrations/m/precopy-round")


def test_small_frames_go_out_in_pieces_of_a_batch() -> None:
    """A tiny container's final delta is two dozen small frames: joined, they cost one TLS record and one
    send, not one each. Nothing is lost, reordered or held back at the end; a large frame goes as it is."""
    small = [bytes([i % 256]) * 300 for i in range(500)]  # 150 kB in 300-byte frames
    pieces = list(_batched(small))
    assert b"".join(pieces) == b"".join(small)
    assert [len(p) >= SEND_BATCH for p in pieces] == [True] * (len(pieces) - 1) + [False]
    assert len(pieces) == 3
    big = b"x" * (2 * SEND_BATCH)
    assert list(_batched([big])) == [big] and list(_batched([])) == []


@dataclass
class Listener:
    """A mutual-TLS HTTP listener on loopback that answers `{}` and counts the connections it accepted."""

    port: int
    client_ctx: ssl.SSLContext
    server_cert: Path
    accepted: list[int]


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[Listener]:
    pki.ensure_ca(tmp_path / "ca", "t")
    ca = tmp_path / "ca"
    server_ident = pki.issue(ca, tmp_path / "server", "server", ["127.0.0.1"], role=pki.HOST)
    server = server_ident.server_context()
    client_ctx = pki.issue(ca, tmp_path / "client", "client", ["127.0.0.1"], role=pki.HOST).client_context()
    sock = socket.create_server(("127.0.0.1", 0))
    accepted: list[int] = []
    reply = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"

    def serve() -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            accepted.append(1)
            with server.wrap_socket(conn, server_side=True) as tls:
                tls.settimeout(5)
                try:
                    while request := _request(tls):
                        if b"close-after" in request:
                            tls.sendall(reply.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
                            break
                        tls.sendall(reply)
                except OSError:
                    pass

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield Listener(sock.getsockname()[1], client_ctx, server_ident.cert, accepted)
    finally:
        sock.close()


def test_a_connection_opened_ahead_is_used_not_reopened(listener: Listener) -> None:
    """`connect()` opens the connection a call inside a freeze will use (the hold lane, the cutover's
    pushes). A TLS 1.3 server sends session tickets after the handshake, which make the idle socket
    readable: taken for a closed connection, the call paid a second handshake (60 ms across the demo's
    WAN). The listener counts connections; one the agent closed is reopened (the positive control)."""
    accepted = listener.accepted
    client = AgentClient("127.0.0.1", listener.port, listener.client_ctx)
    try:
        client.connect()
        time.sleep(0.2)  # the tickets arrive
        assert client.call("POST", "/v1/migrations/m/hold", {"name": "c", "packets": []}) == {}
        assert client.call("POST", "/v1/migrations/m/hold", {"name": "c", "packets": []}) == {}
        assert len(accepted) == 1, "the connection opened ahead was dropped and reopened"
        client.call("POST", "/v1/migrations/m/close-after", {})
        assert client.call("POST", "/v1/migrations/m/hold", {"name": "c", "packets": []}) == {}
        assert len(accepted) == 2, "a connection the agent closed must be reopened"
    finally:
        client.close()


def test_a_kept_connection_to_a_peer_revoked_since_is_dropped_at_recheck(listener: Listener) -> None:
    """An agent keeps its first rounds' connection to a target across migrations (agent/server.py,
    `_bulk_client`), so it may predate that target's revocation: `recheck` checks it again before use."""
    revoked: set[str] = set()
    client = AgentClient("127.0.0.1", listener.port, listener.client_ctx, check=checker(lambda: revoked))
    try:
        client.connect()
        client.recheck()
        assert client.call("GET", "/v1/facts") == {} and len(listener.accepted) == 1  # control: still trusted
        revoked.add(serial(x509.load_pem_x509_certificate(listener.server_cert.read_bytes())))
        client.recheck()
        with pytest.raises(SkyferryError, match="revoked"):
            client.call("GET", "/v1/facts", retry_for=0.2)
        assert len(listener.accepted) == 2, "the kept connection was dropped, and a new one refused"
    finally:
        client.close()


def _request(tls: socket.socket) -> bytes:
    """One whole HTTP request (headers, then Content-Length bytes of body, or a chunked upload's chunks up to
    the last: an upload of zeros, whose data never holds the terminator); b"" once the client hung up. A path
    with "stall" in it is read a second late, as by an agent whose receive window stays shut meanwhile."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = tls.recv(65536)
        if not chunk:
            return b""
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    if b"stall" in head.partition(b"\r\n")[0]:
        time.sleep(1.0)
    if b"transfer-encoding: chunked" in head.lower():
        while not body.endswith(b"\r\n0\r\n\r\n"):
            if not (chunk := tls.recv(1 << 20)):
                return b""  # the client hung up mid-upload: not a spin on recv's b"" forever
            body = body[-16:] + chunk
        return data
    length = next(
        (int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")), 0
    )
    while len(body) < length:
        body += tls.recv(65536)
    return data


def test_a_get_on_a_connection_the_agent_just_closed_is_asked_again(tmp_path: Path) -> None:
    """An agent that restarts closes its kept-alive connections; one that goes while our request is on its
    way fails that request. A GET changes nothing and is asked once more on a new connection (the rollback
    of a migration whose target agent restarted needs its answer); a POST is not repeated (the control)."""
    pki.ensure_ca(tmp_path / "ca", "t")
    ca = tmp_path / "ca"
    server = pki.issue(ca, tmp_path / "server", "server", ["127.0.0.1"], role=pki.HOST).server_context()
    client_ctx = pki.issue(ca, tmp_path / "client", "client", ["127.0.0.1"], role=pki.HOST).client_context()
    listener = socket.create_server(("127.0.0.1", 0))
    reply = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"

    def serve() -> None:  # each connection answers one request, then drops the next one unanswered
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with server.wrap_socket(conn, server_side=True) as tls:
                tls.settimeout(5)
                try:
                    if _request(tls):
                        tls.sendall(reply)
                    _request(tls)
                except OSError:
                    pass

    threading.Thread(target=serve, daemon=True).start()
    client = AgentClient("127.0.0.1", listener.getsockname()[1], client_ctx)
    try:
        assert client.call("GET", "/v1/containers") == {}
        assert client.call("GET", "/v1/containers") == {}, "the GET was not asked again"
        with pytest.raises(AgentUnreachable, match="connection lost during POST"):
            client.call("POST", "/v1/migrations/m/abort", {"name": "c"})
    finally:
        client.close()
        listener.close()


def test_agent_sockets_get_stream_buffers_past_the_hosts_cap(tmp_path: Path) -> None:
    """SO_SNDBUF and SO_RCVBUF are capped at net.core.wmem_max / rmem_max: 208 KiB on a stock Debian 12
    host, about 100 Mbit/s across a 30 ms WAN. The agent's listener, and what it accepts, get their buffers
    past the cap. Positive control: asked the plain way for twice the cap, a socket gets the cap."""
    cap = int(Path("/proc/sys/net/core/rmem_max").read_text())
    with socket.socket() as plain:
        plain.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2 * cap)
        assert plain.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == 2 * cap  # the kernel doubles it
    with socket.socket() as sized:
        size_buffers(sized, 2 * cap)
        assert sized.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == 4 * cap
        assert sized.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == 4 * cap

    pki.ensure_ca(tmp_path / "ca", "t")
    ctx = pki.issue(tmp_path / "ca", tmp_path / "server", "server", ["127.0.0.1"], role=pki.HOST).server_context()
    server = TLSServer(("127.0.0.1", 0), BaseHTTPRequestHandler, ctx)
    try:
        with socket.create_connection(server.server_address[:2]):
            accepted, _ = server.get_request()
            with accepted:
                for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                    assert accepted.getsockopt(socket.SOL_SOCKET, option) == 2 * STREAM_BUFFER
    finally:
        server.server_close()


def test_a_connection_the_agent_held_back_is_reopened_not_kept(listener: Listener) -> None:
    """A connection whose sends waited HELD_BACK_S or more on the agent's closed receive window is closed, so
    the next call opens a new one: Linux keeps the clock of that wait, and the connection's next wait,
    STALL_TIMEOUT later, would abort it at once (hostapi/client.py). Positive control: one read at once is
    kept."""
    client = AgentClient("127.0.0.1", listener.port, listener.client_ctx)
    body = [bytes(1 << 20)] * 16
    try:
        assert client.upload("/v1/migrations/m/precopy-round", body) == {}
        assert client.drop_if_held_back() is None, "read at once, it is kept"
        assert client.upload("/v1/migrations/m/stall", body) == {}
        held = client.drop_if_held_back()
        assert held is not None and held >= HELD_BACK_S
        assert client.upload("/v1/migrations/m/precopy-round", body) == {}
        assert len(listener.accepted) == 2, "the held-back connection was closed, and the next upload opened a new one"
    finally:
        client.close()
