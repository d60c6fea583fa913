"""A directory tree opened as a root: every path below it resolves as it would inside a chroot of it.

Image layers are hostile input: one entry may be a symlink `x -> /etc` (or `x -> ../../..`) and a later
entry may write, delete or whiteout `x/...`. Lookups here go through the kernel's openat2 with
RESOLVE_IN_ROOT (Linux >= 5.6): symlinks and `..` resolve inside the tree and can never name a host file,
whatever the path and however it was made. Only directories are resolved that way; the last component
is always acted on with *at calls that do not follow it (O_NOFOLLOW, AT_SYMLINK_NOFOLLOW). Python 3.11
has no openat2 binding, hence ctypes.
"""

import ctypes
import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

SYS_OPENAT2 = 437  # one number on every architecture: openat2 came after the syscall tables were unified
RESOLVE_NO_MAGICLINKS = 0x02  # /proc/self/fd/N-style links would leave the root
RESOLVE_IN_ROOT = 0x10
_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.syscall.restype = ctypes.c_long


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def openat2(dirfd: int, path: str, flags: int, resolve: int) -> int:
    """openat2(2); a lookup that raced a rename (EAGAIN under RESOLVE_IN_ROOT) is retried."""
    how = _OpenHow(flags | os.O_CLOEXEC, 0, resolve)
    raw = os.fsencode(path)
    while True:
        fd = _LIBC.syscall(
            ctypes.c_long(SYS_OPENAT2), ctypes.c_int(dirfd), ctypes.c_char_p(raw), ctypes.byref(how),
            ctypes.c_size_t(ctypes.sizeof(how)),
        )  # fmt: skip
        if fd >= 0:
            return int(fd)
        err = ctypes.get_errno()
        if err not in (errno.EAGAIN, errno.EINTR):
            raise OSError(err, os.strerror(err), path)


class Root:
    """`root.dir(rel)` is a directory below the root, `rel` resolved inside it (made when asked)."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> "Root":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self, rel: str, flags: int) -> int:
        """An fd of `rel` (a relative path, "" for the root itself), resolved inside the root."""
        return openat2(self.fd, rel or ".", flags, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)

    @contextmanager
    def dir(self, rel: str, create: bool = False, readable: bool = False) -> Iterator[int]:
        """An fd of directory `rel` (O_PATH unless `readable`, which also lets it be listed); with
        `create`, missing directories on the way are made (0755, as tar does), each inside the root."""
        flags = (os.O_RDONLY if readable else os.O_PATH) | os.O_DIRECTORY
        try:
            fd = self.open(rel, flags)
        except FileNotFoundError:
            if not create or not rel:
                raise
            parent, _, name = rel.rpartition("/")
            # FileExistsError: a dangling symlink is in the way; the lookup below fails, and says so.
            with self.dir(parent, create=True) as pfd, suppress(FileExistsError):
                os.mkdir(name, 0o755, dir_fd=pfd)
            fd = self.open(rel, flags)
        try:
            yield fd
        finally:
            os.close(fd)
