"""Move every container off a host: placement by the targets' free memory and CPU, priority first.

Each container migrates or rolls back on its own (pipeline/controller/migration.py); one failure never stops the
others. Nothing is remembered outside the registry and the journal, which is what makes a re-run after
an interruption continue where it stopped: containers already moved are no longer on the host, and a
migration the interruption left half done is finished from the journal (resumed, or rolled back and
tried again) before anything new starts.
"""

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from skyferry.netplane.errors import NetplaneError
from skyferry.netplane.mesh import Mesh
from skyferry.netplane.wan import WanSpec
from skyferry.pipeline.controller import migration
from skyferry.pipeline.controller.journal import TERMINAL, Journal, Migration, pid_alive
from skyferry.pipeline.controller.registry import Registry
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.runbooks import ingress, placement, streams
from skyferry.pipeline.runbooks import report as runreport
from skyferry.pipeline.runbooks.plotter import Plotter
from skyferry.providers.errors import ProviderError

Progress = Callable[[str, str], None]  # (container, stage)
OK = ("done", "already-there")


def quiet(_: str, __: str) -> None:
    pass


def move(
    state: Path, name: str, target: str, progress: Progress = quiet, streams: Callable[[], int] | None = None
) -> dict[str, Any]:
    """Migrate `name` to `target`, first finishing whatever an earlier, interrupted run left in the
    journal; `streams`: how many first rounds may stream from the source at once (streams.py). Never
    raises for a migration that failed: the result says what happened."""
    result: dict[str, Any] = {"container": name, "target": target}
    try:
        journal = Journal(state)
        active = journal.active_for(name)
        if active is not None:
            progress(name, f"finishing interrupted migration {active.id}")
            report = _finish(state, active.id, lambda s: progress(name, s))
            result["resumed"] = active.id
            if report["state"] == "done":  # it left the source: where it went is as good a place
                ingress_result = _ingress(state, name, report["target"], report["source"])
                return {**result, **_outcome(report), "ingress": ingress_result}
        entry = Registry(state).get(name)
        if entry.host == target:
            last = _last_migration(state, name)  # a re-run: that move's source may still publish it
            came_from = last["source"] if last and last["state"] == "done" and last["target"] == target else None
            ingress_result = _ingress(state, name, target, came_from)
            return {**result, "state": "already-there", "source": entry.host, "ingress": ingress_result}
        report = migration.migrate(state, name, target, progress=lambda s: progress(name, s), streams=streams)
        return {**result, **_outcome(report), "ingress": _ingress(state, name, target, report["source"])}
    except (SkyferryError, NetplaneError, ProviderError) as exc:
        last = _last_migration(state, name)
        return {
            **result,
            **(_outcome(last) if last else {}),
            "state": last["state"] if last and last["state"] != "done" else "failed",
            "error": str(exc),
            "hint": exc.hint,
        }


def interrupted(state: Path) -> list[Migration]:
    """Unfinished migrations whose controller is gone (one still driven by a live process is its own), of
    containers that still exist (`skyferry rm` of a container ends what its journal had in flight)."""
    known = {e.name for e in Registry(state).all()}
    return [
        m
        for m in Journal(state).all()
        if m.state not in TERMINAL and m.container in known and not (m.pid and pid_alive(m.pid))
    ]


def _finish(state: Path, mig_id: str, progress: Callable[[str], None]) -> dict[str, Any]:
    try:
        return migration.resume(state, mig_id, progress)
    except SkyferryError as exc:
        if "being rolled back" not in str(exc):
            raise
        return migration.rollback(state, mig_id, progress)


def _outcome(report: dict[str, Any]) -> dict[str, Any]:
    keys = ("id", "source", "state", "mode", "freeze_ms", "total_ms", "bytes_wire", "error")
    return {"migration": report, **{("migration_id" if k == "id" else k): report.get(k) for k in keys}}


def _last_migration(state: Path, name: str) -> dict[str, Any] | None:
    journal = Journal(state)
    row = journal.conn.execute(
        "SELECT id FROM migrations WHERE container=? ORDER BY started DESC LIMIT 1", (name,)
    ).fetchone()
    if row is None:
        return None
    mig = journal.get(row["id"])
    return mig.report or {**mig.to_dict(), "stages_s": {}}


def _ingress(state: Path, name: str, target: str, source: str | None) -> dict[str, Any] | None:
    entry = Registry(state).get(name)
    return ingress.after_cutover(state, entry, target, source)


def targets_for(mesh: Mesh, host: str, to: list[str] | None, to_provider: str | None) -> list[str]:
    if to and to_provider:
        raise SkyferryError("give --to or --to-provider, not both")
    if to:
        for t in to:
            mesh.host(t)
            if t == host:
                raise SkyferryError(f"--to {t} is the host being evacuated", hint="pick other targets")
        return sorted(set(to))
    found = sorted(
        h.name for h in mesh.hosts.values() if h.name != host and (to_provider is None or h.provider == to_provider)
    )
    if not found:
        raise SkyferryError(
            f"no target hosts for evacuating {host}" + (f" in provider {to_provider!r}" if to_provider else ""),
            hint="skyferry hosts ls; bring up capacity first",
        )
    return found


