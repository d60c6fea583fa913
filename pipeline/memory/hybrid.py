"""Hybrid mode: pre-copy rounds, then a lazy final round.

Inside the freeze the source reads its frozen memory once (`freeze_scan`, alongside CRIU's lazy dump)
and tells the target which pages its pre-copy store holds unchanged: the clean map (`lazy_final`). The
changed pages go along too, as many as the link moves in EAGER_S; only the rest is left to fetch lazily.
CRIU dumps everything but the anonymous memory (`--lazy-pages`), so no page is written or read inside
the freeze. The target checks the map against its store (`accept_lazy_final`) and restores at once;
CRIU's lazy-pages daemon then gets clean pages from the store and the rest, the pages that changed
since the last round, from the source's page server (`lazyproxy.LazyProxy`).

Stream: HEAD ("lazy-final"), FILE frames (every image file of the lazy dump), one CLEN frame per
process (its clean page runs and a digest of the hashes the source believes the target holds), PAGE
frames (the eager changed pages, as in a pre-copy round), END.
"""

from __future__ import annotations

import functools
import os
import shutil
import struct
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import xxhash
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.hostapi.framing import FrameReader, FrameWriter
from skyferry.pipeline.memory.pages import (
    FORMAT,
    FRAME_PAGES,
    HashTable,
    Transfer,
    decode_pages,
    encode_pages,
    expand_runs,
    file_frames,
    page_hashes,
    write_file_frame,
)
from skyferry.pipeline.memory.policy import RoundStats
from skyferry.pipeline.memory.precopy import SourceEngine
from skyferry.pipeline.memory.prediction import EAGER_S
from skyferry.pipeline.memory.procmem import PAGE, MemReader, process_tree, runs_of
from skyferry.pipeline.memory.store import TargetStore

CLEAN_HEAD = struct.Struct("<IQI")  # vpid, digest of the clean pages' hashes, runs
KIND = "lazy-final"


@dataclass
class FreezeScan:
    """What the frozen tree holds, against the target's store: per vpid the clean page numbers, and the
    changed pages small enough in total to send inside the freeze (the rest goes lazily)."""

    clean: dict[int, np.ndarray] = field(default_factory=dict)
    eager: list[tuple[int, np.ndarray, np.ndarray]] = field(default_factory=list)  # (vpid, vpns, pages)
    eager_bytes: int = 0


def eager_budget(history: list[RoundStats]) -> int:
    """Bytes of changed pages worth sending inside the freeze: what round 1 moved in EAGER_S."""
    if not history:
        return 0
    first = history[0]
    return int(first.bytes_raw / max(first.duration, 1e-6) * EAGER_S)


