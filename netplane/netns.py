"""Named network namespaces (/run/netns): create, remove, run commands in them, switch a thread into one."""

import ctypes
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pyroute2 import netns as _netns

from .errors import NetplaneError

RUN_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def path(name: str) -> Path:
    return RUN_DIR / name


def exists(name: str) -> bool:
    return path(name).exists()


def create(name: str) -> bool:
    """Create netns `name` with `lo` up; returns False if it already existed."""
    if exists(name):
        return False
    _netns.create(name)
    with in_netns(name):
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
    return True


def remove(name: str) -> bool:
    """Remove netns `name` (its veths and TUNs go with it once no process holds it); False if absent."""
    if not exists(name):
        return False
    _netns.remove(name)
    return True


def command(name: str | None, argv: list[str]) -> list[str]:
    """argv wrapped to run in netns `name` (nsenter execs in place, so a Popen's pid is the command's)."""
    if name is None:
        return argv
    return ["nsenter", f"--net={path(name)}", "--", *argv]


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextmanager
def in_netns(name: str | None) -> Iterator[None]:
    """Switch only the calling thread into netns `name` (None: stay) and back afterwards.

    Sockets created inside keep living in that netns after the block ends.
    """
    if name is None:
        yield
        return
    try:
        target = os.open(path(name), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NetplaneError(f"network namespace {name} does not exist", hint="ip netns list") from None
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(target)
        os.close(own)


def sysctl(name: str | None, key: str, value: str) -> None:
    """Write a net sysctl (e.g. "net/ipv4/ip_forward") as seen from netns `name`."""
    with in_netns(name), open(f"/proc/sys/{key}", "w") as f:
        f.write(value)
