"""Live reads of a running process tree's private memory, the pages CRIU would dump.

Nothing here stops the processes: /proc/PID/maps and /proc/PID/pagemap say which pages exist, and
process_vm_readv copies them with large iovecs (6-8 GB/s measured here, twice /proc/PID/mem).
A process that exits or unmaps memory mid-read loses only those pages from the round; the final
CRIU dump is the authority on what the frozen tree holds.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
from skyferry.pipeline import proctree
from skyferry.pipeline.errors import SkyferryError

PAGE = 4096
PAGE_SHIFT = 12
PM_PRESENT = 1 << 63
PM_SWAP = 1 << 62
PM_FILE = 1 << 61  # page cache or shared anon: CRIU skips these in private file mappings
IOV_MAX = 1024
# Mappings the kernel provides, or that CRIU never dumps as task pages.
SPECIAL = ("[vvar]", "[vvar_vclock]", "[vdso]", "[vsyscall]", "[uprobes]")
# 8 MiB per read batch: still large iovecs, and a migration's two buffers (16 MiB) are cheap to fault in. At
# 32 MiB, zeroing each new migration's 64 MiB of fresh buffers was a quarter of the source agent's CPU in
# a 4-way evacuation (perf: clear_page under process_vm_readv), and no batch read or hashed faster.
CHUNK_PAGES = 2048
LOOKAHEAD = 3  # chunks a MemReader's threads may read ahead of their caller

T = TypeVar("T")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.process_vm_readv.restype = ctypes.c_ssize_t
_libc.process_vm_readv.argtypes = [
    ctypes.c_int,
    ctypes.c_void_p,
    ctypes.c_ulong,
    ctypes.c_void_p,
    ctypes.c_ulong,
    ctypes.c_ulong,
]


@dataclass(frozen=True)
class Mapping:
    start: int
    end: int
    perms: str
    path: str


@dataclass(frozen=True)
class Proc:
    """One process of the tree: `pid` in the host's view, `vpid` as CRIU's images name it."""

    pid: int
    vpid: int


def process_tree(root_pid: int) -> list[Proc]:
    """The root and all its descendants, parents before children."""
    out = []
    for pid in proctree.descendants(root_pid):
        try:
            out.append(Proc(pid, _nspid(pid)))
        except FileNotFoundError:
            continue  # exited meanwhile
    if not out or out[0].pid != root_pid:
        raise SkyferryError(f"process {root_pid} does not exist", hint="pass the container's root PID")
    return out


def _nspid(pid: int) -> int:
    # The last NSpid field is the pid inside the innermost pid namespace: CRIU's pstree id.
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("NSpid:"):
            return int(line.split()[-1])
    return pid


def private_mappings(pid: int) -> list[Mapping]:
    """Readable private mappings whose pages CRIU dumps into pagemap/pages images."""
    out = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        lo, hi = parts[0].split("-")
        perms = parts[1]
        path = parts[5] if len(parts) > 5 else ""
        if perms[0] != "r" or perms[3] != "p" or path in SPECIAL:
            continue
        out.append(Mapping(int(lo, 16), int(hi, 16), perms, path))
    return out


def dumpable_pages(pagemap_fd: int, m: Mapping) -> np.ndarray:
    """Page numbers (vaddr >> 12) in `m` that are present or swapped and not plain file cache."""
    first = m.start >> PAGE_SHIFT
    n = (m.end - m.start) >> PAGE_SHIFT
    found = []
    step = 1 << 18  # 1 GiB of address space per pagemap read
    for off in range(0, n, step):
        cnt = min(step, n - off)
        raw = os.pread(pagemap_fd, cnt * 8, (first + off) * 8)
        pm = np.frombuffer(raw, dtype=np.uint64)
        keep = ((pm & np.uint64(PM_PRESENT | PM_SWAP)) != 0) & ((pm & np.uint64(PM_FILE)) == 0)
        found.append(np.flatnonzero(keep).astype(np.uint64) + np.uint64(first + off))
    return np.concatenate(found) if found else np.empty(0, np.uint64)


def runs_of(vpns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split sorted page numbers into runs: (first page of each run, run length)."""
    if len(vpns) == 0:
        return np.empty(0, np.uint64), np.empty(0, np.uint64)
    breaks = np.flatnonzero(np.diff(vpns) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [len(vpns)]))
    return vpns[starts], (ends - starts).astype(np.uint64)


def read_buffers() -> tuple[np.ndarray, np.ndarray]:
    """The two batch buffers a MemReader alternates between; keep them across rounds."""
    return np.empty((CHUNK_PAGES, PAGE), np.uint8), np.empty((CHUNK_PAGES, PAGE), np.uint8)


