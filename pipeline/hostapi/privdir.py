"""Paths an agent (root) uses where someone else may have been first.

Checkpoint images live under /dev/shm/skyferry: tmpfs, but in a world-writable directory, so any local
user could create that name first, as a symlink to /etc or as a directory of their own, and have root
write images into it or `rmtree` through it. Each directory from there down is made 0700 and, before
use, checked: a real directory (not a symlink), owned by root (this process's user), no access for
anyone else. A directory failing that is refused, never repaired by following it.

A container's own files are the same kind of place: its log lives in its rootfs, where the container may
replace it with a symlink to any host file. `read_beneath` opens such a file one component at a time
with O_NOFOLLOW, so it never leaves the rootfs.
"""

import contextlib
import errno
import os
import stat
from pathlib import Path, PurePosixPath

from skyferry.pipeline.errors import SkyferryError


def ensure(path: Path, below: Path) -> Path:
    """Make `path` and every directory between `below` and it, each 0700 and checked; returns `path`."""
    for step in _steps(path, below):
        with contextlib.suppress(FileExistsError):  # checked below, whoever made it
            step.mkdir(mode=0o700)
        _check(step)
    return path


def verified(path: Path, below: Path) -> bool:
    """Whether `path` exists with every directory between `below` and it passing the check (raises if
    one fails it: then nothing there may be removed or used)."""
    for step in _steps(path, below):
        if not os.path.lexists(step):
            return False
        _check(step)
    return True


def _steps(path: Path, below: Path) -> list[Path]:
    parts = path.relative_to(below).parts
    return [below.joinpath(*parts[: i + 1]) for i in range(len(parts))]


def _check(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise _refused(path, "is a symlink or not a directory") from None
        raise
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():
            raise _refused(path, f"is owned by uid {st.st_uid}")
        if st.st_mode & 0o077:
            os.fchmod(fd, 0o700)  # ours already (an older version made it 0755): only tighten it
    finally:
        os.close(fd)


def _refused(path: Path, why: str) -> SkyferryError:
    return SkyferryError(
        f"refusing to use {path}: it {why}",
        hint=f"someone else made it; check what it is, remove it (rm -r {path}) and start the agent again",
    )


def read_beneath(root: Path, relative: str) -> bytes | None:
    """The regular file at `relative` inside directory `root`, never following a symlink on the way;
    None when it does not exist. A symlink, a FIFO, a device or a hard link is refused."""
    parts = PurePosixPath(relative).parts
    if not parts or any(p in ("/", "..", ".") for p in parts):
        raise ValueError(f"not a plain relative path: {relative!r}")
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in parts[:-1]:
            fd = _step(fd, part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, root, relative)
        fd = _step(fd, parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY, root, relative)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            raise SkyferryError(f"{relative} in {root} is not a plain file; not read")
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None
    finally:
        os.close(fd)


def _step(dir_fd: int, name: str, flags: int, root: Path, relative: str) -> int:
    """Open `name` in `dir_fd`, then close `dir_fd` (on failure the caller still holds it and closes it)."""
    try:
        fd = os.open(name, flags, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):  # a symlink, or a file where a directory should be
            raise SkyferryError(f"{relative} in {root} goes through a symlink; not followed") from None
        raise
    os.close(dir_fd)
    return fd
