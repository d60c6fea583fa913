"""Cloud exit in waves: a validated plan (PLAN.yaml) and the runner that carries it out, resumably.

    name: leave-cloud-a
    source: {hosts: [local-1, local-2]}          # or {provider: aws}: every mesh host of that provider
    target: {provider: local, hosts: [local-3, local-4]}   # clouds: {provider: aws, region: …, size: …, count: 2}
    waves:
      - name: stateless
        containers: [web-1, web-2]
        check: "curl -fsS http://$SKYFERRY_IP:8080/health"   # run in the container's netns
      - name: databases
        containers: [db]
    after: decommission                          # or keep (default)

The run: provision the target capacity (and make sure its agents answer), then per wave: test-cut every
container (a clone on its target, checked, discarded), cut them over for real, verify health on the
target; finally decommission the source hosts if the plan says so. Progress is kept per plan name in
the controller's store (table `exit_progress`); a re-run skips every step recorded as done, so a finished
wave is never repeated, and a half-done wave continues from the journal (pipeline/evacuate.move).
"""

import json
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from skyferry.netplane.errors import NetplaneError
from skyferry.netplane.mesh import Mesh
from skyferry.pipeline.controller import agentctl, db
from skyferry.pipeline.controller import provision as provisioning
from skyferry.pipeline.controller.journal import Journal
from skyferry.pipeline.controller.registry import Registry
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.hostapi import faults
from skyferry.pipeline.runbooks import evacuate, placement, testcutover
from skyferry.pipeline.runbooks import report as runreport
from skyferry.providers.errors import ProviderError
from skyferry.providers.registry import NAMES, get_provider

NAME = r"^[a-z0-9][a-z0-9_-]{0,39}$"
PLAN_NAME = r"^[a-z][a-z0-9-]{0,39}$"  # it also names (and tags) the cloud hosts provisioned for the plan
Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Source(_Strict):
    hosts: list[str] = Field(default_factory=list, description="mesh hosts to leave")
    provider: str | None = Field(None, description="or: every mesh host of this provider")


class Target(_Strict):
    provider: str
    region: str | None = None
    size: str | None = None
    image: str | None = Field(None, description="image id or URL (default: the provider's Debian 12)")
    count: int | None = Field(None, ge=1, le=100, description="cloud hosts to provision (`skyferry provision`)")
    hosts: list[str] = Field(default_factory=list, description="hosts already in the mesh")
    agent_timeout: float = Field(600.0, gt=0, description="seconds to wait for new hosts' agents to answer")

    @field_validator("provider")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in NAMES:
            raise ValueError(f"unknown provider {v!r} (known: {', '.join(NAMES)})")
        return v


