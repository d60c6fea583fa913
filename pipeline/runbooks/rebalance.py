"""Load balancing: move containers off hosts above a CPU or memory threshold onto hosts below another.

Hysteresis keeps it from ping-ponging: a host sheds load only above `*_high`, and a container lands only
where the target stays at or below `*_low` afterwards, so a move can never push its target over the
line that would send it back; a container that moved within `cooldown` seconds stays where it is.
It moves the fewest containers it can: per overloaded host, the smallest container whose departure is
enough, else the largest that fits somewhere, until the host is under the line.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from skyferry.netplane.mesh import Mesh
from skyferry.pipeline.controller.journal import Journal
from skyferry.pipeline.controller.registry import Registry
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.runbooks import evacuate, placement
from skyferry.pipeline.runbooks import report as runreport

Progress = Callable[[str], None]


class Policy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    memory_high: float = Field(0.85, gt=0, le=1, description="shed load above this share of memory")
    memory_low: float = Field(0.70, gt=0, le=1, description="accept load only up to this share")
    cpu_high: float = Field(0.85, gt=0, le=1)
    cpu_low: float = Field(0.70, gt=0, le=1)
    interval: float = Field(60.0, gt=0, description="--watch: seconds between evaluations")
    cooldown: float = Field(600.0, ge=0, description="seconds a container that just moved is left alone")
    hosts: list[str] = Field(default_factory=list, description="only these hosts (default: every mesh host)")

    @model_validator(mode="after")
    def _gap(self) -> "Policy":
        for what in ("memory", "cpu"):
            if getattr(self, f"{what}_low") >= getattr(self, f"{what}_high"):
                raise ValueError(f"{what}_low must be below {what}_high (the gap is what stops ping-pong)")
        return self


def load_policy(path: Path | None) -> Policy:
    if path is None:
        return Policy()
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
        return Policy.model_validate(data)
    except FileNotFoundError:
        raise SkyferryError(f"no policy file {path}") from None
    except yaml.YAMLError as exc:
        raise SkyferryError(f"policy {path} is not valid YAML: {exc}") from None
    except ValidationError as exc:
        msgs = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(policy)'}: {e['msg'].removeprefix('Value error, ')}"
            for e in exc.errors()
        )
        raise SkyferryError(f"policy {path}: {msgs}", hint="see docs/runbooks.md for the fields") from None


@dataclass
class Load:
    host: str
    memory_used: float
    memory_total: float
    cpu_used: float
    cpus: float

    @property
    def memory(self) -> float:
        return self.memory_used / self.memory_total if self.memory_total else 1.0

    @property
    def cpu(self) -> float:
        return self.cpu_used / self.cpus if self.cpus else 1.0

    def over(self, p: Policy) -> bool:
        return self.memory > p.memory_high or self.cpu > p.cpu_high

    def takes(self, n: placement.Need, p: Policy) -> bool:
        return (self.memory_used + n.memory) / self.memory_total <= p.memory_low and (
            self.cpu_used + n.cpu
        ) / self.cpus <= p.cpu_low

    def shift(self, n: placement.Need, sign: int) -> None:
        self.memory_used += sign * n.memory
        self.cpu_used += sign * n.cpu

    def as_dict(self) -> dict[str, Any]:
        return {"host": self.host, "memory": round(self.memory, 3), "cpu": round(self.cpu, 3)}


def decide(loads: dict[str, Load], held: dict[str, list[placement.Need]], policy: Policy) -> dict[str, Any]:
    """The moves (pure): `held` is host -> the containers on it that may move."""
    before = [loads[h].as_dict() for h in sorted(loads)]
    moves: list[dict[str, Any]] = []
    stuck: list[str] = []
    for host in sorted(loads, key=lambda h: -max(loads[h].memory, loads[h].cpu)):
        src = loads[host]
        candidates = list(held.get(host, []))
        while src.over(policy) and candidates:
            options = []
            for n in candidates:
                dests = [t for t in loads.values() if t.host != host and not t.over(policy) and t.takes(n, policy)]
                if dests:
                    src.shift(n, -1)
                    enough = not src.over(policy)
                    src.shift(n, +1)
                    best = min(dests, key=lambda t: (max(t.memory, t.cpu), t.host))
                    options.append((enough, n, best))
            if not options:
                stuck.append(host)
                break
            sufficient = [o for o in options if o[0]]
            if sufficient:  # one move does it: the smallest such container (least to copy)
                _, need, dest = min(sufficient, key=lambda o: (o[1].memory, o[1].cpu, o[1].name))
            else:  # it takes several: the largest first, fewest moves
                _, need, dest = max(options, key=lambda o: (o[1].memory, o[1].cpu, o[1].name))
            src.shift(need, -1)
            dest.shift(need, +1)
            candidates.remove(need)
            moves.append({"container": need.name, "source": host, "target": dest.host, "memory": need.memory,
                          "cpu": need.cpu})  # fmt: skip
        if src.over(policy) and host not in stuck:
            stuck.append(host)
    after = [loads[h].as_dict() for h in sorted(loads)]
    return {"before": before, "after": after, "moves": moves, "stuck": stuck}


def plan(state: Path, policy: Policy) -> dict[str, Any]:
    mesh = Mesh.load(state)
    hosts = policy.hosts or sorted(mesh.hosts)
    for h in hosts:
        mesh.host(h)
    caps = placement.capacities(state, mesh, hosts)
    loads = {h: Load(h, c["memory_used"], c["memory_total"], c["cpu_used"], c["cpus"]) for h, c in caps.items()}
    recent = _recently_moved(state, policy.cooldown)
    held: dict[str, list[placement.Need]] = {}
    for e in Registry(state).all():
        if e.host in caps and e.name not in recent:
            held.setdefault(e.host, []).append(placement.need(e, caps[e.host]["containers"].get(e.name)))
    return {**decide(loads, held, policy), "cooling_down": sorted(recent)}


def _recently_moved(state: Path, cooldown: float) -> set[str]:
    since = time.time() - cooldown
    return {m.container for m in Journal(state).all() if m.state == "done" and m.updated >= since}


def rebalance(
    state: Path, policy: Policy, dry_run: bool = False, progress: Callable[[str, str], None] = evacuate.quiet
) -> dict[str, Any]:
    """One evaluation, and the moves unless dry_run. "ok" is False if a move failed or a host stays over."""
    run_id = runreport.new_run_id("rebalance")
    # An interrupted earlier move is finished first: its container is frozen until it is.
    finished = [] if dry_run else [evacuate.move(state, m.container, m.target, progress) for m in
                                   evacuate.interrupted(state)]  # fmt: skip
    decided = plan(state, policy)
    summary: dict[str, Any] = {"run": run_id, "kind": "rebalance", "dry_run": dry_run, **decided, "results": finished}
    if not dry_run:
        for m in decided["moves"]:
            summary["results"].append(evacuate.move(state, m["container"], m["target"], progress))
        summary["report_dir"] = str(
            runreport.write(state, run_id, summary, [r["migration"] for r in summary["results"] if r.get("migration")])
        )
    summary["ok"] = all(evacuate.succeeded(r) for r in summary["results"]) and not decided["stuck"]
    return summary
