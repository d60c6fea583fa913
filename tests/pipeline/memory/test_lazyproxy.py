"""The target's page-server proxy, between a client speaking CRIU's lazy-pages protocol and a source page
server that answers the way criu/page-xfer.c does (GET answered by ADD_F with at most the pages asked
for, clamped at the end of an iov; CLOSE answered by a 4-byte status). Both ends here are small sockets
written from CRIU's source: the real daemon and dump are exercised end to end in tests/test_hybrid.py.
These cover what those runs rarely hit: short answers, faults ahead of the prefetch, a source that
vanishes.
"""

import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from skyferry.pipeline.criu import memimage
from skyferry.pipeline.memory.lazyproxy import ADD_PRESENT, PS_IOV_CLOSE, PS_IOV_GET, PSI, LazyProxy
from skyferry.pipeline.memory.pages import HashTable
from skyferry.pipeline.memory.store import TargetStore

VPID = 1
BASE = 0x7F0000000  # page number of the first lazy page (vaddr 0x7f0000000000)
PAGES = 64
IOV_PAGES = 5  # the source clamps every answer at a multiple of this, like an iov end
PAGE = 4096


def page(vpn: int, version: int) -> bytes:
    return struct.pack("<QQ", vpn, version) * (PAGE // 16)


class FakeSource:
    """A source page server: pages at version 2 (the store holds version 1 of the clean ones)."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.asked: list[tuple[int, int]] = []
        self.closed = threading.Event()
        self.die_after: int | None = None
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            while True:
                head = _recv(conn, PSI.size)
                if not head:
                    return
                cmd, nr, vaddr, vpid = PSI.unpack(head)
                if cmd == PS_IOV_CLOSE:
                    conn.sendall(struct.pack("<i", 0))
                    self.closed.set()
                    _recv(conn, 1)  # CRIU waits for the client to hang up
                    return
                assert cmd == PS_IOV_GET and vpid == VPID
                if self.die_after is not None and len(self.asked) >= self.die_after:
                    return
                vpn = vaddr >> 12
                n = min(nr, IOV_PAGES - (vpn - BASE) % IOV_PAGES)  # clamp at the iov end
                self.asked.append((vpn, n))
                conn.sendall(PSI.pack(ADD_PRESENT, n, vaddr, vpid) + b"".join(page(v, 2) for v in range(vpn, vpn + n)))


def _recv(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        part = sock.recv(n - len(buf))
        if not part:
            return b""
        buf += part
    return buf


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[LazyProxy, FakeSource, set[int]]]:
    """64 lazy pages; the even ones are clean (version 1 in the store, and the source agrees)."""
    images = tmp_path / "images"
    images.mkdir()
    memimage.write_pagemap(images / f"pagemap-{VPID}.img", VPID, [memimage.Entry(BASE << 12, PAGES, memimage.PE_LAZY)])
    store = TargetStore(tmp_path / "store")
    proc = store.process(VPID)
    vpns = np.arange(BASE, BASE + PAGES, dtype=np.uint64)
    proc.ensure_slabs(vpns)
    clean_vpns = vpns[::2]
    for v in clean_vpns.tolist():
        proc.write(np.array([v], np.uint64), np.array([1], np.uint64), memoryview(page(v, 1)))
    clean = HashTable()
    clean.set(clean_vpns, np.ones(len(clean_vpns), np.uint64))
    source = FakeSource()
    proxy = LazyProxy(store, {VPID: clean}, images, lambda: socket.create_connection(("127.0.0.1", source.port)))
    try:
        yield proxy, source, set(clean_vpns.tolist())
    finally:
        proxy.close()
        store.close()


def get(conn: socket.socket, vpn: int, n: int) -> tuple[int, bytes]:
    conn.sendall(PSI.pack(PS_IOV_GET, n, vpn << 12, VPID))
    cmd, k, vaddr, vpid = PSI.unpack(_recv(conn, PSI.size))
    assert (cmd, vaddr, vpid) == (ADD_PRESENT, vpn << 12, VPID) and 0 < k <= n
    return k, _recv(conn, k * PAGE)


def expected(vpn: int, clean: set[int]) -> bytes:
    return page(vpn, 1 if vpn in clean else 2)


def test_every_page_comes_from_the_right_place(setup: tuple[LazyProxy, FakeSource, set[int]]) -> None:
    proxy, source, clean = setup
    proxy.start()
    with socket.create_connection(("127.0.0.1", proxy.port)) as daemon:
        # A fault on a dirty page near the end, ahead of the prefetch, is answered at once.
        _, data = get(daemon, BASE + 61, 1)
        assert data == expected(BASE + 61, clean)
        # Then the whole range in big requests, as the daemon's background transfer asks; every answer
        # is the longest run of pages from one place, and together they cover every page exactly.
        vpn = BASE
        while vpn < BASE + PAGES:
            k, data = get(daemon, vpn, BASE + PAGES - vpn)
            for i in range(k):
                assert data[i * PAGE : (i + 1) * PAGE] == expected(vpn + i, clean), hex(vpn + i)
            vpn += k
        daemon.sendall(PSI.pack(PS_IOV_CLOSE, 0, 0, 0))
        assert struct.unpack("<i", _recv(daemon, 4))[0] == 0
    assert source.closed.wait(5), "the proxy passed the CLOSE on, so the source's dump can end"
    fetched = [v for vpn, n in source.asked for v in range(vpn, vpn + n)]
    assert sorted(fetched) == sorted(set(range(BASE, BASE + PAGES)) - clean), "only dirty pages, each once"
    stats = proxy.close()
    assert stats["pages_from_source"] == PAGES // 2 and stats["error"] is None


def test_a_vanished_source_fails_the_daemon_instead_of_serving_stale_pages(
    setup: tuple[LazyProxy, FakeSource, set[int]],
) -> None:
    proxy, source, clean = setup
    source.die_after = 0  # hangs up at the first request
    proxy.start()
    with socket.create_connection(("127.0.0.1", proxy.port)) as daemon:
        _, data = get(daemon, BASE, 1)  # clean: still served from the store
        assert data == expected(BASE, clean)
        daemon.sendall(PSI.pack(PS_IOV_GET, 1, (BASE + 1) << 12, VPID))  # dirty: only the source has it
        daemon.settimeout(10)
        assert _recv(daemon, PSI.size) == b"", "the proxy hangs up, so the daemon fails loudly"
    assert "source" in (proxy.close()["error"] or "")
