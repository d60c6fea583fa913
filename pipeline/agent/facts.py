"""What a host can do, for the pipeline's compatibility check: kernel, CRIU and its kernel features, CPU
(flags, and CRIU's own cpuinfo image and check), runtimes.

Kernel features and the cpuinfo image cannot change while the agent runs, and each CRIU run costs about
40 ms of kernel probing, so both are probed once per agent start (on the first facts request).
"""

import base64
import binascii
import functools
import platform
import tempfile
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from skyferry.netplane import wg
from skyferry.pipeline.agent import doctor
from skyferry.pipeline.criu import version as criu_version
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.hostapi.compat import CRIU_FEATURES
from skyferry.pipeline.runtimes.protocol import Runtime

CPUINFO_IMAGE = "cpuinfo.img"
# CRIU 4.2 has no `cpuinfo dump` on these (criu/arch/*/cpu.c returns -ENOTSUP): nothing to compare there.
CPUINFO_UNSUPPORTED = ("aarch64", "armv7l", "riscv64")
CPUINFO_MAX = 64 * 1024  # the image is about 100 bytes; anything near this is not one


def dumps_other_users() -> bool:
    """Whether CRIU here can dump a task of another user (a container run with --user): CRIU reads each
    task's rlimits with prlimit(2), which for a task whose uids differ from the caller's needs
    CAP_SYS_RESOURCE. Root has it on real machines and VMs; root in some container sandboxes does not."""
    return bool(doctor.probe_cap_eff() >> doctor.CAP_SYS_RESOURCE & 1)


def cpu_flags() -> list[str]:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return sorted(line.split(":", 1)[1].split())
    return []


def _criu_feature(name: str) -> bool | None:
    """`criu check --feature NAME`: True or False, None when CRIU could not answer (missing, not root)."""
    out = doctor.run([criu_version.binary(), "check", "--feature", name])
    if out is None or doctor.unchecked(out):
        return None
    return out.rc == 0


@functools.cache
def features() -> dict[str, bool | None]:
    """The kernel features of pipeline/hostapi/compat.py, probed in parallel once per agent start."""
    with ThreadPoolExecutor(len(CRIU_FEATURES)) as pool:
        found = dict(zip(CRIU_FEATURES, pool.map(_criu_feature, CRIU_FEATURES), strict=True))
    return {"tcp_repair": doctor.probe_tcp_repair() is None, **found}


def _criu_error(text: str) -> str:
    """The line of CRIU's output that says why (it prints Error lines, then a summary)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error")]
    return (errors or lines or ["no output"])[0]


@functools.cache
def cpuinfo_image() -> bytes | None:
    """`criu cpuinfo dump`: this CPU as CRIU describes it, for a target's `cpuinfo check`; None where
    CRIU cannot describe CPUs."""
    if platform.machine() in CPUINFO_UNSUPPORTED:
        return None
    with tempfile.TemporaryDirectory(prefix="sf-cpuinfo-") as d:
        out = doctor.run([criu_version.binary(), "cpuinfo", "dump", "-D", d, "-o", "cpuinfo.log"])
        image = Path(d) / CPUINFO_IMAGE
        if out is None or out.rc != 0 or not image.exists():
            log = Path(d) / "cpuinfo.log"
            why = _criu_error(log.read_text() if log.exists() else out.text if out else "criu is not installed")
            raise SkyferryError(f"criu cpuinfo dump failed: {why}", hint=doctor.BOOTSTRAP)
        return image.read_bytes()


def cpuinfo_check(image_b64: str) -> dict[str, Any]:
    """`criu cpuinfo check` of another host's cpuinfo image against this CPU, with CRIU's default
    `--cpu-cap` (fpu and ins: the FPU/xsave state and the instruction sets the image's CPU had must be
    here). {"ok": bool, "error": CRIU's reason}; cached by image, the CPU does not change."""
    try:
        image = base64.b64decode(image_b64, validate=True)
    except binascii.Error:
        raise ValueError("cpuinfo image is not base64") from None
    if not image or len(image) > CPUINFO_MAX:
        raise ValueError(f"cpuinfo image of {len(image)} bytes")
    return dict(_check(image))


@functools.lru_cache(maxsize=64)
def _check(image: bytes) -> tuple[tuple[str, Any], ...]:
    with tempfile.TemporaryDirectory(prefix="sf-cpuinfo-") as d:
        (Path(d) / CPUINFO_IMAGE).write_bytes(image)
        out = doctor.run([criu_version.binary(), "cpuinfo", "check", "-D", d, "-o", "cpuinfo.log"])
        if out is None:
            raise SkyferryError("criu is not installed", hint=doctor.BOOTSTRAP)
        log = Path(d) / "cpuinfo.log"
        text = log.read_text() if log.exists() else out.text
    return (("ok", out.rc == 0), ("error", None if out.rc == 0 else _criu_error(text)))


def collect(host: str, runtimes: Mapping[str, Runtime], wg_interface: str) -> dict[str, Any]:
    return {
        "host": host,
        "kernel": platform.release(),
        "wireguard": wg.backend_of(None, wg_interface),  # "kernel", "wireguard-go", or None if it is gone
        "arch": platform.machine(),
        "criu": criu_version.installed(),
        "features": features(),
        "cpu_flags": cpu_flags(),
        "runtimes": list(runtimes),
        "dumps_other_users": dumps_other_users(),
        "modes": {name: list(runtime.modes) for name, runtime in runtimes.items()},
        # `criu check --feature mem_dirty_track`, asked once per agent; with an engine that pre-dumps it
        # makes pre-copy CRIU's iterative pre-dump ("soft-dirty"), else it is content-based ("content").
        "soft_dirty": criu_version.soft_dirty(),
        "precopy_method": {
            name: criu_version.precopy_method(criu_version.soft_dirty(), runtime.pre_dumps)
            for name, runtime in runtimes.items()
            if "precopy" in runtime.modes
        },
    }
