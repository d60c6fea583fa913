"""Soft-dirty pre-copy: CRIU's own iterative pre-dump, each round's image files streamed to the target,
which keeps the rounds as a chain of parent images and restores from it (docs/precopy.md#soft-dirty).

Source side (`PredumpSource`, next to the running container):
    chain = PredumpSource(rounds_dir, pre_dump)   # pre_dump(images, parent): CRIU pre-dump --track-mem,
                                                  #   returns the directory CRIU wrote stats-dump into
    while True:
        send(chain.round())                       # round k: rounds/k, parent ../k-1 (pages written since)
        if policy.decide(chain.history).stop: break
    freeze; dump into dump_dir with parent chain.parent_for(dump_dir), CRIU's work dir work_dir
    send(chain.final(dump_dir, work_dir))         # every file of the dump: its pages are the last delta

Target side (`PredumpTarget`):
    target = PredumpTarget(rounds_dir)
    target.apply(chunks)                          # rounds/k, with parent -> ../k-1
    target.build_image(final_chunks, image_dir)   # image_dir/parent -> the last round; criu restore -D image_dir

The kernel's soft-dirty bits tell CRIU which pages were written since the last (pre-)dump, so a round
costs CRIU's scan of the page tables, not a hash of every page. What CRIU needs of a parent when it
dumps (`--prev-images-dir`): its inventory (to see the pids were not reused) and its pagemaps (whether a
clean page is in the parent chain); it opens the parent's pages files but never reads them. So once a
round is on the target, the source truncates that round's pages files and keeps the rest (a few KiB).
The target needs the whole chain: a page last written in round 1 is read from round 1 at the restore.
"""

from __future__ import annotations

import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from skyferry.pipeline.criu import dumpstats
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.hostapi.framing import Format, FrameReader, FrameWriter
from skyferry.pipeline.memory.pages import Transfer, check_head, file_frames, write_file_frame
from skyferry.pipeline.memory.policy import PAGE, RoundStats

FORMAT = Format(
    name="skyferry-predump",
    version=1,
    kinds=frozenset({"round", "final"}),
    tags=frozenset({b"FILE"}),
    what="pre-dump stream",
    hint="nothing was restored from it; the migration rolls back, run it again",
)
PARENT = "parent"  # CRIU's name for the link to the parent image directory

# (image dir, parent relative to it or None) -> CRIU's work dir, where it leaves stats-dump and its log
PreDump = Callable[[Path, str | None], Path]


class PredumpSource:
    """The source side: one CRIU pre-dump per round in `directory`/<seq>, and the final dump's stream."""

    def __init__(self, directory: Path, pre_dump: PreDump, level: int = 1) -> None:
        self.dir = directory
        self.pre_dump = pre_dump
        self.level = level
        self.session = secrets.token_hex(8)
        self.seq = 0
        self.history: list[RoundStats] = []
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)

    def parent_for(self, image_dir: Path) -> str | None:
        """The last round sent, relative to `image_dir` (CRIU resolves `parent` from the image directory);
        None before the first round."""
        if not self.seq:
            return None
        return os.path.relpath(self.dir / str(self.seq), image_dir)

    def round(self) -> Transfer:
        """Pre-dump the running container, then return the stream of the round's image files. The dump runs
        here, not in the stream: a failed pre-dump raises before anything is sent."""
        seq = self.seq + 1
        stats = RoundStats("round", seq, time.monotonic())
        images = self.dir / str(seq)
        shutil.rmtree(images, ignore_errors=True)  # a round repeated after a failed stream starts clean
        images.mkdir()
        work = self.pre_dump(images, self.parent_for(images))

        def commit() -> None:
            _drop_pages(images)  # on the target now; CRIU's next pre-dump reads only the pagemaps
            self.seq = seq
            self.history.append(stats)

        return Transfer(stats, self._frames("round", images, work, stats), commit)

    def final(self, dump_dir: Path, work: Path) -> Transfer:
        """The freeze-time stream: every file of the final dump, made with `parent_for(dump_dir)` and
        CRIU's work dir `work`."""
        stats = RoundStats("final", self.seq + 1, time.monotonic())
        return Transfer(stats, self._frames("final", dump_dir, work, stats), lambda: None)

    def _frames(self, kind: str, images: Path, work: Path, stats: RoundStats) -> Iterator[bytes]:
        counted = dumpstats.read(work)
        stats.processes = sum(1 for p in images.glob("pagemap-*.img") if not p.name.startswith("pagemap-shmem"))
        stats.pages_scanned = counted.pages_scanned
        stats.pages_changed = counted.pages_written
        stats.pages_parent = counted.pages_skipped_parent
        stats.bytes_raw = counted.pages_written * PAGE
        stats.frozen_ms = round(counted.frozen_us / 1000, 3)
        w = FrameWriter(FORMAT, self.level)
        yield w.head(kind, session=self.session, seq=stats.seq)
        for path in sorted(images.iterdir()):
            if path.suffix == ".log" or path.is_symlink() or not path.is_file():
                continue
            yield from file_frames(w, path, stats)
        stats.bytes_out = w.bytes_out
        yield w.end(stats.as_dict())
        stats.bytes_out = w.bytes_out