class Wave(_Strict):
    name: str = Field(pattern=NAME)
    containers: list[str]
    check: str | None = Field(None, description="shell command run in the container's netns; exit 0 = healthy")
    test: bool = Field(True, description="test-cut every container before the real cutover")
    timeout: float = Field(30.0, gt=0, description="seconds the check may take")

    @field_validator("containers")
    @classmethod
    def _not_empty(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("a wave must name at least one container")
        return v


class Plan(_Strict):
    name: str = Field(pattern=PLAN_NAME)
    source: Source
    target: Target
    waves: list[Wave] = Field(min_length=1)
    after: Literal["keep", "decommission"] = "keep"
    parallel: int = Field(1, ge=1, le=16, description="migrations at once within a wave")


@dataclass
class Resolved:
    """The plan checked against the mesh: who the sources and targets are, what each container needs."""

    plan: Plan
    mesh: Mesh
    sources: list[str]
    targets: list[str]
    where: dict[str, str]  # container -> host now
    needs: dict[str, placement.Need] = field(default_factory=dict)
    capacity: dict[str, dict[str, Any]] = field(default_factory=dict)


def _loc(parts: tuple[Any, ...] | list[Any]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(plan)"


def _fail(path: Path, errors: list[tuple[str, str]]) -> SkyferryError:
    lines = "; ".join(f"{loc}: {msg}" for loc, msg in errors)
    noun = "error" if len(errors) == 1 else f"{len(errors)} errors"
    return SkyferryError(f"plan {path} has {noun}: {lines}", hint="fix the plan and run again (see docs/runbooks.md)")


def load(path: Path) -> Plan:
    """Parse and structurally validate PLAN.yaml; every mistake is named by its field path."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise SkyferryError(f"no plan file {path}") from None
    except yaml.YAMLError as exc:
        raise SkyferryError(f"plan {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise _fail(path, [("(plan)", "must be a mapping with name, source, target, waves")])
    try:
        return Plan.model_validate(data)
    except ValidationError as exc:
        errors = []
        for e in exc.errors():
            msg = re.sub(r"^Value error, ", "", e["msg"])
            if e["type"] == "extra_forbidden":
                msg = "unknown field"
            errors.append((_loc(e["loc"]), msg))
        raise _fail(path, errors) from None


def check(
    plan: Plan,
    hosts: dict[str, str],
    where: dict[str, str],
    needs: dict[str, placement.Need] | None = None,
    free: dict[str, placement.Room] | None = None,
    provisioned: list[str] | None = None,
) -> tuple[list[str], list[str], list[tuple[str, str]]]:
    """Validate the plan against the mesh (host -> provider), the registry (container -> host) and, when
    given, the containers' measured needs and the targets' free room. `provisioned` are the target hosts
    an earlier step made for the plan. Returns (sources, targets, errors)."""
    errors: list[tuple[str, str]] = []
    known = ", ".join(sorted(hosts)) or "none"

    def host_list(section: str, names: list[str]) -> list[str]:
        good = []
        for i, h in enumerate(names):
            if h not in hosts:
                errors.append((f"{section}.hosts[{i}]", f"unknown host {h!r} (mesh hosts: {known})"))
            else:
                good.append(h)
        return good

    sources = host_list("source", plan.source.hosts)
    if plan.source.provider:
        sources += sorted(h for h, p in hosts.items() if p == plan.source.provider and h not in sources)
    if not plan.source.hosts and not plan.source.provider:
        errors.append(("source", "name the source hosts or a provider"))
    elif not sources and not errors:
        errors.append(("source.provider", f"no mesh host belongs to provider {plan.source.provider!r}"))
    targets = host_list("target", plan.target.hosts)
    targets += [h for h in provisioned or [] if h in hosts and h not in targets]
    for i, h in enumerate(plan.target.hosts):
        if h in sources:
            errors.append((f"target.hosts[{i}]", f"{h} is also a source host"))
    if plan.target.provider == "local" and not plan.target.hosts:
        errors.append(("target.hosts", "the local provider needs the target hosts named (they are mesh hosts)"))
    if plan.target.provider != "local" and not plan.target.count and not plan.target.hosts:
        errors.append(("target.count", f"say how many {plan.target.provider} hosts to provision"))

    first_wave: dict[str, str] = {}
    names_seen: set[str] = set()
    for w, wave in enumerate(plan.waves):
        if wave.name in names_seen:
            errors.append((f"waves[{w}].name", f"another wave is already called {wave.name!r}"))
        names_seen.add(wave.name)
        for c, name in enumerate(wave.containers):
            loc = f"waves[{w}].containers[{c}]"
            if name in first_wave:
                errors.append((loc, f"container {name!r} is already in wave {first_wave[name]!r}"))
                continue
            first_wave[name] = wave.name
            if name not in where:
                errors.append((loc, f"unknown container {name!r}"))
            elif where[name] not in sources and where[name] not in targets:
                errors.append((loc, f"container {name!r} runs on {where[name]}, which is not a source host"))

    if needs is not None and free is not None and targets and not errors:
        moving = [needs[n] for n in first_wave if where.get(n) in sources]
        rooms = [placement.Room(r.host, r.memory_free, r.cpu_free) for r in free.values()]
        _, unplaced = placement.place(moving, rooms)
        if unplaced:
            have = ", ".join(f"{h} has {placement.mib(r.memory_free)}" for h, r in sorted(free.items()))
            want = ", ".join(f"{n.name} ({first_wave[n.name]}) needs {placement.mib(n.memory)}" for n in unplaced)
            total = placement.mib(sum(n.memory for n in moving))
            errors.append(("target.hosts", f"not enough memory on the targets: {want}, after placing the rest; "
                           f"free: {have}; the plan moves {total} in all"))  # fmt: skip
    return sources, targets, errors


def precheck(
    state: Path, path: Path, plan: Plan, provisioned: list[str] | None = None
) -> tuple[Mesh, dict[str, str], dict[str, str], list[str], list[str]]:
    """`check` against the mesh and the registry only: what can be refused before anything is touched."""
    mesh = Mesh.load(state)
    hosts = {h.name: h.provider for h in mesh.hosts.values()}
    where = {e.name: e.host for e in Registry(state).all()}
    sources, targets, errors = check(plan, hosts, where, provisioned=provisioned)
    if errors:
        raise _fail(path, errors)
    return mesh, hosts, where, sources, targets


def resolve(state: Path, path: Path, plan: Plan, provisioned: list[str] | None = None) -> Resolved:
    """`check` with the live mesh, registry and the agents' measurements."""
    mesh, hosts, where, sources, targets = precheck(state, path, plan, provisioned)
    measured = {*targets, *(where[n] for w in plan.waves for n in w.containers)}  # decommissioned sources: no agent
    caps = placement.capacities(state, mesh, sorted(measured))
    entries = {e.name: e for e in Registry(state).all()}
    needs = {
        n: placement.need(entries[n], caps[where[n]]["containers"].get(n)) for w in plan.waves for n in w.containers
    }
    free = {t: placement.room(caps[t]) for t in targets}
    _, _, errors = check(plan, hosts, where, needs, free, provisioned)
    if errors:
        raise _fail(path, errors)
    return Resolved(plan, mesh, sources, targets, where, needs, caps)


class Steps:
    """Steps of one plan recorded in the controller's SQLite: provision, wave:NAME, decommission."""

    def __init__(self, state: Path, plan: str) -> None:
        self.conn = db.connect(state)
        self.plan = plan

    def get(self, step: str) -> dict[str, Any] | None:
        row = self.conn.execute(
            "SELECT status, detail, updated FROM exit_progress WHERE plan=? AND step=?", (self.plan, step)
        ).fetchone()
        if row is None:
            return None
        return {"status": row["status"], "detail": json.loads(row["detail"] or "null"), "updated": row["updated"]}

    def set(self, step: str, status: str, detail: Any = None) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO exit_progress (plan, step, status, detail, updated) VALUES (?,?,?,?,?)",
            (self.plan, step, status, json.dumps(detail, default=str), time.time()),
        )

    def all(self) -> dict[str, dict[str, Any]]:
        rows = self.conn.execute(
            "SELECT step, status, detail, updated FROM exit_progress WHERE plan=? ORDER BY updated", (self.plan,)
        ).fetchall()
        return {r["step"]: {"status": r["status"], "detail": json.loads(r["detail"] or "null")} for r in rows}


def run(state: Path, path: Path, dry_run: bool = False, progress: Progress = _quiet) -> dict[str, Any]:
    """Carry out (or with dry_run, show) the plan; returns the summary ("ok" False if a step failed)."""
    plan = load(path)
    record = Steps(state, plan.name)
    _same_finished_waves(path, plan, record)
    precheck(state, path, plan)
    run_id = runreport.new_run_id(f"exit-{plan.name}")
    summary: dict[str, Any] = {"run": run_id, "kind": "exit", "plan": plan.name, "dry_run": dry_run, "steps": []}
    migrations: list[dict[str, Any]] = []

    def done(step: str, outcome: dict[str, Any]) -> None:
        summary["steps"].append({"step": step, **outcome})

    if (record.get("provision") or {}).get("status") == "done":
        done("provision", {"status": "skipped", "why": "done in an earlier run"})
    elif dry_run:
        done("provision", {"status": "planned", "provider": plan.target.provider, "hosts": plan.target.hosts})
    else:
        progress("provision")
        done("provision", _provision(state, plan, record))
    provisioned = ((record.get("provision") or {}).get("detail") or {}).get("hosts", [])
    if provisioned and not dry_run:
        _wait_for_agents(state, provisioned, plan.target.agent_timeout, progress)
    ok = True
    if not dry_run:  # a crash mid-wave left migrations half done: finish them (journal) before anything else
        for name in (n for w in plan.waves for n in w.containers):
            if (active := Journal(state).active_for(name)) is not None:
                progress(f"finishing interrupted migration {active.id} of {name}")
                result = evacuate.move(state, name, active.target)
                done(f"resume:{name}", {"status": "done" if evacuate.succeeded(result) else "failed", **result})
                ok = ok and evacuate.succeeded(result)
    resolved = resolve(state, path, plan, provisioned)
    summary.update(sources=resolved.sources, targets=resolved.targets)
    for wave in plan.waves if ok else []:
        step = f"wave:{wave.name}"
        earlier = record.get(step)
        if earlier and earlier["status"] == "done":
            done(step, {"status": "skipped", "why": "done in an earlier run", "containers": wave.containers})
            continue
        if dry_run:
            done(step, {"status": "planned", **_wave_plan(resolved, wave)})
            continue
        outcome = _run_wave(state, resolved, wave, record, progress)
        migrations += [r["migration"] for r in outcome.get("results", []) if r.get("migration")]
        done(step, outcome)
        if outcome["status"] != "done":
            ok = False
            break
        faults.crash_point(step)
        resolved = resolve(state, path, plan, provisioned)  # the next wave places onto what is free now
    if ok and plan.after == "decommission" and not dry_run:
        earlier = record.get("decommission")
        if earlier and earlier["status"] == "done":
            done("decommission", {"status": "skipped", "why": "done in an earlier run"})
        else:
            progress("decommission")
            outcome = _decommission(state, resolved, record)
            ok = outcome["status"] == "done"
            done("decommission", outcome)
    summary["ok"] = ok
    if not dry_run:
        summary["report_dir"] = str(runreport.write(state, run_id, summary, migrations))
    return summary


def _same_finished_waves(path: Path, plan: Plan, record: Steps) -> None:
    """A wave recorded as done must still name the same containers, or resuming would be a guess."""
    for w, wave in enumerate(plan.waves):
        earlier = record.get(f"wave:{wave.name}")
        if earlier and earlier["status"] == "done":
            was = sorted((earlier["detail"] or {}).get("containers", []))
            if was != sorted(wave.containers):
                raise _fail(path, [(f"waves[{w}].containers", f"wave {wave.name!r} finished in an earlier run with "
                                    f"{', '.join(was)}; the plan now says {', '.join(wave.containers)}")])  # fmt: skip


def _provision(state: Path, plan: Plan, record: Steps) -> dict[str, Any]:
    """Target capacity. Named hosts must be up (local ones get their agents started); with `count`, the
    cloud hosts are made and joined to the mesh by the same code as `skyferry provision`, tagged with the
    plan's name, so a re-run finds them."""
    mesh = Mesh.load(state)
    if plan.target.provider == "local":
        provider = get_provider("local", state=state)
        wanted = [h for h in provider.list(mesh.name) if h.name in plan.target.hosts]
        ready = provider.wait_ready(wanted)
        agentctl.start_agents(mesh, state)  # idempotent: starts only agents that are not running
        detail: dict[str, Any] = {"hosts": [h.name for h in ready]}
    elif plan.target.count:
        t = plan.target
        try:
            out = provisioning.provision(state, t.provider, t.count, plan.name, size=t.size, region=t.region,
                                         image=t.image, join_timeout=t.agent_timeout)  # fmt: skip
        except (SkyferryError, ProviderError, NetplaneError) as exc:
            hint = getattr(exc, "hint", None) or "fix it and run the same command again"
            raise SkyferryError(f"provisioning {t.count} {t.provider} host(s) failed: {exc}", hint=hint) from exc
        detail = {"hosts": sorted(h["name"] for h in out["hosts"]), "provider": t.provider}
    else:
        detail = {"hosts": []}  # named cloud hosts already in the mesh: nothing to make
    record.set("provision", "done", detail)
    return {"status": "done", **detail}


def _wait_for_agents(state: Path, hosts: list[str], timeout: float, progress: Progress) -> None:
    """New cloud hosts run their agent once cloud-init has finished: wait for each to answer."""
    mesh = Mesh.load(state)
    deadline = time.monotonic() + timeout
    for host in hosts:
        progress(f"waiting for the agent on {host}")
        while True:
            try:
                agentctl.client(state, mesh, host).call("GET", "/v1/facts", retry_for=min(5.0, timeout))
                break
            except SkyferryError as exc:
                if time.monotonic() > deadline:
                    raise SkyferryError(
                        f"the agent on {host} did not answer within {timeout:g} s: {exc}",
                        hint="cloud-init may still be running (see the instance's console log); the hosts are "
                        "provisioned, so running the same command again continues from here",
                    ) from None
                time.sleep(2)


def _wave_plan(r: Resolved, wave: Wave) -> dict[str, Any]:
    moving = [r.needs[n] for n in wave.containers if r.where[n] in r.sources]
    assigned, unplaced = placement.place(moving, [placement.room(r.capacity[t]) for t in r.targets])
    already = [n for n in wave.containers if r.where[n] in r.targets]
    return {"moves": assigned, "unplaced": [n.name for n in unplaced], "already_on_targets": already}


def _run_wave(state: Path, r: Resolved, wave: Wave, record: Steps, progress: Progress) -> dict[str, Any]:
    plan = _wave_plan(r, wave)
    out: dict[str, Any] = {"containers": wave.containers, "moves": plan["moves"], "tests": [], "results": []}
    record.set(f"wave:{wave.name}", "running", {"containers": wave.containers})

    def failed(why: str) -> dict[str, Any]:
        record.set(f"wave:{wave.name}", "failed", {"containers": wave.containers, "error": why})
        return {**out, "status": "failed", "error": why}

    if plan["unplaced"]:
        return failed(f"no target has room for {', '.join(plan['unplaced'])}")
    if wave.test:
        for name, target in plan["moves"].items():
            progress(f"{wave.name}: test cutover {name} -> {target}")
            test = testcutover.run(state, name, target, wave.check, wave.timeout)
            out["tests"].append(test)
            if not test["passed"]:
                return failed(f"test cutover of {name} on {target} failed: {test['error']}; nothing of this wave "
                              "was cut over")  # fmt: skip
    with ThreadPoolExecutor(max_workers=r.plan.parallel) as pool:
        futures = [
            pool.submit(evacuate.move, state, name, target, lambda c, s: progress(f"{wave.name}: {c}: {s}"))
            for name, target in plan["moves"].items()
        ]
        out["results"] = [f.result() for f in futures]
    bad = [res for res in out["results"] if not evacuate.succeeded(res)]
    if bad:
        return failed("; ".join(f"{b['container']}: {b.get('error') or b['state']}" for b in bad))
    mesh = Mesh.load(state)
    out["health"] = []
    for name in wave.containers:
        host = Registry(state).get(name).host
        progress(f"{wave.name}: health {name} on {host}")
        health = agentctl.client(state, mesh, host).call(
            "POST", f"/v1/migrations/health-{wave.name}/clone-check",
            {"name": name, "cmd": wave.check, "live": True, "timeout": wave.timeout},
        )  # fmt: skip
        out["health"].append({"container": name, "host": host, **health})
        if not health["ok"]:
            return failed(f"{name} is cut over to {host} but unhealthy: exit {health.get('rc')} "
                          f"{health.get('output', '')[-200:]}")  # fmt: skip
    record.set(f"wave:{wave.name}", "done", {"containers": wave.containers, "moves": plan["moves"]})
    return {**out, "status": "done"}


def _decommission(state: Path, r: Resolved, record: Steps) -> dict[str, Any]:
    left = sorted(e.name for e in Registry(state).all() if e.host in r.sources)
    if left:
        why = f"containers still on the source hosts: {', '.join(left)}"
        record.set("decommission", "failed", {"error": why})
        return {"status": "failed", "error": why}
    agentctl.stop_agents(Mesh.load(state), state, hosts=r.sources)
    record.set("decommission", "done", {"hosts": r.sources})
    return {"status": "done", "hosts": r.sources}


def rows(summary: dict[str, Any]) -> list[list[str]]:
    out = []
    for s in summary["steps"]:
        what = s.get("why") or s.get("error") or ""
        if s["step"].startswith("wave:") and s.get("moves"):
            what = what or ", ".join(f"{c} -> {t}" for c, t in s["moves"].items())
        out.append([s["step"], s["status"], what])
    return out
