"""Files under a write lease (fcntl F_SETLEASE, F_WRLCK), read without breaking the lease.

Any open of such a file by another process breaks the lease: the kernel sends the holder SIGIO, whose
default action ends it, and the open blocks for /proc/sys/fs/lease-break-time (45 s) or, with O_NONBLOCK,
fails at once. A file round that opened it killed zdtm's `file_lease00` in pre-copy, and stop-copy's tar
waited out the 45 s inside the freeze. A read lease breaks only on an open for writing, which the movers
never do. So a file under a write lease is read through the holder's own open file, duplicated with
pidfd_getfd(2) and read with pread (the holder's offset stays put): no new open, nothing broken. A
holder that has it open write-only leaves no way to read it; an empty file needs no read.
"""

import contextlib
import ctypes
import io
import os
from pathlib import Path

from skyferry.pipeline.errors import SkyferryError

SYS_PIDFD_GETFD = 438  # x86_64 and every architecture with the unified syscall table
_LIBC = ctypes.CDLL(None, use_errno=True)

Leases = dict[tuple[int, int], set[int]]  # (st_dev, st_ino) of a file under a write lease -> holder pids


def write_leases(locks: Path = Path("/proc/locks")) -> Leases:
    """Every file under a write lease on this machine, with the pids holding it (in our pid namespace).

    A line reads `3: LEASE  ACTIVE    WRITE 4242 00:2d:1312 0 EOF` (major and minor in hex); blocked
    waiters (`->`) and other lock types do not matter here."""
    found: Leases = {}
    with contextlib.suppress(FileNotFoundError):
        for line in locks.read_text().splitlines():
            fields = line.split()
            if len(fields) < 6 or fields[1] != "LEASE" or fields[3] == "READ":
                continue
            major, minor, ino = fields[5].split(":")
            dev = os.makedev(int(major, 16), int(minor, 16))
            found.setdefault((dev, int(ino)), set()).add(int(fields[4]))
    return found


def reader(path: Path, st: os.stat_result, leases: Leases) -> io.RawIOBase | None:
    """How to read regular file `path` (lstat `st`): None when it may simply be opened, else a reader
    that breaks no lease. Raises when the file cannot be read without breaking one."""
    holders = leases.get((st.st_dev, st.st_ino))
    if holders is None:
        return None
    for pid in sorted(holders):
        fd = _readable_fd(pid, st)
        if fd is not None:
            return PReader(fd)
    if st.st_size == 0:  # nothing to read: an O_PATH fd (fstat only) opens nothing a lease sees
        return PReader(os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC))
    raise SkyferryError(
        f"{path} is under a write lease of pid {', '.join(map(str, sorted(holders)))}, open write-only: it "
        "cannot be read without breaking the lease (the kernel would signal and end its holder)",
        hint="move the container with its lease released, or open the leased file read-write in the program",
    )


def _readable_fd(pid: int, st: os.stat_result) -> int | None:
    """A duplicate of one of `pid`'s fds of that file opened for reading; None if it has none."""
    fds = Path(f"/proc/{pid}/fd")
    with contextlib.suppress(FileNotFoundError, ProcessLookupError, PermissionError):
        for entry in os.listdir(fds):
            with contextlib.suppress(OSError):
                target = os.stat(fds / entry)  # stat follows the magic link without opening the file
                if (target.st_dev, target.st_ino) != (st.st_dev, st.st_ino):
                    continue
                flags = int(_fdinfo(pid, entry).get("flags", "1"), 8)
                if flags & os.O_ACCMODE == os.O_WRONLY:
                    continue
                pidfd = os.pidfd_open(pid)
                try:
                    fd = _LIBC.syscall(ctypes.c_long(SYS_PIDFD_GETFD), pidfd, int(entry), 0)
                finally:
                    os.close(pidfd)
                if fd >= 0:
                    return int(fd)
    return None


def _fdinfo(pid: int, fd: str) -> dict[str, str]:
    text = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}


class PReader(io.RawIOBase):
    """A read-only file over an fd shared with another process: pread at our own offset, so the other
    process's file position never moves. Closes the fd."""

    def __init__(self, fd: int) -> None:
        self.fd, self.pos = fd, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buf: "bytearray | memoryview") -> int:  # type: ignore[override]
        n = os.preadv(self.fd, [buf], self.pos)
        self.pos += n
        return n

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self.pos = offset if whence == os.SEEK_SET else self.pos + offset
        return self.pos

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if not self.closed:
            os.close(self.fd)
        super().close()
