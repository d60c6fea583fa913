"""The evacuation part of `skyferry bench`: N containers evacuated at once, against the link's own bound.

On the bench's mesh of three local hosts. For each count N (1, 4, 8), N counter services holding
incompressible memory start on local-1, each with a client on local-3, and `skyferry evacuate --json` (in
a child process, as a user runs it) empties local-1 onto local-2 with `--parallel` (at most N). iperf3
measures local-1 -> local-2 over the overlay just before and just after each evacuation; N times the memory
at the faster rate is the bound no evacuation can beat. iperf3 also moves the same bytes as one stream:
what the link gives a transfer of that size, its ramp-up included. Then the Podman baseline
(bench_podman) moves one such container the way a user would without skyferry.
"""

import contextlib
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from skyferry.netplane.mesh import Mesh
from skyferry.pipeline.controller import containers, stages
from skyferry.pipeline.controller.journal import Journal
from skyferry.pipeline.controller.registry import Registry
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.scenarios import bench_podman, evacreport
from skyferry.pipeline.scenarios import demo as scenario
from skyferry.pipeline.scenarios.benchhosts import Progress, iperf3, say_nothing, wait_touched
from skyferry.pipeline.scenarios.benchtargets import EVACUATE_COUNTS, EVACUATE_MIB

SOURCE, TARGET, CLIENTS = "local-1", "local-2", "local-3"


@dataclass
class Config:
    counts: tuple[int, ...] = EVACUATE_COUNTS
    memory_mib: int = EVACUATE_MIB
    parallel: int = 4  # each evacuation runs min(parallel, N) at once
    dirty_mb_s: float = 0.0
    iperf_s: float = 4.0
    settle_s: float = 2.0
    after_requests: int = 10  # each client must get this many answers after the evacuation
    podman: bool = True
    ready_timeout_s: float = 180.0
    evacuate_timeout_s: float = 900.0


def measure(state: Path, mesh: Mesh, workdir: Path, cfg: Config, progress: Progress = say_nothing) -> dict[str, Any]:
    """Every count's evacuation, then the Podman baseline, on the bench's `mesh`; the result `evacreport`
    tabulates. Never raises: a count (or the baseline) that could not run is in `errors` (or `podman`)."""
    result: dict[str, Any] = {"config": asdict(cfg), "runs": [], "podman": None, "errors": []}
    t0 = time.monotonic()
    for n in cfg.counts:
        try:
            result["runs"].append(_evacuation(state, mesh, workdir, cfg, n, progress))
        except Exception as exc:  # this count could not run at all; the next one may
            result["errors"].append(f"{n} containers: {type(exc).__name__}: {exc}")
    if cfg.podman:
        progress(f"podman baseline: one {cfg.memory_mib} MiB container, checkpoint --export / restore --import")
        result["podman"] = bench_podman.run(
            state, mesh, workdir, bench_podman.Config(cfg.memory_mib, cfg.dirty_mb_s, cfg.settle_s,
                                                      cfg.after_requests, cfg.ready_timeout_s),
        )  # fmt: skip
    result["seconds"] = round(time.monotonic() - t0, 1)
    evacreport.add_ratios(result)
    return result


