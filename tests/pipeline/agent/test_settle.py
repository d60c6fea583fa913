"""The source's wait before a pause for the container's replies to land (pipeline/agent/settle.py), on two
real network namespaces joined by a veth pair: a reply whose peer cannot acknowledge it is in flight, and
the wait lasts its bound (the positive control); once the peer can, the wait ends at its acknowledgement."""

import array
import fcntl
import os
import socket
import subprocess
import termios
import uuid
from collections.abc import Iterator

import pytest
from skyferry.netplane.netns import in_netns
from skyferry.pipeline.agent import settle

pytestmark = [pytest.mark.integration, pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def deaf(netns: str, on: bool) -> None:
    """The client's netns drops (or again takes) everything it receives: a reply sent meanwhile stays
    unacknowledged, and its retransmission too."""
    rules = "table inet deaf { chain input { type filter hook input priority 0; policy drop; }; }"
    script = rules if on else "delete table inet deaf"
    subprocess.run(["ip", "netns", "exec", netns, "nft", "-f", "-"], input=script, text=True, check=True,
                   capture_output=True)  # fmt: skip


def unacked(sock: socket.socket) -> int:
    """Bytes in `sock`'s send queue its peer has not acknowledged (SIOCOUTQ): the kernel's own count."""
    out = array.array("i", [0])
    fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, out)
    return out[0]


@pytest.fixture
def pair() -> Iterator[tuple[str, str]]:
    """Namespaces `server` (10.99.0.1) and `client` (10.99.0.2), joined by a veth pair."""
    tag = uuid.uuid4().hex[:6]
    server, client, far = f"st{tag}s", f"st{tag}c", f"st{tag}b"
    ip("netns", "add", server)
    ip("netns", "add", client)
    try:
        ip("link", "add", f"st{tag}a", "netns", server, "type", "veth", "peer", "name", far, "netns", client)
        for ns, dev, addr in ((server, f"st{tag}a", "10.99.0.1/24"), (client, far, "10.99.0.2/24")):
            ip("-n", ns, "addr", "add", addr, "dev", dev)
            ip("-n", ns, "link", "set", dev, "up")
            ip("-n", ns, "link", "set", "lo", "up")
        yield server, client
    finally:
        ip("netns", "del", server)
        ip("netns", "del", client)


def test_settle_waits_for_a_reply_in_flight_until_it_is_acknowledged(pair: tuple[str, str]) -> None:
    server_ns, client_ns = pair
    with in_netns(server_ns):
        listener = socket.create_server(("10.99.0.1", 0))
    with in_netns(client_ns):
        client = socket.create_connection(listener.getsockname(), timeout=5)
    served, _ = listener.accept()
    try:
        assert unacked(served) == 0 and settle.settle(server_ns) < settle.POLL_S * 5  # idle: at once
        deaf(client_ns, True)
        served.sendall(b"reply")
        assert unacked(served) == len(b"reply")
        assert settle.settle(server_ns, bound=0.3) >= 0.3, "a reply in flight: the wait lasts its bound"
        deaf(client_ns, False)
        waited = settle.settle(server_ns, bound=5.0)
        assert waited < 5.0 and unacked(served) == 0, "acknowledged: the wait ends"
        assert client.recv(5) == b"reply"
    finally:
        for s in (client, served, listener):
            s.close()
