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

import ctypes
import itertools
import os
import re
import secrets
import shutil
import socket
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import xxhash
from skyferry.pipeline.criu import memimage
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.hostapi.framing import Format, FrameReader, FrameWriter, StreamError
from skyferry.pipeline.memory.policy import RoundStats
from skyferry.pipeline.memory.procmem import PAGE, MemReader, process_tree, read_buffers, runs_of

SLAB_SHIFT = 18  # 2^18 pages = 1 GiB of address space per slab
SLAB_PAGES = 1 << SLAB_SHIFT
SLAB_BYTES = SLAB_PAGES * PAGE
FRAME_PAGES = 1024  # 4 MiB of page data per frame
FILE_PIECE = 8 << 20
KIND_PARENT, KIND_DATA, KIND_ZERO = 0, 1, 2
RUN_LAZY = 0x80  # PMAP run flag: the dump marked these pages PE_LAZY
ZERO_HASH = xxhash.xxh3_64_intdigest(bytes(PAGE))
PAGES_HEAD = struct.Struct("<III")  # vpid, data runs, zero runs
PMAP_HEAD = struct.Struct("<IIQI")  # vpid, pages_id, digest of in-parent page hashes, runs
FILE_HEAD = struct.Struct("<HQ")  # name length, offset
IMAGE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
STORE_FILE = re.compile(r"(pagemap|pages)-\d+\.img(\.tmp)?")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 1, 2

# Every memory stream: rounds, the final, and hybrid's lazy final (its kind and CLEN frames).
FORMAT = Format(
    name="skyferry-precopy",
    version=2,
    kinds=frozenset({"round", "final", "lazy-final"}),
    tags=frozenset({b"PAGE", b"PMAP", b"FILE", b"CLEN"}),
    what="pre-copy stream",
    hint="nothing was restored from it; resend from a fresh round (SourceEngine.reset, TargetStore.reset)",
)


def page_hashes(pages: np.ndarray) -> np.ndarray:
    """xxh3_64 of each row of an (n, 4096) uint8 array; 0 is reserved for "no page"."""
    mv = memoryview(np.ascontiguousarray(pages).reshape(-1))
    h = xxhash.xxh3_64_intdigest
    out = np.fromiter((h(mv[i : i + PAGE]) for i in range(0, len(mv), PAGE)), np.uint64, len(pages))
    out[out == 0] = 1
    return out