def _drop_pages(images: Path) -> None:
    for path in images.glob("pages-*.img"):
        os.truncate(path, 0)


class PredumpTarget:
    """The target side: the rounds received so far, in `directory`/<seq>, each the parent of the next."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        shutil.rmtree(self.dir, ignore_errors=True)  # a left-over chain is never a parent
        self.dir.mkdir(parents=True)
        self.session: str | None = None
        self.seq = 0

    def _check_head(self, head: dict[str, Any], kind: str) -> tuple[str, int]:
        if kind == "final" and self.session is None:
            raise FORMAT.error("no round came before it")
        return check_head(FORMAT, head, kind, self.session, self.seq)

    def apply(self, chunks: Iterable[bytes]) -> RoundStats:
        """Keep one round as rounds/<seq>, its parent the round before. A refused or damaged stream
        leaves nothing behind; the rounds before it stay as they were."""
        stats = RoundStats("round", 0, time.monotonic())
        reader = FrameReader(chunks, FORMAT)
        session, stats.seq = self._check_head(reader.head(), "round")
        images = self.dir / str(stats.seq)
        shutil.rmtree(images, ignore_errors=True)
        images.mkdir()
        try:
            self._write(reader, images, stats)
            if stats.seq > 1:
                (images / PARENT).symlink_to(f"../{stats.seq - 1}")
        except BaseException:
            shutil.rmtree(images, ignore_errors=True)
            raise
        self.session, self.seq = session, stats.seq
        stats.duration = time.monotonic() - stats.started
        return stats

    def build_image(self, chunks: Iterable[bytes], image_dir: Path) -> RoundStats:
        """Write the final dump into `image_dir` for `criu restore -D image_dir`, its parent the last round.
        A refused stream leaves no `image_dir`; the rounds stay, so a fresh final may be sent again."""
        stats = RoundStats("final", 0, time.monotonic())
        try:
            image_dir.mkdir(parents=True)
        except FileExistsError:
            raise SkyferryError(f"{image_dir} already exists", hint="build each image into a new directory") from None
        try:
            reader = FrameReader(chunks, FORMAT)
            _, stats.seq = self._check_head(reader.head(), "final")
            self._write(reader, image_dir, stats)
            # Relative: CRIU's restored tasks open their pages after entering the container's root, where
            # an absolute host path does not exist; a relative link resolves through the directory's fd.
            rel = os.path.relpath(self.dir / str(self.seq), image_dir)
            (image_dir / PARENT).symlink_to(rel)
        except BaseException:
            shutil.rmtree(image_dir, ignore_errors=True)
            raise
        stats.duration = time.monotonic() - stats.started
        return stats

    def _write(self, reader: FrameReader, images: Path, stats: RoundStats) -> None:
        files: dict[str, int] = {}
        try:
            for _, payload in reader:  # FILE frames only: the reader refuses any other tag
                write_file_frame(payload, images, files, stats)
        finally:
            for fd in files.values():
                os.close(fd)
        stats.bytes_out = reader.bytes_in
