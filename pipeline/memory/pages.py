"""What both sides of content-based pre-copy share: the memory stream's format, its PAGE and FILE frame
bodies, page hashes and the table of hashes the target holds (docs/precopy.md)."""

from __future__ import annotations

import itertools
import os
import re
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import xxhash
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.hostapi.framing import Format, FrameWriter
from skyferry.pipeline.memory.policy import RoundStats
from skyferry.pipeline.memory.procmem import PAGE, runs_of

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


# Every memory stream: rounds, the final, and hybrid's lazy final (its kind and CLEN frames).
FORMAT = Format(
    name="skyferry-precopy",
    version=2,
    kinds=frozenset({"round", "final", "lazy-final"}),
    tags=frozenset({b"PAGE", b"PMAP", b"FILE", b"CLEN"}),
    what="pre-copy stream",
    hint="nothing was restored from it; resend from a fresh round (SourceEngine.reset, TargetStore.reset)",
)


def check_head(fmt: Format, head: dict[str, Any], kind: str, session: str | None, seq: int) -> tuple[str, int]:
    """(session, seq) of a stream's HEAD, refused unless it is the `kind` that follows (session, seq):
    the same migration session (any, while none has started) and the next sequence number."""
    got_session, got_seq = head.get("session"), head.get("seq")
    if head["kind"] != kind:
        raise fmt.error(f"expected a {kind} stream, got {head['kind']}")
    if not isinstance(got_session, str) or not isinstance(got_seq, int):
        raise fmt.error("its HEAD frame has no session or sequence number")
    if session is not None and got_session != session:
        raise fmt.error("it belongs to another migration session")
    if got_seq != seq + 1:
        raise fmt.error(f"expected {kind} {seq + 1}, got {got_seq}")
    return got_session, got_seq


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
    # join reads the arrays' buffers: the page data is copied once, into the payload
    parts = (ds.astype("<u8"), dl.astype("<u4"), zs.astype("<u8"), zl.astype("<u4"), np.ascontiguousarray(data))
    return b"".join((PAGES_HEAD.pack(vpid, len(ds), len(zs)), *(a.reshape(-1).view(np.uint8) for a in parts)))


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
