"""Content-based pre-copy: live memory rounds without soft-dirty tracking, then a small final delta.

Source side (`SourceEngine`, next to the running container):
    engine = SourceEngine(root_pid)
    while True:
        rnd = engine.round()              # iterate it to the end: chunks of the stream
        send(rnd)                         # rnd.stats afterwards
        if policy.decide(engine.history).stop: break
    freeze; criu dump (full, to tmpfs) into dump_dir
    send(engine.final(dump_dir))          # only pages the target lacks, plus the other image files

Target side (`TargetStore`, in the target's agent):
    store = TargetStore(store_dir)        # store_dir doubles as a CRIU parent image
    store.apply(chunks)                   # once per round
    store.build_image(final_chunks, image_dir)   # then: criu restore -D image_dir

Each round hashes every present private page (xxh3_64) and sends the pages whose hash differs from
what the target holds; zero pages travel as runs without data. The target keeps its copy as a CRIU
image (one pagemap entry per 1 GiB slab of address space, the slabs packed in vaddr order in one
sparse pages file per process), so the final image marks unchanged runs PE_PARENT and carries only
the missing pages. Processes are named by their pid inside the container's pid namespace, as
CRIU's pagemap-<pid>.img is.
"""

from __future__ import annotations

import functools
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xxhash
from skyferry.pipeline.criu import memimage
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.hostapi.framing import FrameWriter
from skyferry.pipeline.memory.pages import (
    FORMAT,
    FRAME_PAGES,
    KIND_DATA,
    KIND_PARENT,
    KIND_ZERO,
    PMAP_HEAD,
    RUN_LAZY,
    ZERO_HASH,
    HashTable,
    Transfer,
    encode_pages,
    expand_runs,
    file_frames,
    page_hashes,
)
from skyferry.pipeline.memory.policy import RoundStats
from skyferry.pipeline.memory.procmem import PAGE, MemReader, process_tree, read_buffers


class _Batch:
    """Changed pages of one process, gathered into PAGE frames of about FRAME_PAGES pages."""

    def __init__(self, vpid: int) -> None:
        self.vpid = vpid
        self.vpns: list[np.ndarray] = []
        self.pages: list[np.ndarray] = []
        self.zero: list[np.ndarray] = []
        self.count = 0

    def add(self, vpns: np.ndarray, pages: np.ndarray, zero: np.ndarray) -> None:
        self.vpns.append(vpns)
        self.pages.append(pages)
        self.zero.append(zero)
        self.count += len(vpns) + len(zero) // 64

    def take(self) -> bytes:
        cat = np.concatenate
        match self.pages:  # one chunk's pages (the usual frame) go to the payload without a copy of their own
            case []:
                pages = np.empty((0, PAGE), np.uint8)
            case [one]:
                pages = one
            case _:
                pages = cat(self.pages)
        payload = encode_pages(self.vpid, cat(self.vpns), pages, cat(self.zero))
        self.vpns, self.pages, self.zero, self.count = [], [], [], 0
        return payload


@dataclass
class _Changed:
    """What one chunk holds that the target lacks: page numbers and hashes, the data (copied out of the
    reader's buffer) and the zero pages."""

    scanned: int
    vpns: np.ndarray
    hashes: np.ndarray
    data_vpns: np.ndarray
    data: np.ndarray
    zero: np.ndarray


def _changed(table: HashTable, vpns: np.ndarray, pages: np.ndarray) -> _Changed:
    """Runs in a MemReader thread: compare a chunk with what the target holds."""
    hashes = page_hashes(pages)
    idx = np.flatnonzero(hashes != table.get(vpns))
    zero = idx[hashes[idx] == ZERO_HASH]
    zero = zero[~pages[zero].any(axis=1)]
    data = np.setdiff1d(idx, zero, assume_unique=True)
    return _Changed(len(vpns), vpns[idx], hashes[idx], vpns[data], pages[data], vpns[zero])


