"""CRIU's own account of a dump or pre-dump: the `stats-dump` image it leaves in its work directory (the
image directory unless a work directory is given, as runc's --work-path does), read through pycriu.
Soft-dirty pre-copy feeds these numbers to the round policy (memory/predump.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pycriu.images
from skyferry.pipeline.errors import SkyferryError

STATS_FILE = "stats-dump"


@dataclass(frozen=True)
class DumpStats:
    """Counts in pages, times in microseconds, as CRIU writes them (private and shared memory added up)."""

    pages_scanned: int  # pages CRIU looked at
    pages_written: int  # pages it wrote into this image (dirty since the parent, or all without one)
    pages_skipped_parent: int  # pages left in the parent image: not written since
    frozen_us: int  # how long the tasks stayed frozen (a pre-dump resumes them before writing pages)
    memdump_us: int  # collecting the pages into pipes, inside the freeze
    memwrite_us: int  # writing them out, after it


def parse(entry: dict[str, int]) -> DumpStats:
    """From a `dump_stats_entry` as pycriu decodes it (its optional counters may be absent)."""
    return DumpStats(
        pages_scanned=entry.get("pages_scanned", 0) + entry.get("shpages_scanned", 0),
        pages_written=entry.get("pages_written", 0) + entry.get("shpages_written", 0),
        pages_skipped_parent=entry.get("pages_skipped_parent", 0) + entry.get("shpages_skipped_parent", 0),
        frozen_us=entry.get("frozen_time", 0),
        memdump_us=entry.get("memdump_time", 0),
        memwrite_us=entry.get("memwrite_time", 0),
    )


def read(work_dir: Path) -> DumpStats:
    """The stats of the dump or pre-dump whose work directory was `work_dir`."""
    path = work_dir / STATS_FILE
    try:
        with path.open("rb") as f:
            image = pycriu.images.load(f)
    except (OSError, pycriu.images.MagicException) as exc:
        raise SkyferryError(f"no CRIU dump statistics in {work_dir}: {exc}", hint="see the CRIU dump log") from None
    dump = image["entries"][0].get("dump") if image.get("entries") else None
    if dump is None:
        raise SkyferryError(f"{path} holds no dump statistics", hint="see the CRIU dump log")
    return parse(dump)
