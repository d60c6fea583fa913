"""A process spinning in a cgroup of its own, on this machine's real hierarchy (v1: one directory per
controller it names; v2: one), removed with the process at the end."""

import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from skyferry.pipeline.runtimes.freezer import CGROUP

V2 = (CGROUP / "cgroup.controllers").exists()


@contextmanager
def spinning(prefix: str, v1_controllers: list[str]) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Yields the cgroup's path (as runc's cgroupsPath names it) and the process spinning in it."""
    name = f"/{prefix}-{os.getpid()}-{os.urandom(3).hex()}"
    dirs = [CGROUP / name.strip("/")] if V2 else [CGROUP / c / name.strip("/") for c in v1_controllers]
    proc = subprocess.Popen(["/bin/sh", "-c", "while :; do :; done"])
    try:
        for d in dirs:
            d.mkdir()
            (d / "cgroup.procs").write_text(str(proc.pid))
        yield name, proc
    finally:
        proc.kill()
        proc.wait()
        for d in dirs:
            _rmdir(d)


def _rmdir(d: Path) -> None:
    for _ in range(50):  # the killed process leaves its cgroup a moment later
        try:
            d.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.1)


def remove_tree(path: str) -> None:
    """Remove cgroup `path` (as runc's cgroupsPath) and every cgroup below it, in every hierarchy."""
    roots = [CGROUP] if V2 else [d for d in CGROUP.iterdir() if d.is_dir() and not d.is_symlink()]
    for root in roots:
        top = root / path.strip("/")
        if top.is_dir():
            for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
                _rmdir(d)
            _rmdir(top)
