"""The page tunnel: real TLS with certificates from a real mesh CA, in front of a loopback server that
stands in for CRIU's page server (it hands out a secret to whoever reaches it). Only the migration's peer
host gets a byte; every refusal has the peer's success on the same tunnel as its positive control."""

import contextlib
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.hostapi import pki
from skyferry.pipeline.memory.pagetunnel import LOOPBACK, Dialled, PageSource, Tunnel, free_loopback_port

SECRET = b"page of a container's memory " * 100


class Secrets:
    """A loopback server that sends SECRET to each connection and echoes what it then receives."""

    def __init__(self) -> None:
        self.listener = socket.create_server((LOOPBACK, 0))
        self.port = self.listener.getsockname()[1]
        self.served = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.served += 1
            with conn, contextlib.suppress(OSError):
                conn.sendall(SECRET)
                while data := conn.recv(4096):
                    conn.sendall(data)


@pytest.fixture(scope="module")
def ids(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pki.Identity]:
    ca = tmp_path_factory.mktemp("ca")
    pki.ensure_ca(ca, "t")
    made = {h: pki.issue(ca, ca / h, h, ["127.0.0.1"], role=pki.HOST) for h in ("src", "dst", "other")}
    # The controller's role under the peer's very name (only a CA bug or a stolen CA key would make one).
    made["controller"] = pki.issue(ca, ca / "ctl", "dst", ["127.0.0.1"], role=pki.CONTROLLER)
    stranger_ca = tmp_path_factory.mktemp("stranger")
    pki.ensure_ca(stranger_ca, "stranger")
    made["stranger"] = pki.issue(stranger_ca, stranger_ca / "dst", "dst", ["127.0.0.1"], role=pki.HOST)
    return made


@pytest.fixture
def tunnel(ids: dict[str, pki.Identity]) -> Iterator[tuple[Tunnel, Secrets]]:
    secrets = Secrets()
    t = Tunnel(ids["src"].server_context(), LOOPBACK, "dst", secrets.port)
    try:
        yield t, secrets
    finally:
        t.close()
        secrets.listener.close()


def _read_all(sock: socket.socket, n: int) -> bytes:
    sock.settimeout(10)
    buf = b""
    while len(buf) < n and (part := sock.recv(n - len(buf))):
        buf += part
    return buf


def _reads(address: str, ctx: ssl.SSLContext) -> bytes:
    """What a TLS client with `ctx` reads from the tunnel (b"" when refused, at the handshake or after)."""
    host, port = address.rsplit(":", 1)
    ctx.check_hostname = False
    try:
        with socket.create_connection((host, int(port)), 10) as raw, ctx.wrap_socket(raw) as tls:
            return _read_all(tls, len(SECRET))
    except (OSError, ssl.SSLError):
        return b""


def test_only_the_peer_host_reads_pages(tunnel: tuple[Tunnel, Secrets], ids: dict[str, pki.Identity]) -> None:
    t, secrets = tunnel
    # Another member of the same mesh, with a valid certificate: refused, not a byte; so is the peer's name
    # in the controller's role.
    assert _reads(t.address, ids["other"].client_context()) == b""
    assert _reads(t.address, ids["controller"].client_context()) == b""
    # No client certificate, and a certificate of another mesh's CA under the peer's very name: no handshake.
    assert _reads(t.address, ssl.create_default_context(cafile=str(ids["dst"].ca))) == b""
    assert _reads(t.address, ids["stranger"].client_context()) == b""
    # Plain TCP speaking the page-server protocol gets nothing either.
    host, port = t.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), 10) as raw:
        raw.sendall(b"\x07\0\0\0\0\0\0\0" + b"\x01" + b"\0" * 23)  # PS_IOV_GET, 1 page
        got = _read_all(raw, len(SECRET))
    assert SECRET[:16] not in got
    assert secrets.served == 0, "nobody but the peer ever reached the page server"
    assert len(t.refused) == 2, t.refused  # the others failed the handshake
    assert "host 'other': not dst" in t.refused[0] and "controller 'dst': role controller" in t.refused[1]
    # Positive control: the peer, through the target's own end, reads the pages and can ask for more.
    link = PageSource(t.address, "src", ids["dst"].client_context()).dial()
    try:
        assert _read_all(link.sock, len(SECRET)) == SECRET
        link.sock.sendall(b"more")
        assert _read_all(link.sock, 4) == b"more"
    finally:
        link.close()
    assert secrets.served == 1
    # The page server serves one client: even the peer does not get a second connection.
    assert _reads(t.address, ids["dst"].client_context()) == b""
    assert secrets.served == 1


def test_the_target_refuses_a_tunnel_that_is_not_the_source(ids: dict[str, pki.Identity]) -> None:
    """A mesh member posing as the source (its own valid certificate) is refused by the target's end, which
    would otherwise take its pages (and tell it which pages the container touches)."""
    secrets = Secrets()
    impostor = Tunnel(ids["other"].server_context(), LOOPBACK, "dst", secrets.port)
    try:
        with pytest.raises(SkyferryError, match="not the source 'src'"):
            Dialled(ids["dst"].client_context(), impostor.address, "src")
    finally:
        impostor.close()
        secrets.listener.close()


def test_ports_are_the_kernels_pick(ids: dict[str, pki.Identity]) -> None:
    """Nothing derived from the migration: the kernel's ephemeral ports, different every time."""
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    tunnels = [Tunnel(ids["src"].server_context(), LOOPBACK, "dst", free_loopback_port()) for _ in range(3)]
    try:
        ports = [int(t.address.rsplit(":", 1)[1]) for t in tunnels]
    finally:
        for t in tunnels:
            t.close()
    assert len(set(ports)) == 3 and all(low <= p <= high for p in ports), ports


def test_a_revoked_peer_is_refused_on_both_ends(ids: dict[str, pki.Identity]) -> None:
    """The agents' revocation check (certs.LiveIdentity.check) applies to the tunnel too; the same peers
    pass when it does not object (the positive control is the first test)."""

    def revoked(tls: object) -> None:
        raise PermissionError("certificate serial 1234 is revoked")

    secrets = Secrets()
    t = Tunnel(ids["src"].server_context(), LOOPBACK, "dst", secrets.port, revoked)
    try:
        assert _reads(t.address, ids["dst"].client_context()) == b""
        assert "revoked" in t.refused[0] and secrets.served == 0
    finally:
        t.close()
    t = Tunnel(ids["src"].server_context(), LOOPBACK, "dst", secrets.port)
    try:
        with pytest.raises(SkyferryError, match="revoked"):
            PageSource(t.address, "src", ids["dst"].client_context(), revoked).dial()
    finally:
        t.close()
        secrets.listener.close()
