"""What a host has room for: its memory and CPUs, and what each of its containers uses (GET /v1/capacity).

Usage is measured from each container's cgroup (v1 or v2): memory in bytes, CPU as cores busy over a
short sample. The host's size is the machine's, unless `<state root>/capacity.json` declares a smaller
one ({"memory_mib": 512, "cpus": 2}): an operator's reservation on a shared machine, and how the
simulated local hosts, which all share one machine, get sizes of their own.
"""

import json
import os
import time
from pathlib import Path
from typing import Any

from skyferry.pipeline.agent.host import Host
from skyferry.pipeline.errors import SkyferryError

CGROUP = Path("/sys/fs/cgroup")
DECLARED = "capacity.json"
CPU_SAMPLE_S = 0.2


def collect(host: Host) -> dict[str, Any]:
    paths = _cgroups(host)
    cpu0 = {name: _cpu_ns(p) for name, p in paths.items()}
    t0 = time.monotonic()
    time.sleep(CPU_SAMPLE_S)
    elapsed = time.monotonic() - t0
    used: dict[str, dict[str, float]] = {}
    for name, p in paths.items():
        cpu1 = _cpu_ns(p)
        cores = (cpu1 - cpu0[name]) / 1e9 / elapsed if cpu1 is not None and cpu0[name] is not None else 0.0
        used[name] = {"memory": _memory(p), "cpu": round(max(cores, 0.0), 3)}
    memory_total, cpus = _size(host.cfg.state_root)
    memory_used = sum(int(u["memory"]) for u in used.values())
    cpu_used = round(sum(u["cpu"] for u in used.values()), 3)
    return {
        "host": host.cfg.name,
        "memory_total": memory_total,
        "memory_used": memory_used,
        "memory_free": max(memory_total - memory_used, 0),
        "cpus": cpus,
        "cpu_used": cpu_used,
        "cpu_free": round(max(cpus - cpu_used, 0.0), 3),
        "containers": used,
    }


def memory_by_container(host: Host) -> dict[str, int]:
    """Each container's resident memory, as `collect` counts it (no CPU sample: no wait)."""
    return {name: _memory(path) for name, path in _cgroups(host).items()}


def _cgroups(host: Host) -> dict[str, str]:
    names = [name for runtime in host.runtimes.values() for name in runtime.names()]
    return {name: f"skyferry/{host.cfg.mesh}/{host.cfg.name}/{name}" for name in names}


def _size(state_root: Path) -> tuple[int, float]:
    memory = _meminfo("MemTotal")
    cpus = float(len(os.sched_getaffinity(0)))
    path = state_root / DECLARED
    if path.exists():
        try:
            declared = json.loads(path.read_text())
            memory = int(declared.get("memory_mib", memory >> 20)) << 20
            cpus = float(declared.get("cpus", cpus))
        except (ValueError, TypeError, AttributeError) as exc:
            raise SkyferryError(f"{path} is not valid: {exc}", hint='e.g. {"memory_mib": 512, "cpus": 2}') from None
    return memory, cpus


def _meminfo(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) * 1024
    raise SkyferryError(f"/proc/meminfo has no {key}")


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _memory(cg: str) -> int:
    """Resident use without reclaimable page cache, so a log file does not count as load."""
    v1 = CGROUP / "memory" / cg
    if (stat := _read(v1 / "memory.stat")) is not None:
        fields = dict(line.split() for line in stat.splitlines() if line.count(" ") == 1)
        return int(fields.get("total_rss", fields.get("rss", 0))) + int(fields.get("total_shmem", 0))
    for root in (CGROUP, CGROUP / "unified"):
        if (stat := _read(root / cg / "memory.stat")) is not None:
            fields = dict(line.split() for line in stat.splitlines() if line.count(" ") == 1)
            return int(fields.get("anon", 0)) + int(fields.get("shmem", 0))
    return 0


def _cpu_ns(cg: str) -> int | None:
    if (usage := _read(CGROUP / "cpuacct" / cg / "cpuacct.usage")) is not None:
        return int(usage)
    for root in (CGROUP, CGROUP / "unified"):
        if (stat := _read(root / cg / "cpu.stat")) is not None:
            for line in stat.splitlines():
                key, _, value = line.partition(" ")
                if key == "usage_usec":
                    return int(value) * 1000
    return None
