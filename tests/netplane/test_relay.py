"""The WAN delay relay on its own: forwards between exactly two endpoints, each way, after the delay."""

import os
import socket
import time
from collections.abc import Iterator

import pytest
from skyferry.netplane import netns, wan, wg
from skyferry.netplane.netns import in_netns

pytestmark = [pytest.mark.integration, pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]
A, B, STRANGER = ("127.0.0.2", 6000), ("127.0.0.3", 7000), ("127.0.0.4", 8000)


@pytest.fixture
def relay_ns(run_id: str) -> Iterator[tuple[str, int]]:
    ns = f"{run_id}-relay"
    netns.create(ns)
    pid = None
    try:
        pid = wan.start_relay(run_id, ns, {40000: (f"{A[0]}:{A[1]}", f"{B[0]}:{B[1]}")}, "127.0.0.1", 0.02)
        yield ns, pid
    finally:
        wg.stop_process(pid, wan.RELAY_MARKER)
        netns.remove(ns)


def _sock(ns: str, addr: tuple[str, int]) -> socket.socket:
    with in_netns(ns):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(addr)
    s.settimeout(2)
    return s


def test_relay_delays_and_forwards_by_source(relay_ns: tuple[str, int]) -> None:
    ns, pid = relay_ns
    a, b, stranger = _sock(ns, A), _sock(ns, B), _sock(ns, STRANGER)
    with a, b, stranger:
        delays = []
        for i in range(10):
            sent = time.monotonic()
            a.sendto(f"a{i}".encode(), ("127.0.0.1", 40000))
            data, src = b.recvfrom(100)
            delays.append(time.monotonic() - sent)
            assert (data, src) == (f"a{i}".encode(), ("127.0.0.1", 40000))  # B sees the relay as the peer
        b.sendto(b"back", ("127.0.0.1", 40000))
        assert a.recvfrom(100) == (b"back", ("127.0.0.1", 40000))
        stranger.sendto(b"spoof", ("127.0.0.1", 40000))
        a.settimeout(0.3)
        b.settimeout(0.3)
        for s in (a, b):
            with pytest.raises(TimeoutError):
                s.recvfrom(100)
    assert min(delays) >= 0.02
    assert sorted(delays)[5] < 0.022  # median within 10% of the one-way delay
    assert wg.process_matches(pid, wan.RELAY_MARKER)
