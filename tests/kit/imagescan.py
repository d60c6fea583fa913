"""Where CRIU checkpoint images are: every image below some roots, with the filesystem it sits on.

The engine tests prove "checkpoint images live on tmpfs only" with it: a `Watcher` walks the roots again
and again while a migration runs, `on_disk` names whatever it saw on a filesystem that is not tmpfs, and
what it saw on tmpfs is the positive control (it did look while images existed). Images come in two
shapes: CRIU's own files (pages-1.img, core-1.img, inventory.img, ...) and tar archives holding them
(Podman's export, containerd's content-store blobs), which are opened and listed.
"""

import os
import re
import stat
import tarfile
import threading
from pathlib import Path

from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.runtimes import engines

# CRIU's images, and Podman's archive of a container's /dev/shm (as private as its memory).
CRIU_IMAGE = re.compile(r"(pages|pagemap|core|mm)-\d+\.img|inventory\.img|devshm-checkpoint\.tar")
# Never opened: closing any descriptor of an SQLite file drops every POSIX lock this process holds on it,
# and the controller runs in this process (sqlite.org/howtocorrupt.html, 2.2). It corrupted the journal.
SQLITE = re.compile(r".*\.db(-wal|-shm|-journal)?")
POLL_S = 0.02


def images(roots: list[Path]) -> dict[Path, str]:
    """Every CRIU image file, or tar holding one, below `roots`: path -> filesystem type."""
    found: dict[Path, str] = {}
    for root in roots:
        for dirpath, _, filenames in os.walk(root):
            for name in filenames:
                path = Path(dirpath, name)
                try:
                    if CRIU_IMAGE.fullmatch(name) or (not SQLITE.fullmatch(name) and _holds_images(path)):
                        found[path] = engines.fstype(path)
                except (OSError, tarfile.TarError, EOFError, SkyferryError):
                    continue  # removed, still being written, or its tmpfs unmounted, while we looked
    return found


def _holds_images(path: Path) -> bool:
    if not stat.S_ISREG(path.lstat().st_mode):  # never a FIFO: containerd's stdio FIFOs would block a read
        return False
    with open(path, "rb") as f:
        head = f.read(512)
    if len(head) < 512 or head[257:262] != b"ustar":  # only tars are opened
        return False
    with tarfile.open(path) as tar:
        return any(CRIU_IMAGE.fullmatch(Path(n).name) for n in tar.getnames())


def on_disk(seen: dict[Path, str]) -> list[str]:
    return sorted(f"{path} ({fs})" for path, fs in seen.items() if fs != "tmpfs")


class Watcher:
    """`with Watcher(roots) as w:` collects in `w.seen` every image that exists below `roots` at any of
    its polls while the block runs (one poll at the start and one at the end at least)."""

    def __init__(self, roots: list[Path]) -> None:
        self.roots = roots
        self.seen: dict[Path, str] = {}
        self.polls = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="imagescan", daemon=True)

    def _poll(self) -> None:
        for path, fs in images(self.roots).items():
            self.seen.setdefault(path, fs)
        self.polls += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            self._poll()
            self._stop.wait(POLL_S)

    def __enter__(self) -> "Watcher":
        self._poll()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._poll()


def distinct(paths: list[Path]) -> list[Path]:
    """`paths` without those inside another one (each tree is walked once)."""
    resolved = sorted({p.resolve() for p in paths})
    return [p for p in resolved if not any(q != p and q in p.parents for q in resolved)]
