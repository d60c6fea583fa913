"""The holdback captures the TCP segments a locked netns drops, for its own address only, and replays them
into the netns when it opens. Real namespaces, a veth pair and nftables (the agent's own lock)."""

import os
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest
from skyferry.netplane.netns import in_netns
from skyferry.pipeline.agent import netlock
from skyferry.pipeline.agent.holdback import Holdback

PREFIX = f"sfhb{os.getpid()}"
CLIENT, CONTAINER = f"{PREFIX}-c", f"{PREFIX}-k"
OURS, OTHER, CLIENT_IP = "10.250.7.2", "10.250.7.3", "10.250.7.1"

pytestmark = [pytest.mark.integration, pytest.mark.skipif(os.geteuid() != 0, reason="needs root (netns)")]


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def pair() -> Iterator[None]:
    """A client netns and a container netns whose eth0 holds OURS and OTHER, joined by a veth."""
    try:
        ip("netns", "add", CLIENT)
        ip("netns", "add", CONTAINER)
        ip("link", "add", "eth0", "netns", CONTAINER, "type", "veth", "peer", "name", "eth0", "netns", CLIENT)
        for ns, addrs in ((CLIENT, [CLIENT_IP]), (CONTAINER, [OURS, OTHER])):
            for addr in addrs:
                ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
            ip("-n", ns, "link", "set", "lo", "up")
        yield
    finally:
        for ns in (CLIENT, CONTAINER):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def syn_to(address: str, port: int) -> socket.socket:
    """A client's connection attempt (its SYN goes out at once; the socket keeps retrying)."""
    with in_netns(CLIENT):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setblocking(False)
    s.connect_ex((address, port))
    return s


def wait_for(predicate: object, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return False


def test_the_segments_a_locked_netns_drops_are_held_for_its_own_address_and_replayed(pair: None) -> None:
    netlock.lock(CONTAINER, inbound_only=True)
    held = Holdback(CONTAINER, OURS)
    clients = [syn_to(OTHER, 9000), syn_to(OURS, 9000)]  # the other address's first: held would show it
    try:
        assert wait_for(lambda: held.snapshot()), "no segment held"
        segments = held.snapshot()
        assert all(s[16:20] == socket.inet_aton(OURS) for s in segments), segments  # OTHER's SYN is not held
        assert any(s[33] & 0x02 for s in segments), segments  # the client's SYN (flags byte of a 20-byte IP header)
        # Opened: the server listens, and the replayed SYN reaches it without waiting for the client's retry.
        with in_netns(CONTAINER):
            server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        with server:
            server.bind((OURS, 9000))
            server.listen()
            netlock.unlock(CONTAINER)
            replayed = held.replay()
            assert replayed >= 1
            server.settimeout(5)
            conn, peer = server.accept()
            conn.close()
            assert peer[0] == CLIENT_IP
    finally:
        held.close()
        for c in clients:
            c.close()
