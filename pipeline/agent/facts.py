"""What a host can do, for the pipeline's compatibility check: kernel, CRIU, CPU flags, runtimes."""

import platform
from collections.abc import Mapping
from typing import Any

from skyferry.pipeline.criu import version as criu_version
from skyferry.pipeline.runtimes.protocol import Runtime


def cpu_flags() -> list[str]:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return sorted(line.split(":", 1)[1].split())
    return []


def collect(host: str, runtimes: Mapping[str, Runtime]) -> dict[str, Any]:
    return {
        "host": host,
        "kernel": platform.release(),
        "arch": platform.machine(),
        "criu": criu_version.installed(),
        "cpu_flags": cpu_flags(),
        "runtimes": list(runtimes),
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
