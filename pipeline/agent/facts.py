"""What a host can do, for the pipeline's compatibility check: kernel, CRIU, CPU flags, runtimes."""

import platform
import shutil
import subprocess
from collections.abc import Mapping
from typing import Any

from skyferry.pipeline.runtimes.protocol import Runtime


def criu_version() -> str | None:
    if not shutil.which("criu"):
        return None
    out = subprocess.run(["criu", "--version"], capture_output=True, text=True, check=False).stdout
    for line in out.splitlines():
        if line.startswith("Version:"):
            return line.split()[1]
    return None


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
        "criu": criu_version(),
        "cpu_flags": cpu_flags(),
        "runtimes": list(runtimes),
        "modes": {name: list(runtime.modes) for name, runtime in runtimes.items()},
    }