class SourceEngine:
    """The source side: live rounds over a process tree, and the final delta from its dump."""

    def __init__(self, root_pid: int, level: int = 1) -> None:
        self.root_pid = root_pid
        self.level = level
        self.session = secrets.token_hex(8)
        self.seq = 0
        self.tables: dict[int, HashTable] = {}  # by vpid: what the target holds
        self.history: list[RoundStats] = []
        self.bufs = read_buffers()

    def reset(self) -> None:
        """Forget what the target holds (after it rejected a stream); the next round is full."""
        self.session = secrets.token_hex(8)
        self.seq = 0
        self.tables.clear()
        self.history.clear()

    def round(self) -> Transfer:
        """Read the tree's memory live and stream the pages the target does not have yet."""
        seq = self.seq + 1
        stats = RoundStats("round", seq, time.monotonic())
        pending: list[tuple[int, np.ndarray, np.ndarray]] = []

        def commit() -> None:
            for vpid, vpns, hashes in pending:
                self.tables.setdefault(vpid, HashTable()).set(vpns, hashes)
            self.seq = seq
            self.history.append(stats)

        return Transfer(stats, self._round_frames(seq, stats, pending), commit)

    def _round_frames(
        self, seq: int, stats: RoundStats, pending: list[tuple[int, np.ndarray, np.ndarray]]
    ) -> Iterator[bytes]:
        w = FrameWriter(FORMAT, self.level)
        yield w.head("round", session=self.session, seq=seq)
        for proc in process_tree(self.root_pid):
            stats.processes += 1
            table = self.tables.get(proc.vpid, HashTable())
            batch = _Batch(proc.vpid)
            for ch in MemReader(proc.pid, self.bufs).map(functools.partial(_changed, table)):
                stats.pages_scanned += ch.scanned
                if not len(ch.vpns):
                    continue
                pending.append((proc.vpid, ch.vpns, ch.hashes))
                stats.pages_changed += len(ch.vpns)
                stats.pages_zero += len(ch.zero)
                stats.bytes_raw += len(ch.data) * PAGE
                for a in range(0, max(len(ch.data), 1), FRAME_PAGES):
                    zero = ch.zero if a == 0 else np.empty(0, np.uint64)
                    batch.add(ch.data_vpns[a : a + FRAME_PAGES], ch.data[a : a + FRAME_PAGES], zero)
                    if batch.count >= FRAME_PAGES:
                        yield w.frame(b"PAGE", batch.take())
            if batch.vpns:
                yield w.frame(b"PAGE", batch.take())
        stats.bytes_out = w.bytes_out
        yield w.end(stats.as_dict())
        stats.bytes_out = w.bytes_out

    def final(self, dump_dir: Path) -> Transfer:
        """The freeze-time stream from a full local `criu dump` in `dump_dir`.

        Pages whose content the target holds are marked in-parent; the rest travel as data (or
        zero runs), with every non-page image file. The dump directory is only read.
        """
        stats = RoundStats("final", self.seq + 1, time.monotonic())
        return Transfer(stats, self._final_frames(dump_dir, stats), lambda: None)

    def _final_frames(self, dump_dir: Path, stats: RoundStats) -> Iterator[bytes]:
        w = FrameWriter(FORMAT, self.level)
        yield w.head("final", session=self.session, seq=stats.seq)
        pagemaps = memimage.task_pagemaps(dump_dir)
        maps = {vpid: memimage.read_pagemap(path) for vpid, path in pagemaps.items()}
        skip = {p.name for p in pagemaps.values()} | {f"pages-{pid}.img" for pid, _ in maps.values()}
        for path in sorted(dump_dir.iterdir()):
            if path.name in skip or path.suffix == ".log" or path.is_symlink() or not path.is_file():
                continue
            yield from file_frames(w, path, stats)
        for vpid, (pages_id, entries) in maps.items():
            stats.processes += 1
            yield from self._final_process(w, dump_dir, vpid, pages_id, entries, stats)
        stats.bytes_out = w.bytes_out
        yield w.end(stats.as_dict())
        stats.bytes_out = w.bytes_out

    def _final_process(
        self,
        w: FrameWriter,
        dump_dir: Path,
        vpid: int,
        pages_id: int,
        entries: list[memimage.Entry],
        stats: RoundStats,
    ) -> Iterator[bytes]:
        # CRIU marks anonymous pages PE_LAZY (restorable lazily) even when their data is in the image.
        if any(e.flags & ~memimage.PE_LAZY != memimage.PE_PRESENT for e in entries):
            raise SkyferryError(
                f"pagemap-{vpid}.img in {dump_dir} has pages that are not in its pages file",
                hint="the final delta needs a plain full dump: no --lazy-pages, no --prev-images-dir",
            )
        if not entries:
            yield w.frame(b"PMAP", PMAP_HEAD.pack(vpid, pages_id, 0, 0))
            return
        starts = np.array([e.vaddr >> 12 for e in entries], np.uint64)
        lens = np.array([e.nr_pages for e in entries], np.uint64)
        vpns = expand_runs(starts, lens)
        path = memimage.pages_path(dump_dir, pages_id)
        if path.stat().st_size != len(vpns) * PAGE:
            raise SkyferryError(f"{path} does not match its pagemap", hint="the dump is incomplete; dump again")
        pages = np.memmap(path, np.uint8, "r").reshape(-1, PAGE) if len(vpns) else np.empty((0, PAGE), np.uint8)
        hashes = np.concatenate(
            [page_hashes(pages[a : a + 8192]) for a in range(0, len(vpns), 8192)] or [np.empty(0, np.uint64)]
        )
        known = self.tables.get(vpid, HashTable()).get(vpns)
        have = known == hashes
        kinds = np.full(len(vpns), KIND_DATA, np.uint8)
        kinds[have] = KIND_PARENT
        zero = np.flatnonzero(~have & (hashes == ZERO_HASH))
        zero = zero[~pages[zero].any(axis=1)]
        kinds[zero] = KIND_ZERO
        # Runs: break where the kind changes, the pages stop being adjacent, or a dump entry starts.
        brk = np.zeros(len(vpns), bool)
        brk[0] = True
        brk[1:] = (kinds[1:] != kinds[:-1]) | (np.diff(vpns) != 1)
        brk[(np.cumsum(lens) - lens).astype(np.int64)] = True
        rs = np.flatnonzero(brk)
        rl = np.diff(np.append(rs, len(vpns)))
        lazy = np.repeat([e.flags & memimage.PE_LAZY != 0 for e in entries], lens.astype(np.int64))
        digest = xxhash.xxh3_64_intdigest(known[have].astype("<u8").tobytes())
        yield w.frame(
            b"PMAP",
            PMAP_HEAD.pack(vpid, pages_id, digest, len(rs))
            + vpns[rs].astype("<u8").tobytes()
            + rl.astype("<u4").tobytes()
            + (kinds[rs] | np.where(lazy[rs], RUN_LAZY, 0).astype(np.uint8)).tobytes(),
        )
        data = np.flatnonzero(kinds == KIND_DATA)
        stats.pages_scanned += len(vpns)
        stats.pages_parent += int(have.sum())
        stats.pages_zero += len(zero)
        stats.pages_changed += len(data) + len(zero)
        stats.bytes_raw += len(data) * PAGE
        empty = np.empty(0, np.uint64)
        for a in range(0, len(data), FRAME_PAGES):
            part = data[a : a + FRAME_PAGES]
            yield w.frame(b"PAGE", encode_pages(vpid, vpns[part], pages[part], empty))