def expand_runs(starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Page numbers of runs (start, len), in order."""
    if len(starts) == 0:
        return np.empty(0, np.uint64)
    lens = lens.astype(np.int64)
    offs = np.arange(lens.sum(), dtype=np.uint64) - np.repeat(np.cumsum(lens) - lens, lens).astype(np.uint64)
    return np.repeat(starts.astype(np.uint64), lens) + offs


class HashTable:
    """xxh3_64 per page number of the pages the target holds, in 2 MiB arrays per 1 GiB slab."""

    def __init__(self) -> None:
        self.slabs: dict[int, np.ndarray] = {}

    def _groups(self, vpns: np.ndarray) -> Iterator[tuple[int, slice]]:
        slab = vpns >> np.uint64(SLAB_SHIFT)
        cuts = np.flatnonzero(np.diff(slab)) + 1
        bounds = [0, *cuts.tolist(), len(vpns)]
        for a, b in itertools.pairwise(bounds):
            if a < b:
                yield int(slab[a]), slice(a, b)

    def get(self, vpns: np.ndarray) -> np.ndarray:
        out = np.zeros(len(vpns), np.uint64)
        for s, sl in self._groups(vpns):
            arr = self.slabs.get(s)
            if arr is not None:
                out[sl] = arr[vpns[sl] & np.uint64(SLAB_PAGES - 1)]
        return out

    def set(self, vpns: np.ndarray, hashes: np.ndarray) -> None:
        for s, sl in self._groups(vpns):
            arr = self.slabs.get(s)
            if arr is None:
                arr = self.slabs[s] = np.zeros(SLAB_PAGES, np.uint64)
            arr[vpns[sl] & np.uint64(SLAB_PAGES - 1)] = hashes[sl]


def encode_pages(vpid: int, data_vpns: np.ndarray, data: np.ndarray, zero_vpns: np.ndarray) -> bytes:
    ds, dl = runs_of(data_vpns)
    zs, zl = runs_of(zero_vpns)
    return b"".join(
        (
            PAGES_HEAD.pack(vpid, len(ds), len(zs)),
            ds.astype("<u8").tobytes(),
            dl.astype("<u4").tobytes(),
            zs.astype("<u8").tobytes(),
            zl.astype("<u4").tobytes(),
            np.ascontiguousarray(data).tobytes(),
        )
    )


def decode_pages(payload: bytes) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray, memoryview]:
    """(vpid, data starts, data lens, zero starts, zero lens, data bytes) of a PAGE frame."""
    vpid, nd, nz = PAGES_HEAD.unpack_from(payload)
    off = PAGES_HEAD.size
    arrays = []
    for n, dt in ((nd, "<u8"), (nd, "<u4"), (nz, "<u8"), (nz, "<u4")):
        size = n * np.dtype(dt).itemsize
        if off + size > len(payload):
            raise FORMAT.error("a PAGE frame is malformed")
        arrays.append(np.frombuffer(payload, dt, n, off).astype(np.uint64))
        off += size
    data = memoryview(payload)[off:]
    if len(data) != int(arrays[1].sum()) * PAGE:
        raise FORMAT.error("a PAGE frame's data does not match its runs")
    return vpid, arrays[0], arrays[1], arrays[2], arrays[3], data


class Transfer:
    """One stream: iterate it once for its chunks; `stats` is complete when it is exhausted."""

    def __init__(self, stats: RoundStats, frames: Iterator[bytes], on_done: Callable[[], None]) -> None:
        self.stats = stats
        self._frames = frames
        self._on_done = on_done
        self._used = False

    def __iter__(self) -> Iterator[bytes]:
        if self._used:
            raise SkyferryError("a pre-copy stream can be sent only once", hint="start a new round")
        self._used = True
        yield from self._frames
        self.stats.duration = time.monotonic() - self.stats.started
        self._on_done()


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
        payload = encode_pages(
            self.vpid,
            cat(self.vpns),
            cat(self.pages) if self.pages else np.empty((0, PAGE), np.uint8),
            cat(self.zero),
        )
        self.vpns, self.pages, self.zero, self.count = [], [], [], 0
        return payload


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
            for vpns, pages in MemReader(proc.pid, self.bufs).chunks():
                stats.pages_scanned += len(vpns)
                hashes = page_hashes(pages)
                idx = np.flatnonzero(hashes != table.get(vpns))
                if not len(idx):
                    continue
                zero = idx[hashes[idx] == ZERO_HASH]
                zero = zero[~pages[zero].any(axis=1)]
                data = np.setdiff1d(idx, zero, assume_unique=True)
                pending.append((proc.vpid, vpns[idx], hashes[idx]))
                stats.pages_changed += len(idx)
                stats.pages_zero += len(zero)
                stats.bytes_raw += len(data) * PAGE
                for a in range(0, max(len(data), 1), FRAME_PAGES):
                    part = data[a : a + FRAME_PAGES]
                    batch.add(vpns[part], pages[part], vpns[zero] if a == 0 else np.empty(0, np.uint64))
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


class _StoredProcess:
    """One process's pages on the target, kept as a CRIU image: pagemap-<vpid>.img + pages-<vpid>.img.

    The pagemap has one PE_PRESENT entry per 1 GiB slab of address space that holds pages; the
    slabs sit in vaddr order in a sparse pages file, so a page's offset is rank(slab) GiB plus its
    place in the slab. Pages never received are holes: the final pagemap never points at them.
    """

    def __init__(self, directory: Path, vpid: int) -> None:
        self.dir = directory
        self.vpid = vpid
        self.path = directory / f"pages-{vpid}.img"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self.slabs: list[int] = []
        self.rank: dict[int, int] = {}
        self.hashes = HashTable()

    def close(self) -> None:
        os.close(self.fd)

    def ensure_slabs(self, vpns: np.ndarray) -> None:
        new = set((np.unique(vpns >> np.uint64(SLAB_SHIFT))).tolist()) - set(self.slabs)
        if not new:
            return
        slabs = sorted(set(self.slabs) | new)
        if self.slabs and min(new) < self.slabs[-1]:
            self._relayout(slabs)
        self.slabs = slabs
        self.rank = {s: i for i, s in enumerate(slabs)}
        os.ftruncate(self.fd, len(slabs) * SLAB_BYTES)
        entries = [memimage.Entry(s << (SLAB_SHIFT + 12), SLAB_PAGES, memimage.PE_PRESENT) for s in slabs]
        memimage.write_pagemap(self.dir / f"pagemap-{self.vpid}.img", self.vpid, entries)

    def _relayout(self, slabs: list[int]) -> None:
        """Move slabs to their new ranks when a slab appears below others (rare: a new mapping)."""
        rank = {s: i for i, s in enumerate(slabs)}
        tmp = self.path.with_name(self.path.name + ".tmp")
        out = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(out, len(slabs) * SLAB_BYTES)
        for old_rank, s in enumerate(self.slabs):
            _copy_data(self.fd, old_rank * SLAB_BYTES, out, rank[s] * SLAB_BYTES, SLAB_BYTES)
        os.rename(tmp, self.path)
        os.close(self.fd)
        self.fd = out

    def _pieces(self, start: int, n: int) -> Iterator[tuple[int, int, int]]:
        """(offset in file, first page index within the run, pages) per slab a run crosses."""
        i = 0
        while i < n:
            vpn = start + i
            s = vpn >> SLAB_SHIFT
            k = min(n - i, SLAB_PAGES - (vpn & (SLAB_PAGES - 1)))
            yield self.rank[s] * SLAB_BYTES + (vpn & (SLAB_PAGES - 1)) * PAGE, i, k
            i += k

    def write(self, starts: np.ndarray, lens: np.ndarray, data: memoryview) -> None:
        pos = 0
        for start, n in zip(starts.tolist(), lens.tolist(), strict=True):
            for off, i, k in self._pieces(start, n):
                os.pwrite(self.fd, data[pos + i * PAGE : pos + (i + k) * PAGE], off)
            pos += n * PAGE
        pages = np.frombuffer(data, np.uint8).reshape(-1, PAGE)
        self.hashes.set(expand_runs(starts, lens), page_hashes(pages))

    def send(self, sock: socket.socket, start: int, n: int) -> None:
        """Pages [start, start + n) as stored (holes read as zeros), file to socket without a copy."""
        for off, _, k in self._pieces(start, n):
            end = off + k * PAGE
            while off < end:
                off += os.sendfile(sock.fileno(), self.fd, off, end - off)

    def zero(self, starts: np.ndarray, lens: np.ndarray) -> None:
        for start, n in zip(starts.tolist(), lens.tolist(), strict=True):
            for off, _, k in self._pieces(start, n):
                _punch(self.fd, off, k * PAGE)
        vpns = expand_runs(starts, lens)
        self.hashes.set(vpns, np.full(len(vpns), ZERO_HASH, np.uint64))


def _punch(fd: int, off: int, length: int) -> None:
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, length) != 0:
        os.pwrite(fd, bytes(length), off)  # file systems without hole punching


def _copy_data(src: int, src_off: int, dst: int, dst_off: int, length: int) -> None:
    """Copy the data extents of [src_off, src_off + length), leaving holes as holes."""
    pos, end = src_off, src_off + length
    while pos < end:
        try:
            data = os.lseek(src, pos, os.SEEK_DATA)
        except OSError:
            return  # only holes remain
        if data >= end:
            return
        hole = min(os.lseek(src, data, os.SEEK_HOLE), end)
        done = data
        while done < hole:
            done += os.copy_file_range(src, dst, hole - done, done, dst_off + done - src_off)
        pos = hole


class TargetStore:
    """The target side: the pages received so far, kept in `directory` as a CRIU parent image."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.session: str | None = None
        self.seq = 0
        self.procs: dict[int, _StoredProcess] = {}
        self._clear_files()  # a left-over store from an earlier migration is never a parent

    def reset(self) -> None:
        """Drop everything; the next stream must be round 1 of a new session."""
        for p in self.procs.values():
            p.close()
        self.procs.clear()
        self.session, self.seq = None, 0
        self._clear_files()

    def _clear_files(self) -> None:
        for path in self.dir.iterdir():
            if STORE_FILE.fullmatch(path.name):
                path.unlink()

    def close(self) -> None:
        for p in self.procs.values():
            p.close()
        self.procs.clear()

    def process(self, vpid: int) -> _StoredProcess:
        """The stored pages of one process (created empty on first use)."""
        if vpid not in self.procs:
            self.procs[vpid] = _StoredProcess(self.dir, vpid)
        return self.procs[vpid]

    def check_head(self, head: dict[str, Any], kind: str) -> tuple[str, int]:
        """(session, seq) of a stream's HEAD, refused unless it is the `kind` this store expects next."""
        session, seq = head.get("session"), head.get("seq")
        if head["kind"] != kind:
            raise FORMAT.error(f"expected a {kind} stream, got {head['kind']}")
        if not isinstance(session, str) or not isinstance(seq, int):
            raise FORMAT.error("its HEAD frame has no session or sequence number")
        if self.session is None:
            if seq != 1:
                raise FORMAT.error(f"this store is empty and needs round 1 first, got {kind} {seq}")
        elif session != self.session:
            raise FORMAT.error("it belongs to another migration session")
        elif seq != self.seq + 1:
            raise FORMAT.error(f"expected {kind} {self.seq + 1}, got {seq}")
        return session, seq

    def apply(self, chunks: Iterable[bytes]) -> RoundStats:
        """Apply one round's stream.

        A stream from another session or out of sequence is refused untouched; one damaged after
        some of its pages were applied empties the store (see StreamError's hint).
        """
        stats = RoundStats("round", 0, time.monotonic())
        reader = FrameReader(chunks, FORMAT)
        session, stats.seq = self.check_head(reader.head(), "round")  # refused before any change
        try:
            for tag, payload in reader:
                if tag != b"PAGE":
                    raise FORMAT.error(f"a round stream cannot hold a {tag.decode()} frame")
                vpid, ds, dl, zs, zl, data = decode_pages(payload)
                proc = self.process(vpid)
                proc.ensure_slabs(np.concatenate((ds, ds + dl - 1, zs, zs + zl - 1)))
                proc.write(ds, dl, data)
                proc.zero(zs, zl)
                stats.pages_changed += int(dl.sum() + zl.sum())
                stats.pages_zero += int(zl.sum())
                stats.bytes_raw += len(data)
        except StreamError:
            self.reset()
            raise
        self.session, self.seq = session, stats.seq
        stats.bytes_out = reader.bytes_in
        stats.processes = len(self.procs)
        stats.duration = time.monotonic() - stats.started
        return stats

    def build_image(self, chunks: Iterable[bytes], image_dir: Path) -> RoundStats:
        """Write a complete image for `criu restore -D image_dir` from the final stream.

        Unchanged runs point at this store through image_dir/parent. A rejected stream leaves no
        image_dir behind; the store is untouched, so a fresh final stream may be sent again.
        """
        stats = RoundStats("final", 0, time.monotonic())
        try:
            image_dir.mkdir(parents=True)
        except FileExistsError:
            raise SkyferryError(f"{image_dir} already exists", hint="build each image into a new directory") from None
        try:
            self._build(chunks, image_dir, stats)
        except BaseException:
            shutil.rmtree(image_dir, ignore_errors=True)
            raise
        stats.duration = time.monotonic() - stats.started
        return stats

    def _build(self, chunks: Iterable[bytes], image_dir: Path, stats: RoundStats) -> None:
        reader = FrameReader(chunks, FORMAT)
        _, stats.seq = self.check_head(reader.head(), "final")
        files: dict[str, int] = {}
        pending: dict[int, _FinalPages] = {}
        try:
            for tag, payload in reader:
                if tag == b"FILE":
                    write_file_frame(payload, image_dir, files, stats)
                elif tag == b"PMAP":
                    fp = self._final_pagemap(payload, image_dir, stats)
                    if fp.vpid in pending:
                        raise FORMAT.error(f"two PMAP frames for pid {fp.vpid}")
                    pending[fp.vpid] = fp
                elif tag == b"PAGE":
                    vpid, ds, dl, _, _, data = decode_pages(payload)
                    if vpid not in pending:
                        raise FORMAT.error(f"pages for pid {vpid} before its PMAP frame")
                    pending[vpid].write(ds, dl, data)
                    stats.bytes_raw += len(data)
                else:
                    raise FORMAT.error(f"a final stream cannot hold a {tag.decode()} frame")
            for fp in pending.values():
                fp.finish()
        finally:
            for fd in files.values():
                os.close(fd)
            for fp in pending.values():
                fp.close()
        if stats.pages_parent:
            # Relative: CRIU's restored tasks read their pagemap after entering the container's root,
            # where an absolute host path does not exist; a relative link resolves through the image
            # directory's fd.
            rel = os.path.relpath(self.dir.resolve(), image_dir.resolve())
            (image_dir / "parent").symlink_to(rel)
        stats.bytes_out = reader.bytes_in
        stats.processes = len(pending)

    def _final_pagemap(self, payload: bytes, image_dir: Path, stats: RoundStats) -> _FinalPages:
        vpid, pages_id, digest, n = PMAP_HEAD.unpack_from(payload)
        off = PMAP_HEAD.size
        if len(payload) != off + n * 13:
            raise FORMAT.error("a PMAP frame is malformed")
        starts = np.frombuffer(payload, "<u8", n, off).astype(np.uint64)
        lens = np.frombuffer(payload, "<u4", n, off + 8 * n).astype(np.uint64)
        flags = np.frombuffer(payload, np.uint8, n, off + 12 * n)
        kinds = flags & 3
        parent = kinds == KIND_PARENT
        if parent.any():
            proc = self.procs.get(vpid)
            vpns = expand_runs(starts[parent], lens[parent])
            known = proc.hashes.get(vpns) if proc else np.zeros(len(vpns), np.uint64)
            if not known.all() or xxhash.xxh3_64_intdigest(known.astype("<u8").tobytes()) != digest:
                raise SkyferryError(
                    f"the target's copy of pid {vpid} differs from what the source sent",
                    hint="a round was lost or rejected; reset both sides and pre-copy again",
                )
            stats.pages_parent += len(vpns)
        # In-parent runs are plain PE_PARENT, as CRIU writes them; present runs keep PE_LAZY.
        entries = [
            memimage.Entry(
                int(s) << 12,
                int(k),
                memimage.PE_PARENT
                if f & 3 == KIND_PARENT
                else memimage.PE_PRESENT | (memimage.PE_LAZY if f & RUN_LAZY else 0),
            )
            for s, k, f in zip(starts, lens, flags, strict=True)
        ]
        memimage.write_pagemap(image_dir / f"pagemap-{vpid}.img", pages_id, entries)
        present = ~parent
        stats.pages_scanned += int(lens.sum())
        stats.pages_zero += int(lens[kinds == KIND_ZERO].sum())
        stats.pages_changed += int(lens[present].sum())
        return _FinalPages(
            vpid, memimage.pages_path(image_dir, pages_id), starts[present], lens[present], kinds[present]
        )


class _FinalPages:
    """The pages file of one process in the final image: PE_PRESENT runs in pagemap order."""

    def __init__(self, vpid: int, path: Path, starts: np.ndarray, lens: np.ndarray, kinds: np.ndarray) -> None:
        self.vpid = vpid
        self.starts = starts
        self.lens = lens
        self.kinds = kinds
        self.offsets = (np.cumsum(lens) - lens) * np.uint64(PAGE)
        self.missing = int(lens[kinds == KIND_DATA].sum())
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.ftruncate(self.fd, int(lens.sum()) * PAGE)  # zero runs stay holes

    def write(self, starts: np.ndarray, lens: np.ndarray, data: memoryview) -> None:
        pos = 0
        for start, n in zip(starts.tolist(), lens.tolist(), strict=True):
            while n:  # a run of data may span adjacent pagemap runs (adjacent dump entries)
                i = int(np.searchsorted(self.starts, start, "right")) - 1
                if i < 0 or start >= int(self.starts[i] + self.lens[i]) or self.kinds[i] != KIND_DATA:
                    raise FORMAT.error(f"pages for pid {self.vpid} at {start << 12:#x} are not due in its pagemap")
                k = min(n, int(self.starts[i] + self.lens[i]) - start)
                off = int(self.offsets[i]) + (start - int(self.starts[i])) * PAGE
                os.pwrite(self.fd, data[pos : pos + k * PAGE], off)
                pos += k * PAGE
                start += k
                n -= k
                self.missing -= k

    def finish(self) -> None:
        if self.missing:
            raise FORMAT.error(f"pid {self.vpid} is missing {self.missing} pages")

    def close(self) -> None:
        os.close(self.fd)


def file_frames(w: FrameWriter, path: Path, stats: RoundStats) -> Iterator[bytes]:
    """An image file as FILE frames (one even when it is empty)."""
    name = path.name.encode()
    with path.open("rb") as f:
        off = 0
        while True:
            piece = f.read(FILE_PIECE)
            if piece or off == 0:
                stats.bytes_files += len(piece)
                yield w.frame(b"FILE", FILE_HEAD.pack(len(name), off) + name + piece)
            if len(piece) < FILE_PIECE:
                return
            off += len(piece)


def write_file_frame(payload: bytes, image_dir: Path, files: dict[str, int], stats: RoundStats) -> None:
    """Write one FILE frame into `image_dir`; `files` holds the descriptors opened so far (close them)."""
    nlen, off = FILE_HEAD.unpack_from(payload)
    name = payload[FILE_HEAD.size : FILE_HEAD.size + nlen].decode()
    if not IMAGE_NAME.fullmatch(name) or name == "parent":
        raise FORMAT.error(f"bad image file name {name!r}")
    if name not in files:
        files[name] = os.open(image_dir / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    body = payload[FILE_HEAD.size + nlen :]
    os.pwrite(files[name], body, off)
    stats.bytes_files += len(body)