def _evacuation(state: Path, mesh: Mesh, workdir: Path, cfg: Config, n: int, progress: Progress) -> dict[str, Any]:
    names = [f"ev{n}-{i}" for i in range(n)]
    parallel = min(cfg.parallel, n)
    run: dict[str, Any] = {"count": n, "memory_mib": cfg.memory_mib, "parallel": parallel, "ok": False, "error": None}
    clients: dict[str, scenario.CounterClient] = {}
    try:
        progress(f"{n} containers: starting them on {SOURCE} ({cfg.memory_mib} MiB of incompressible memory each)")
        for name in names:
            scenario.start_counter(state, SOURCE, name, workdir, memory_mib=cfg.memory_mib,
                                   dirty_mb_s=cfg.dirty_mb_s, incompressible=True)  # fmt: skip
        for name in names:
            wait_touched(state, name, cfg.memory_mib << 20, cfg.ready_timeout_s)
        progress(f"{n} containers: iperf3 {SOURCE} -> {TARGET} over the overlay")
        run["iperf3"] = iperf3(mesh, SOURCE, TARGET, cfg.iperf_s)
        # The same bytes as one iperf3 stream: what the link gives a transfer of this size, ramp-up included
        # (the rate above is a steady one); the evacuation's first rounds share one kept connection.
        progress(f"{n} containers: iperf3 moving their {n * cfg.memory_mib} MiB as one stream")
        run["iperf3_bytes"] = iperf3(mesh, SOURCE, TARGET, cfg.iperf_s, nbytes=n * (cfg.memory_mib << 20))
        for name in names:
            ip = Registry(state).get(name).ip
            clients[name] = scenario.CounterClient(mesh.hosts[CLIENTS].netns or "", ip, workdir).start()
        time.sleep(cfg.settle_s)
        progress(f"{n} containers: skyferry evacuate --host {SOURCE} --to {TARGET} --parallel {parallel}")
        started = time.time()
        summary = _evacuate(parallel, timeout=cfg.evacuate_timeout_s)
        run["seconds"] = round(time.time() - started, 2)
        run["bandwidth"] = summary.get("bandwidth")
        run["containers"] = [_container(state, r) for r in summary["results"]]
        intervals = [(c["started"], c["finished"]) for c in run["containers"] if c.get("finished")]
        run["fairness"] = evacreport.fairness(intervals, started)
        run["wire_bytes"] = sum(c.get("bytes_wire") or 0 for c in run["containers"])
        for client in clients.values():
            client.wait_for(client.progress() + cfg.after_requests, timeout=60)  # every connection carries on
        run["ok"] = summary["ok"]
        # Again after it: on a shared machine the link's speed moves with the load, and the bound is the
        # faster of the two, so that a quieter minute never flatters the ratio.
        progress(f"{n} containers: iperf3 {SOURCE} -> {TARGET} again")
        run["iperf3_after"] = iperf3(mesh, SOURCE, TARGET, cfg.iperf_s)
    except Exception as exc:
        run["error"] = str(exc) or type(exc).__name__
    finally:
        seen = {name: client.stop() for name, client in clients.items()}
        for name in names:
            with contextlib.suppress(Exception):  # the mesh teardown removes it in any case
                containers.remove(state, name)
    for c in run.get("containers", []):
        client_seen = seen.get(c["container"]) or {}
        c["client_gap_ms"] = client_seen.get("max_gap_ms")
        c["client_gap_wall"] = client_seen.get("max_gap_wall")  # when: to line it up with the journal
        c["client_past_freeze"] = evacreport.past_freeze(c)
        c["connection_survived"] = bool(client_seen.get("survived"))
        if not c["connection_survived"]:
            run["ok"] = False
            run["error"] = run["error"] or f"{c['container']}: the client's connection did not survive"
    progress(f"{n} containers: {run.get('seconds', '-')} s" + (f", {run['error']}" if run["error"] else ""))
    return run


def _evacuate(parallel: int, timeout: float) -> dict[str, Any]:
    """`skyferry evacuate` as a user runs it; its JSON summary (exit 1 only says some container stayed)."""
    argv = [sys.executable, "-m", "skyferry.pipeline.cli", "evacuate", "--host", SOURCE, "--to", TARGET,
            "--parallel", str(parallel), "--json"]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    try:
        return json.loads(proc.stdout)
    except ValueError:
        lines = proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"]
        raise SkyferryError(f"skyferry evacuate gave no summary: {lines[-1]}") from None


def _container(state: Path, result: dict[str, Any]) -> dict[str, Any]:
    """One container's move: its numbers from the report, and when (wall clock) its migration started and
    finished, from the journal."""
    out: dict[str, Any] = {"container": result["container"], "state": result["state"], "error": result.get("error"),
                           "migration": result.get("migration_id")}  # fmt: skip
    report = result.get("migration") or {}
    keys = ("mode", "freeze_ms", "predicted_freeze_ms", "total_ms", "bytes_wire", "bytes_at_freeze", "stages_s",
            "precopy_stop", "bulk")  # fmt: skip
    out.update({k: report.get(k) for k in keys})
    out["rounds"] = [
        {k: r.get(k) for k in ("duration", "pages_changed", "bytes_out")} for r in report.get("rounds") or []
    ]
    if mig_id := result.get("migration_id"):
        mig = Journal(state).get(mig_id)
        transitions = Journal(state).transitions(mig_id)
        ends = [t["at"] for t in transitions if t["status"] == "done"]
        out["started"], out["finished"] = mig.started, max(ends) if ends else None
        out["frozen_wall"] = stages.frozen_wall(transitions)  # to tell a client's wait in it from one outside
    return out
