"""Which CRIU a host has, read one way for the agent's facts and for `skyferry doctor`."""

import functools
import os
import re
import shutil
import subprocess

MIN_VERSION = (4, 2)  # kernels >= 6.16 need it (docs/host-setup.md, "Why CRIU 4.2 exactly")
# The pre-copy methods, as the migration report and `skyferry doctor` name them (docs/precopy.md).
PRECOPY_SOFT_DIRTY = "soft-dirty"  # CRIU's iterative pre-dump; the kernel tracks the pages written since
PRECOPY_CONTENT = "content"  # our own rounds: read the live memory, send the pages whose hash changed
PRECOPY_METHODS = (PRECOPY_SOFT_DIRTY, PRECOPY_CONTENT)
PRECOPY_ENV = "SKYFERRY_PRECOPY"  # an agent's override: "content" (or "soft-dirty", which then must work)
_VERSION = re.compile(r"^Version:\s*(\d+)\.(\d+)(?:\.(\d+))?", re.M)


def binary() -> str:
    """$SKYFERRY_CRIU, else `criu` on PATH (the bootstrap puts 4.2.1 in /usr/local/sbin, ahead of the distro's)."""
    return os.environ.get("SKYFERRY_CRIU") or shutil.which("criu") or "criu"


def parse(version_output: str) -> str | None:
    """ "4.2.1" from `criu --version`'s output; None when it names no version."""
    m = _VERSION.search(version_output)
    return ".".join(g for g in m.groups() if g is not None) if m else None


def installed() -> str | None:
    """The version of the CRIU this host runs, or None without one."""
    try:
        out = subprocess.run([binary(), "--version"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return None
    return parse(out)


def too_old(version: str) -> bool:
    major, minor = (int(p) for p in version.split(".")[:2])
    return (major, minor) < MIN_VERSION


@functools.cache
def soft_dirty() -> bool:
    """True when `criu check --feature mem_dirty_track` passes: the kernel tracks soft-dirty pages, so CRIU
    can pre-dump. Asked once per process: the kernel does not change under a running agent."""
    try:
        done = subprocess.run([binary(), "check", "--feature", "mem_dirty_track"], capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def precopy_method(soft_dirty: bool, pre_dumps: bool) -> str:
    """Which pre-copy a migration from this host runs: CRIU's iterative pre-dump where the kernel tracks
    soft-dirty pages and the engine can pre-dump, content-based everywhere else; $SKYFERRY_PRECOPY=content
    forces the latter (to compare the two on one host)."""
    forced = os.environ.get(PRECOPY_ENV, "")
    if forced == PRECOPY_CONTENT:
        return PRECOPY_CONTENT
    return PRECOPY_SOFT_DIRTY if soft_dirty and pre_dumps else PRECOPY_CONTENT