class MemReader:
    """Reads the pages of one live process, CHUNK_PAGES at a time, in two threads.

    Each thread reads a chunk into its own buffer (process_vm_readv runs without the GIL) and runs the
    caller's function on it, so one thread copies while the other hashes: at 1 GiB, 240 -> 125 ms
    measured here against one reader thread feeding one hashing caller.
    """

    def __init__(self, pid: int, buffers: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        self.pid = pid
        # Pass buffers kept across rounds: fresh memory is slow to touch on VMs that return it to the host.
        self._bufs = buffers or read_buffers()

    def map(self, fn: Callable[[np.ndarray, np.ndarray], T]) -> Iterator[T]:
        """fn(page numbers, pages as (n, 4096) uint8) over every dumpable page, results in address order.

        fn runs in the reader threads, which stay at most LOOKAHEAD chunks ahead of the caller; `pages`
        is valid only during the call. A process that exits ends the iteration early.
        """
        plan = self._plan()
        results: dict[int, T | BaseException] = {}
        cond = threading.Condition()
        taken, consumed, stop = 0, 0, False

        def work(buf: np.ndarray) -> None:
            nonlocal taken
            while True:
                with cond:
                    while not stop and taken < len(plan) and taken >= consumed + LOOKAHEAD:
                        cond.wait()
                    if stop or taken >= len(plan):
                        return
                    i, taken = taken, taken + 1
                result: T | BaseException
                try:
                    got = self._read(plan[i], buf)
                    result = fn(got, buf[: len(got)])
                except BaseException as e:  # the caller must always hear from us, or it waits forever
                    result = e
                with cond:
                    results[i] = result
                    cond.notify_all()

        threads = [threading.Thread(target=work, args=(b,), daemon=True) for b in self._bufs]
        for t in threads:
            t.start()
        try:
            for i in range(len(plan)):
                with cond:
                    while i not in results:
                        cond.wait()
                    result = results.pop(i)
                    consumed = i + 1
                    cond.notify_all()
                if isinstance(result, ProcessLookupError):
                    return  # the process exited during the round
                if isinstance(result, BaseException):
                    raise result
                yield result
        finally:
            with cond:
                stop = True
                cond.notify_all()
            for t in threads:
                t.join()

    def _plan(self) -> list[np.ndarray]:
        """Page numbers of every chunk to read."""
        try:
            fd = os.open(f"/proc/{self.pid}/pagemap", os.O_RDONLY)
        except (FileNotFoundError, ProcessLookupError):
            return []  # the process exited before its turn in this round
        try:
            return [
                vpns[off : off + CHUNK_PAGES]
                for m in private_mappings(self.pid)
                for vpns in (dumpable_pages(fd, m),)
                for off in range(0, len(vpns), CHUNK_PAGES)
            ]
        except (FileNotFoundError, ProcessLookupError):
            return []
        finally:
            os.close(fd)

    def _read(self, vpns: np.ndarray, buf: np.ndarray) -> np.ndarray:
        """Read `vpns` into `buf`, packed; returns the page numbers actually read."""
        starts, lens = runs_of(vpns)
        ok = np.ones(len(starts), dtype=bool)
        base = buf.ctypes.data
        iov = np.empty((IOV_MAX, 2), dtype=np.uint64)
        out_pages = 0
        i = 0
        while i < len(starts):
            k = min(IOV_MAX, len(starts) - i)
            iov[:k, 0] = starts[i : i + k] << np.uint64(PAGE_SHIFT)
            iov[:k, 1] = lens[i : i + k] << np.uint64(PAGE_SHIFT)
            want = int(iov[:k, 1].sum())
            local = (ctypes.c_uint64 * 2)(base + out_pages * PAGE, want)
            got = _libc.process_vm_readv(self.pid, local, 1, iov.ctypes.data, k, 0)
            if got < 0:
                err = ctypes.get_errno()
                if err == errno.ESRCH:
                    raise ProcessLookupError(self.pid)
                if err == errno.EPERM:
                    raise SkyferryError(
                        f"not allowed to read the memory of process {self.pid}",
                        hint="run the agent as root with CAP_SYS_PTRACE (kernel.yama.ptrace_scope <= 1)",
                    )
                if err != errno.EFAULT:
                    raise OSError(err, f"process_vm_readv({self.pid}): {os.strerror(err)}")
                got = 0
            # Transfers stop at whole remote iovecs: count the runs that made it, skip the one that
            # faulted (unmapped under us), continue after it.
            done_bytes = 0
            j = 0
            while j < k and done_bytes + int(iov[j, 1]) <= got:
                done_bytes += int(iov[j, 1])
                j += 1
            out_pages += done_bytes // PAGE
            if j < k:
                ok[i + j] = False
                i += j + 1
            else:
                i += k
        if ok.all():
            return vpns
        keep = np.repeat(ok, lens.astype(np.int64))
        return vpns[keep]
