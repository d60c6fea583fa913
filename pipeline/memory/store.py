"""The target side of content-based pre-copy: the page store, kept as a CRIU parent image, and the
restorable image built from it and the final delta (docs/precopy.md)."""

from __future__ import annotations

import ctypes
import os
import shutil
import socket
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import xxhash
from skyferry.pipeline.criu import memimage
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.hostapi.framing import FrameReader, StreamError
from skyferry.pipeline.memory.pages import (
    FORMAT,
    KIND_DATA,
    KIND_PARENT,
    KIND_ZERO,
    PMAP_HEAD,
    RUN_LAZY,
    SLAB_BYTES,
    SLAB_PAGES,
    SLAB_SHIFT,
    STORE_FILE,
    ZERO_HASH,
    HashTable,
    check_head,
    decode_pages,
    expand_runs,
    page_hashes,
    write_file_frame,
)
from skyferry.pipeline.memory.policy import RoundStats
from skyferry.pipeline.memory.procmem import PAGE

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 1, 2


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
        return check_head(FORMAT, head, kind, self.session, self.seq)

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