def plan(state: Path, host: str, to: list[str] | None = None, to_provider: str | None = None) -> dict[str, Any]:
    """Which container goes where, in which order, from the agents' measurements. Changes nothing."""
    mesh = Mesh.load(state)
    mesh.host(host)
    targets = targets_for(mesh, host, to, to_provider)
    entries = [e for e in Registry(state).all() if e.host == host]
    if not entries:
        return {"host": host, "targets": targets, "moves": [], "unplaced": []}
    caps = placement.capacities(state, mesh, [host, *targets])
    needs = [placement.need(e, caps[host]["containers"].get(e.name)) for e in entries]
    assigned, unplaced = placement.place(needs, [placement.room(caps[t]) for t in targets])
    moves = [
        {"container": n.name, "target": assigned[n.name], "priority": n.priority, "memory": n.memory, "cpu": n.cpu}
        for n in placement.order(needs)
        if n.name in assigned
    ]
    free = {t: placement.mib(caps[t]["memory_free"]) for t in targets}
    return {
        "host": host,
        "targets": targets,
        "moves": moves,
        "unplaced": [
            {"container": n.name, "memory": n.memory, "cpu": n.cpu, "error": f"needs {placement.mib(n.memory)} "
             f"and {n.cpu} CPU; no target has that free ({', '.join(f'{t}: {m}' for t, m in free.items())})"}
            for n in unplaced
        ],
    }  # fmt: skip


def evacuate(
    state: Path,
    host: str,
    to: list[str] | None = None,
    to_provider: str | None = None,
    parallel: int = 1,
    dry_run: bool = False,
    progress: Progress = quiet,
    bandwidth: str | None = None,
) -> dict[str, Any]:
    """Empty `host`; returns the run's summary (its "ok" is False if any container did not move).

    At most `parallel` migrations run at once, and fewer stream their bulk together: as many as raise
    the rate the link carries (streams.py). `bandwidth` (e.g. "1gbit"; default: the mesh's emulated WAN
    rate) is the source's uplink: no more stream than it holds at the fastest stream's rate.
    """
    if parallel < 1:
        raise SkyferryError(f"--parallel must be at least 1, not {parallel}")
    budget = _budget(state, bandwidth)
    run_id = runreport.new_run_id("evacuate")
    results: list[dict[str, Any]] = []
    if not dry_run:  # an earlier run's half-done migrations first, where they were going
        results += [move(state, m.container, m.target, progress) for m in interrupted(state) if m.source == host]
    the_plan = plan(state, host, to, to_provider)
    summary: dict[str, Any] = {"run": run_id, "kind": "evacuate", "host": host, "dry_run": dry_run, "plan": the_plan}
    if dry_run:
        return {**summary, "ok": not the_plan["unplaced"], "results": []}
    pace = streams.Streams(parallel, budget)
    folder = Path(state) / runreport.REPORTS / run_id
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    with Plotter() as plotter:  # each migration's plot, drawn as it finishes while the others run
        results += _run(state, the_plan["moves"], pace, progress, lambda r: _draw(plotter, folder, r))
    summary["bandwidth"] = pace.as_dict()
    results += [{**u, "state": "no-capacity"} for u in the_plan["unplaced"]]
    remaining = sorted(e.name for e in Registry(state).all() if e.host == host)
    summary.update(results=results, remaining=remaining, ok=not remaining and all(succeeded(r) for r in results))
    summary["report_dir"] = str(runreport.write(state, run_id, summary, [r["migration"] for r in results
                                                                          if r.get("migration")]))  # fmt: skip
    return summary


def _budget(state: Path, bandwidth: str | None) -> int | None:
    if bandwidth:
        try:
            return WanSpec.parse(f"rate={bandwidth}").rate
        except NetplaneError:
            raise SkyferryError(f"bad --bandwidth {bandwidth!r}", hint="a rate such as 1gbit or 500mbit") from None
    wan = Mesh.load(state).wan
    return WanSpec.parse(f"rate={wan.rate}").rate if wan and wan.rate else None


def _run(
    state: Path, moves: list[dict[str, Any]], pace: streams.Streams, progress: Progress,
    finished: Callable[[dict[str, Any]], Any] = lambda _: None,
) -> list[dict[str, Any]]:  # fmt: skip
    """Run the moves in plan order, `pace.parallel` at once, their first rounds `pace.cap()` at once (the
    source holds the rest back: agent/bulk.py). `finished` is called with each result as it comes.
    Results in plan order."""
    results: dict[str, dict[str, Any]] = {}
    with ThreadPoolExecutor(max_workers=pace.parallel) as pool:  # it starts them in the order submitted
        running = {
            pool.submit(move, state, m["container"], m["target"], progress, pace.cap): m["container"] for m in moves
        }
        for f in as_completed(running):
            results[running[f]] = result = f.result()
            if sample := streams.sample(result.get("migration")):
                pace.add(*sample)
            finished(result)
    return [results[m["container"]] for m in moves]


def _draw(plotter: Plotter, folder: Path, result: dict[str, Any]) -> None:
    """The migration's plot, where the run's report will list it (a failure leaves it to the report)."""
    report = result.get("migration") or {}
    if report.get("id"):
        plotter.draw(report, folder / f"{report['id']}.png")


def succeeded(result: dict[str, Any]) -> bool:
    return result["state"] in OK and not (result.get("ingress") or {}).get("error")


def rows(results: list[dict[str, Any]]) -> list[list[Any]]:
    """The summary table: one row per container."""
    return [
        [
            r["container"],
            r.get("source", "-"),
            r.get("target", "-"),
            r["state"],
            f"{r['freeze_ms']} ms" if r.get("freeze_ms") is not None else "-",
            (r.get("ingress") or {}).get("summary", "-"),
            r.get("error") or "",
        ]
        for r in results
    ]


COLUMNS = ["CONTAINER", "FROM", "TO", "STATE", "FREEZE", "INGRESS", "ERROR"]
