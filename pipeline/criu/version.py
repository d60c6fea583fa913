"""Which CRIU a host has, read one way for the agent's facts and for `skyferry doctor`."""

import os
import re
import shutil
import subprocess
from collections.abc import Mapping

MIN_VERSION = (4, 2)  # kernels >= 6.16 need it (docs/host-setup.md, "Why CRIU 4.2 exactly")
PRECOPY_CRIU = "criu iterative pre-dump"
PRECOPY_CONTENT = "content-based pre-copy"
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


def precopy_method(features: Mapping[str, bool]) -> str:
    """Which pre-copy the pipeline runs: CRIU's own iterative pre-dump needs soft-dirty tracking."""
    return PRECOPY_CRIU if features.get("mem_track") else PRECOPY_CONTENT
