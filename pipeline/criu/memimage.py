"""CRIU's task memory images: pagemap-<pid>.img (which pages, where) and pages-<id>.img (raw bytes).

A pagemap starts with a head naming its pages file, then entries (vaddr, nr_pages, flags) in
ascending vaddr. Entries flagged PE_PRESENT take the next nr_pages pages of the pages file, in
order; PE_PARENT entries are read from the same vaddrs in the image directory that the `parent`
symlink points to. Read and written through pycriu.images.
"""

from __future__ import annotations

import bisect
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pycriu.images
from skyferry.pipeline.errors import SkyferryError

PAGE = 4096
PE_PARENT = 1
PE_LAZY = 2
PE_PRESENT = 4
TASK_PAGEMAP = re.compile(r"pagemap-(\d+)\.img")


@dataclass(frozen=True)
class Entry:
    vaddr: int
    nr_pages: int
    flags: int


def task_pagemaps(image_dir: Path) -> dict[int, Path]:
    """Per-task pagemaps by pid (shared-memory pagemaps, pagemap-shmem-*, are not task memory)."""
    out = {}
    for p in image_dir.iterdir():
        m = TASK_PAGEMAP.fullmatch(p.name)
        if m:
            out[int(m.group(1))] = p
    return dict(sorted(out.items()))


def read_pagemap(path: Path) -> tuple[int, list[Entry]]:
    """(pages_id, entries) of one pagemap image."""
    with path.open("rb") as f:
        img = pycriu.images.load(f)
    head, *rest = img["entries"]
    entries = []
    for e in rest:
        nr = int(e.get("nr_pages", e["compat_nr_pages"]))
        flags = int(e["flags"]) if "flags" in e else (PE_PARENT if e.get("in_parent") else PE_PRESENT)
        entries.append(Entry(int(e["vaddr"]), nr, flags))
    return int(head["pages_id"]), entries


def write_pagemap(path: Path, pages_id: int, entries: list[Entry]) -> None:
    items: list[dict[str, int]] = [{"pages_id": pages_id}]
    for e in entries:
        items.append(
            {"vaddr": e.vaddr, "compat_nr_pages": min(e.nr_pages, 0xFFFFFFFF), "nr_pages": e.nr_pages, "flags": e.flags}
        )
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        pycriu.images.dump({"magic": "PAGEMAP", "entries": items}, f)
    tmp.rename(path)


def pages_path(image_dir: Path, pages_id: int) -> Path:
    return image_dir / f"pages-{pages_id}.img"


class PageImage:
    """Random access to one task's pages in an image directory, parents resolved.

    For checks and tools: `image_pages` reads every byte, so it is not for the freeze path.
    """

    def __init__(self, image_dir: Path, pid: int) -> None:
        self.dir = image_dir
        self.pid = pid
        self.entries: list[Entry] = []
        self.offsets: list[int] = []
        self.pages_file: Path | None = None
        pm = image_dir / f"pagemap-{pid}.img"
        if pm.exists():
            pages_id, self.entries = read_pagemap(pm)
            self.pages_file = pages_path(image_dir, pages_id)
            off = 0
            for e in self.entries:
                self.offsets.append(off)
                if e.flags & PE_PRESENT and not e.flags & PE_PARENT:
                    off += e.nr_pages * PAGE
        parent = image_dir / "parent"
        self.parent = PageImage(parent, pid) if parent.exists() else None

    def read(self, vaddr: int, nr: int) -> bytes:
        """`nr` pages from `vaddr`, which the pagemap (or a parent's) must cover."""
        out = bytearray()
        end = vaddr + nr * PAGE
        i = max(bisect.bisect_right([e.vaddr for e in self.entries], vaddr) - 1, 0)
        while vaddr < end:
            e = self.entries[i] if i < len(self.entries) else None
            if e is None or not e.vaddr <= vaddr < e.vaddr + e.nr_pages * PAGE:
                raise SkyferryError(f"image {self.dir} has no page at {vaddr:#x} for pid {self.pid}")
            n = min(end, e.vaddr + e.nr_pages * PAGE) - vaddr
            if e.flags & PE_PARENT:
                if self.parent is None:
                    raise SkyferryError(f"image {self.dir} needs a parent image and has none")
                out += self.parent.read(vaddr, n // PAGE)
            else:
                assert self.pages_file is not None
                with self.pages_file.open("rb") as f:
                    data = os.pread(f.fileno(), n, self.offsets[i] + vaddr - e.vaddr)
                if len(data) != n:
                    raise SkyferryError(f"{self.pages_file} is shorter than its pagemap says")
                out += data
            vaddr += n
            i += 1
        return bytes(out)


def image_pages(image_dir: Path, pid: int) -> Iterator[tuple[int, bytes]]:
    """(vaddr, bytes) of every run of pages the restore of `pid` would write, in order."""
    img = PageImage(image_dir, pid)
    for e in img.entries:
        if e.flags & (PE_PRESENT | PE_PARENT):
            yield e.vaddr, img.read(e.vaddr, e.nr_pages)
