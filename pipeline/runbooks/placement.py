"""Where containers go: ordered by priority then size, each onto the target with the most room left.

Shared by evacuation, cloud exit and rebalancing. Pure functions over numbers the agents measured
(GET /v1/capacity, pipeline/agent/capacity.py), so the same inputs always give the same plan.
"""

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from skyferry.netplane.mesh import Mesh
from skyferry.pipeline.controller import agentctl
from skyferry.pipeline.controller.registry import Entry
from skyferry.pipeline.errors import SkyferryError

PRIORITY_LABEL = "priority"
MIB = 1 << 20


@dataclass(frozen=True)
class Need:
    """One container to place: what it uses now, and how urgently it must move (higher first)."""

    name: str
    memory: int
    cpu: float = 0.0
    priority: int = 0


@dataclass
class Room:
    """What a target host has free."""

    host: str
    memory_free: int
    cpu_free: float

    def fits(self, need: Need) -> bool:
        return self.memory_free >= need.memory and self.cpu_free >= need.cpu


def priority(entry: Entry) -> int:
    raw = entry.spec.labels.get(PRIORITY_LABEL, "0")
    try:
        return int(raw)
    except ValueError:
        raise SkyferryError(
            f"container {entry.name!r} has label priority={raw!r}, which is not an integer",
            hint=f"skyferry rm {entry.name} and run it again with --label priority=N (higher moves first)",
        ) from None


def order(needs: list[Need]) -> list[Need]:
    """Highest priority first; within a priority, largest first (it is the hardest to fit)."""
    return sorted(needs, key=lambda n: (-n.priority, -n.memory, -n.cpu, n.name))


def place(needs: list[Need], rooms: list[Room]) -> tuple[dict[str, str], list[Need]]:
    """Assign each need (in `order`) to the fitting room with the most memory left: spreads the load.

    Returns (container -> host, the needs that fit nowhere). `rooms` is updated as containers land.
    """
    assigned: dict[str, str] = {}
    unplaced: list[Need] = []
    for need in order(needs):
        fitting = [r for r in rooms if r.fits(need)]
        if not fitting:
            unplaced.append(need)
            continue
        room = max(sorted(fitting, key=lambda r: r.host), key=lambda r: (r.memory_free, r.cpu_free))
        room.memory_free -= need.memory
        room.cpu_free -= need.cpu
        assigned[need.name] = room.host
    return assigned, unplaced


def capacities(state: Path, mesh: Mesh, hosts: list[str]) -> dict[str, dict[str, Any]]:
    """GET /v1/capacity from each host's agent, all at once; an unreachable host raises with its name."""

    def one(host: str) -> dict[str, Any]:
        try:
            return agentctl.client(state, mesh, host).call("GET", "/v1/capacity")
        except SkyferryError as exc:
            raise SkyferryError(f"cannot measure the capacity of {host}: {exc}", hint=exc.hint) from None

    with ThreadPoolExecutor(max_workers=max(1, len(hosts))) as pool:
        return dict(zip(hosts, pool.map(one, hosts), strict=True))


def room(cap: dict[str, Any]) -> Room:
    return Room(cap["host"], int(cap["memory_free"]), float(cap["cpu_free"]))


def need(entry: Entry, usage: dict[str, Any] | None) -> Need:
    usage = usage or {}
    return Need(entry.name, int(usage.get("memory", 0)), float(usage.get("cpu", 0.0)), priority(entry))


def mib(n: int) -> str:
    return f"{n / MIB:.0f} MiB"
