"""A CRIU page server on the target that serves the hybrid mode's lazy pages.

CRIU's lazy-pages daemon asks a page server for pages with PS_IOV_GET and expects PS_IOV_ADD_F
replies, possibly shorter than asked (criu/page-xfer.c, criu/uffd.c). This proxy answers it:

- pages the pre-copy store holds unchanged (the clean map) come from the store, at local speed;
- the rest come from the source's CRIU page server, over one connection: prefetched in address order
  with a bounded window, and fetched ahead of the prefetch when the daemon asks for one first.

So the restored copy depends on the source only until the changed pages have arrived, and the
daemon's background transfer is never starved by a slow answer (criu/uffd.c fetches in the
background only while no request is outstanding).
"""

from __future__ import annotations

import collections
import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from skyferry.pipeline.criu import memimage
from skyferry.pipeline.memory.pages import HashTable, expand_runs
from skyferry.pipeline.memory.procmem import PAGE, runs_of
from skyferry.pipeline.memory.store import TargetStore

PSI = struct.Struct("<I4xQQQ")  # struct page_server_iov: cmd, nr_pages, vaddr, dst_id (the vpid)
PS_IOV_GET, PS_IOV_ADD_F, PS_IOV_CLOSE, PS_IOV_FORCE_CLOSE = 7, 6, 0x1023, 0x1024
ADD_PRESENT = PS_IOV_ADD_F | memimage.PE_PRESENT << 16
MAX_GET = 256  # pages per request to the source: 1 MiB
# Pages per answer to the daemon: it fetches in the background in requests of up to 4 MiB, and a fault's
# request waits behind the answer in progress, so a short answer keeps faults quick (the daemon asks
# again for the rest).
ANSWER_PAGES = 32
WINDOW = 1 << 20  # bytes asked of the source and not yet received: bounds how long a fault waits behind prefetch
NEEDED, ASKED, READY = 0, 1, 2
CLOSE = (-1, 0, 0)  # in the in-flight queue: PS_IOV_CLOSE, answered by a 4-byte status
LOOPBACK = "127.0.0.1"  # the daemon runs on this host: nobody else needs to reach the proxy