def freeze_scan(engine: SourceEngine) -> FreezeScan:
    """Read the frozen tree once: the pages whose content the target's store holds are clean; changed
    ones are kept for the freeze-time stream up to `eager_budget`, and the target fetches the rest lazily."""
    scan, room, lock = FreezeScan(), eager_budget(engine.history) // PAGE, threading.Lock()

    def chunk(table: HashTable, vpns: np.ndarray, pages: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        nonlocal room  # in a MemReader thread: the eager pages' budget is shared
        same = page_hashes(pages) == table.get(vpns)
        with lock:
            eager = np.flatnonzero(~same)[:room]
            room -= len(eager)
        return vpns[same], vpns[eager], pages[eager]  # copied: the buffer is reused

    for proc in process_tree(engine.root_pid):
        clean = []
        table = engine.tables.get(proc.vpid, HashTable())
        for clean_vpns, eager_vpns, eager in MemReader(proc.pid, engine.bufs).map(functools.partial(chunk, table)):
            clean.append(clean_vpns)
            if len(eager_vpns):
                scan.eager.append((proc.vpid, eager_vpns, eager))
                scan.eager_bytes += len(eager_vpns) * PAGE
        scan.clean[proc.vpid] = np.concatenate(clean) if clean else np.empty(0, np.uint64)
    return scan


def lazy_final(engine: SourceEngine, dump_dir: Path, scan: FreezeScan) -> Transfer:
    """The freeze-time stream after a lazy dump into `dump_dir`: its image files, the clean map and the
    eager pages."""
    stats = RoundStats("final", engine.seq + 1, time.monotonic())
    return Transfer(stats, _frames(engine, dump_dir, scan, stats), lambda: None)


def _frames(engine: SourceEngine, dump_dir: Path, scan: FreezeScan, stats: RoundStats) -> Iterator[bytes]:
    w = FrameWriter(FORMAT, engine.level)
    yield w.head(KIND, session=engine.session, seq=stats.seq)
    for path in sorted(dump_dir.iterdir()):
        if path.suffix != ".log" and path.is_file() and not path.is_symlink():
            yield from file_frames(w, path, stats)
    for vpid, vpns in scan.clean.items():
        starts, lens = runs_of(vpns)
        digest = xxhash.xxh3_64_intdigest(engine.tables.get(vpid, HashTable()).get(vpns).astype("<u8").tobytes())
        stats.processes += 1
        stats.pages_parent += len(vpns)
        yield w.frame(
            b"CLEN",
            CLEAN_HEAD.pack(vpid, digest, len(starts)) + starts.astype("<u8").tobytes() + lens.astype("<u4").tobytes(),
        )
    empty = np.empty(0, np.uint64)
    for vpid, vpns, pages in scan.eager:
        stats.pages_changed += len(vpns)
        stats.bytes_raw += len(vpns) * PAGE
        for a in range(0, len(vpns), FRAME_PAGES):
            yield w.frame(b"PAGE", encode_pages(vpid, vpns[a : a + FRAME_PAGES], pages[a : a + FRAME_PAGES], empty))
    stats.bytes_out = w.bytes_out
    yield w.end(stats.as_dict())
    stats.bytes_out = w.bytes_out


def accept_lazy_final(
    store: TargetStore, chunks: Iterable[bytes], image_dir: Path
) -> tuple[RoundStats, dict[int, HashTable]]:
    """Write the lazy dump's files into `image_dir` and check the clean map against the store.

    Returns the stats and, per vpid, the clean pages (value 1 in a HashTable). A map that disagrees
    with the store is refused before anything restores, so the migration rolls back.
    """
    stats = RoundStats("final", 0, time.monotonic())
    try:
        image_dir.mkdir(parents=True)
    except FileExistsError:
        raise SkyferryError(f"{image_dir} already exists", hint="accept each final into a new directory") from None
    files: dict[str, int] = {}
    clean: dict[int, HashTable] = {}
    try:
        reader = FrameReader(chunks, FORMAT)
        _, stats.seq = store.check_head(reader.head(), KIND)
        for tag, payload in reader:
            if tag == b"FILE":
                write_file_frame(payload, image_dir, files, stats)
            elif tag == b"CLEN":
                vpid, vpns = _check_clean(store, payload)
                if vpid in clean:
                    raise FORMAT.error(f"two CLEN frames for pid {vpid}")
                clean[vpid] = HashTable()
                clean[vpid].set(vpns, np.ones(len(vpns), np.uint64))
                stats.pages_parent += len(vpns)
            elif tag == b"PAGE":  # changed pages sent inside the freeze: into the store, and clean from now
                vpid, starts, lens, _, _, data = decode_pages(payload)
                proc = store.process(vpid)
                proc.ensure_slabs(np.concatenate((starts, starts + lens - 1)))
                proc.write(starts, lens, data)
                vpns = expand_runs(starts, lens)
                clean.setdefault(vpid, HashTable()).set(vpns, np.ones(len(vpns), np.uint64))
                stats.pages_changed += len(vpns)
                stats.bytes_raw += len(data)
            else:
                raise FORMAT.error(f"a lazy final stream cannot hold a {tag.decode()} frame")
    except BaseException:
        shutil.rmtree(image_dir, ignore_errors=True)
        raise
    finally:
        for fd in files.values():
            os.close(fd)
    stats.bytes_out = reader.bytes_in
    stats.processes = len(clean)
    stats.duration = time.monotonic() - stats.started
    return stats, clean


def _check_clean(store: TargetStore, payload: bytes) -> tuple[int, np.ndarray]:
    vpid, digest, n = CLEAN_HEAD.unpack_from(payload)
    off = CLEAN_HEAD.size
    if len(payload) != off + n * 12:
        raise FORMAT.error("a CLEN frame is malformed")
    starts = np.frombuffer(payload, "<u8", n, off).astype(np.uint64)
    lens = np.frombuffer(payload, "<u4", n, off + 8 * n).astype(np.uint64)
    vpns = expand_runs(starts, lens)
    proc = store.procs.get(vpid)
    known = proc.hashes.get(vpns) if proc else np.zeros(len(vpns), np.uint64)
    if not known.all() or xxhash.xxh3_64_intdigest(known.astype("<u8").tobytes()) != digest:
        raise SkyferryError(
            f"the target's copy of pid {vpid} differs from what the source sent",
            hint="a round was lost or rejected; reset both sides and pre-copy again",
        )
    return vpid, vpns