class LazyProxy:
    """Serve one lazy-pages daemon on loopback (a port the kernel picks) from `store`, `clean` and the
    source's page server, reached through the socket `upstream()` returns (pipeline/memory/pagetunnel.py:
    TLS to the source's tunnel). `start()` connects and listens; `close()` stops."""

    def __init__(
        self, store: TargetStore, clean: dict[int, HashTable], image_dir: Path, upstream: Callable[[], socket.socket]
    ):
        self.store = store
        self.upstream = upstream
        self.state: dict[int, HashTable] = {}
        self.todo: collections.deque[tuple[int, int, int]] = collections.deque()  # prefetch: (vpid, vpn, n)
        for vpid, path in memimage.task_pagemaps(image_dir).items():
            self._plan(vpid, memimage.read_pagemap(path)[1], clean.get(vpid))
        self.planned = sum(n for _, _, n in self.todo)  # pages to fetch from the source, each exactly once
        self.cv = threading.Condition()
        self.send_lock = threading.Lock()
        self.asked: collections.deque[tuple[int, int, int]] = collections.deque()  # in flight, in order
        self.inflight = 0
        self.closing = False
        self.draining = False
        self.status: int | None = None
        self.error: str | None = None
        self.stats = {"pages_from_store": 0, "pages_from_source": 0, "requests": 0, "waits": 0, "fetch_s": 0.0}
        self.listener = socket.create_server((LOOPBACK, 0), backlog=1)
        self.port = self.listener.getsockname()[1]
        self.up: socket.socket | None = None
        self.threads: list[threading.Thread] = []
        self.started = time.monotonic()
        self.held: Callable[[], bool] = lambda: False  # a fault drill: no page moves while true
        self.on_wait: Callable[[float], None] = lambda seconds: None  # a fault waited this long for the source

    def _plan(self, vpid: int, entries: list[memimage.Entry], clean: HashTable | None) -> None:
        """Mark the clean lazy pages ready and queue the others for prefetch."""
        lazy = [e for e in entries if e.flags & memimage.PE_LAZY]
        if not lazy:
            return
        starts = np.array([e.vaddr >> 12 for e in lazy], np.uint64)
        vpns = expand_runs(starts, np.array([e.nr_pages for e in lazy], np.uint64))
        is_clean = clean.get(vpns) != 0 if clean else np.zeros(len(vpns), bool)
        state = self.state[vpid] = HashTable()
        state.set(vpns[is_clean], np.full(int(is_clean.sum()), READY, np.uint64))
        starts, lens = runs_of(vpns[~is_clean])
        for s, n in zip(starts.tolist(), lens.tolist(), strict=True):
            for a in range(0, n, MAX_GET):
                self.todo.append((vpid, s + a, min(MAX_GET, n - a)))

    @property
    def outstanding(self) -> int:
        """Pages still to come from the source."""
        return max(self.planned - self.stats["pages_from_source"], 0)

    @property
    def address(self) -> str:
        return f"{self.listener.getsockname()[0]}:{self.port}"

    def start(self) -> None:
        try:
            self.up = self.upstream()
        except BaseException:
            self.listener.close()
            raise
        self.up.settimeout(None)
        for target in (self._serve, self._receive, self._prefetch):
            t = threading.Thread(target=target, daemon=True, name=f"lazyproxy-{target.__name__}")
            t.start()
            self.threads.append(t)

    def close(self) -> dict[str, Any]:
        """Stop serving (the daemon has finished or the migration is undone); returns the stats."""
        with self.cv:
            self.closing = True
            self.cv.notify_all()
        for s in (self.listener, self.up):
            if s is not None:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
        for t in self.threads:
            t.join(timeout=5)
        return {**self.stats, "error": self.error}

    # --- towards the source ------------------------------------------------------------------------

    def _ask(self, vpid: int, vpn: int, n: int) -> None:
        """GET pages the caller has marked ASKED (under cv)."""
        self.asked.append((vpid, vpn, n))
        self.inflight += n * PAGE
        self.stats["requests"] += 1
        self.cv.notify_all()  # the receiver waits for something to be asked
        assert self.up is not None
        with self.send_lock:
            self.up.sendall(PSI.pack(PS_IOV_GET, n, vpn << 12, vpid))

    def _claim(self, vpid: int, vpn: int, n: int) -> int:
        """Mark the NEEDED prefix of [vpn, vpn + n) ASKED; its length (0 if the first page is not NEEDED)."""
        vpns = np.arange(vpn, vpn + n, dtype=np.uint64)
        states = self.state[vpid].get(vpns)
        k = int(np.argmax(states != NEEDED)) if (states != NEEDED).any() else n
        if k:
            self.state[vpid].set(vpns[:k], np.full(k, ASKED, np.uint64))
        return k

    def _prefetch(self) -> None:
        try:
            while True:
                while self.held() and not self._stopped():  # the drill holds prefetch too: no page moves
                    time.sleep(0.05)
                with self.cv:
                    while self.inflight >= WINDOW and not self._stopped():
                        self.cv.wait()
                    if self._stopped() or not self.todo:
                        return
                    vpid, vpn, n = self.todo.popleft()
                    i = 0
                    while i < n:  # skip what a fault already asked for
                        k = self._claim(vpid, vpn + i, n - i)
                        if k:
                            self._ask(vpid, vpn + i, k)
                            i += k
                        else:
                            i += 1
        except OSError as e:
            self._fail(f"sending to the source's page server: {e}")

    def _receive(self) -> None:
        assert self.up is not None
        try:
            while True:
                with self.cv:  # read only what was asked for: the answer to a CLOSE is not a header
                    while not self.asked and not self.closing and self.error is None:
                        self.cv.wait()
                    if not self.asked:
                        return
                    if self.asked[0] == CLOSE:  # _finish sent PS_IOV_CLOSE: a status follows
                        self.status = struct.unpack("<i", _recv_exact(self.up, 4))[0]
                        self.asked.popleft()
                        self.cv.notify_all()
                        return
                head = _recv_exact(self.up, PSI.size)
                cmd, nr, vaddr, vpid = PSI.unpack(head)
                with self.cv:
                    if not self.asked:
                        raise ConnectionError(f"an answer nobody asked for (cmd {cmd:#x})")
                    a_vpid, a_vpn, a_n = self.asked.popleft()
                if cmd != ADD_PRESENT or vpid != a_vpid or vaddr >> 12 != a_vpn or not 0 < nr <= a_n:
                    raise ConnectionError(f"unexpected answer {cmd:#x} for pid {vpid} at {vaddr:#x}")
                data = _recv_exact(self.up, nr * PAGE)
                with self.cv:
                    proc = self.store.process(vpid)
                    start = np.array([a_vpn], np.uint64)
                    proc.ensure_slabs(np.array([a_vpn, a_vpn + nr - 1], np.uint64))
                    proc.write(start, np.array([nr], np.uint64), memoryview(data))
                    self.state[vpid].set(np.arange(a_vpn, a_vpn + nr, dtype=np.uint64), np.full(nr, READY, np.uint64))
                    self.inflight -= a_n * PAGE
                    self.stats["pages_from_source"] += nr
                    if nr < a_n:  # the source answered part of a run: ask for the rest
                        self._ask(vpid, a_vpn + nr, a_n - nr)
                    if not self.todo and not self.asked:
                        self.stats["fetch_s"] = round(time.monotonic() - self.started, 3)
                    self.cv.notify_all()
        except (OSError, ConnectionError) as e:
            if not self.closing:
                self._fail(f"the source's page server: {e}")

    def _fail(self, why: str) -> None:
        with self.cv:
            self.error = self.error or why
            self.cv.notify_all()

    def _stopped(self) -> bool:
        return self.closing or self.draining or self.error is not None

    # --- towards CRIU's lazy-pages daemon ----------------------------------------------------------

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                while True:
                    cmd, nr, vaddr, vpid = PSI.unpack(_recv_exact(conn, PSI.size))
                    if cmd in (PS_IOV_CLOSE, PS_IOV_FORCE_CLOSE):
                        conn.sendall(struct.pack("<i", self._finish()))
                        return
                    if cmd != PS_IOV_GET or vpid not in self.state or nr == 0:
                        raise ConnectionError(f"unexpected request {cmd:#x} for pid {vpid}")
                    self._answer(conn, vpid, vaddr >> 12, min(nr, ANSWER_PAGES))
            except (OSError, ConnectionError) as e:
                # Closing the daemon's connection makes it fail, which cleanup reports.
                if not self.closing:
                    self._fail(self.error or f"the lazy-pages daemon's connection: {e}")

    def _answer(self, conn: socket.socket, vpid: int, vpn: int, n: int) -> None:
        """Send the longest READY prefix of [vpn, vpn + n), asking the source first if it is not READY.
        Sent under the lock: the store's file may be re-laid out when a fetched page opens a new slab."""
        while self.held() and not self._stopped():
            time.sleep(0.05)
        with self.cv:
            first = int(self.state[vpid].get(np.array([vpn], np.uint64))[0])
            if first != READY:
                self.stats["waits"] += 1
                t0 = time.monotonic()
                if first == NEEDED:
                    self._ask(vpid, vpn, self._claim(vpid, vpn, min(n, MAX_GET)))
                while int(self.state[vpid].get(np.array([vpn], np.uint64))[0]) != READY:
                    if self._stopped():
                        raise ConnectionError(self.error or "closing")
                    self.cv.wait()
                self.on_wait(time.monotonic() - t0)
            states = self.state[vpid].get(np.arange(vpn, vpn + n, dtype=np.uint64))
            k = int(np.argmax(states != READY)) if (states != READY).any() else n
            if first == READY:
                self.stats["pages_from_store"] += k
            conn.sendall(PSI.pack(ADD_PRESENT, k, vpn << 12, vpid))
            self.store.process(vpid).send(conn, vpn, k)

    def _finish(self) -> int:
        """The daemon has every page: drain what is in flight, then let the source's dump end."""
        assert self.up is not None
        with self.cv:
            self.draining = True  # no more prefetch
            while self.asked and self.error is None:
                self.cv.wait()
            if self.error is not None:
                return -1
            self.asked.append(CLOSE)
            self.cv.notify_all()
            with self.send_lock:
                self.up.sendall(PSI.pack(PS_IOV_CLOSE, 0, 0, 0))
            while self.status is None and self.error is None:
                self.cv.wait()
        # The source's page server ends its dump only once we hang up (criu/page-xfer.c).
        with contextlib.suppress(OSError):
            self.up.shutdown(socket.SHUT_RDWR)
        return -1 if self.status is None else self.status


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        r = sock.recv_into(view[got:])
        if r == 0:
            raise ConnectionError("the connection closed")
        got += r
    return bytes(buf)
