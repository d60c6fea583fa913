"""`skyferry bench`: issue 16's whole Targets table from one run, on local hosts with an emulated WAN.

One mesh of three local hosts serves every part of the bench, in this order:

1. Migrations. For each workload (a counter service holding N MiB of realistic or incompressible memory
   that it dirties at R MB/s; 0 MiB is the tiny service `make demo` moves) one container is migrated back
   and forth between local-1 and local-2, once per mode (the workload's own, or every mode in
   `migration.MODES`), stop-copy first: every ratio compares a run with the stop-copy run of the same
   workload, measured in the same process, on the same mesh, minutes apart. A fresh client on local-3
   holds one TCP connection through each run and reports its largest wait.
2. Evacuations of several containers at once and the Podman baseline (bench_evacuate), last, so that their
   many parallel migrations do not feed the freeze costs the controller learns per host pair
   (controller/freezecost.py) before the migrations above are measured.

The goals and the workloads are in benchtargets. A failed run is recorded with its error and the bench
goes on; the mesh is always torn down.
"""

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from skyferry.netplane.mesh import Mesh
from skyferry.pipeline.controller import containers, migration
from skyferry.pipeline.controller.journal import Journal
from skyferry.pipeline.controller.registry import Registry
from skyferry.pipeline.controller.stages import freeze_s
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.hostapi.layout import FREEZE_TIMEOUT
from skyferry.pipeline.proctree import tree_rss
from skyferry.pipeline.scenarios import bench_evacuate, benchhosts
from skyferry.pipeline.scenarios import demo as scenario
from skyferry.pipeline.scenarios.benchhosts import Progress, iperf3, say_nothing, wait_touched
from skyferry.pipeline.scenarios.benchreport import machine
from skyferry.pipeline.scenarios.benchtargets import BASELINE, FULL, WAN, Workload, run_goals, targets

# Below this, a transfer's rate says more about its start-up than about the stream.
MIN_STREAM_BYTES = 4_000_000
HOSTS = ("local-1", "local-2")
UNSTICK_TIMEOUT_S = 60.0  # for the rollback (or resume) of a migration that hung
QUIET_BYTES = 256 << 10  # per half second: the overlay counts as idle after a run


@dataclass
class Config:
    workloads: tuple[Workload, ...] = FULL
    modes: tuple[str, ...] = ()  # for workloads without modes of their own; empty: every mode in MODES
    evacuate: bench_evacuate.Config | None = field(default_factory=bench_evacuate.Config)  # None: skip it
    wan: str | None = WAN
    settle_s: float = 4.0  # the workload dirties memory this long before each run, so rounds see its rate
    after_requests: int = 20  # the client must get this many answers after a run (1 s at 50 ms)
    warmup: bool = True  # one unmeasured migration per workload first, so no measured run starts cold
    iperf_s: float = 4.0
    ready_timeout_s: float = 180.0
    run_timeout_s: float = 180.0  # plus run_timeout_s_per_mib: a migration still going then is killed
    run_timeout_s_per_mib: float = 0.25
    # The baseline's freeze bound (`migrate --freeze-timeout`): stop-copy moves all of memory inside its
    # freeze, which on a loaded machine passes the default 30 s at 512 MiB incompressible, and a baseline
    # rolled back leaves nothing to compare with. Every other mode keeps the default a user gets.
    baseline_freeze_timeout_s: float = 120.0
    mesh_name: str | None = None  # default: "bn" + 4 hex digits
    keep_logs: Path | None = None  # where the CRIU logs of failed and outlying migrations are kept (outliers)
    warm_memory_gib: float = 6.0  # touched once before anything runs (benchhosts.warm_memory); 0: not

    def mode_order(self, wl: Workload) -> list[str]:
        modes = list(wl.modes or self.modes or migration.MODES)
        return sorted(modes, key=lambda m: m != BASELINE)  # stable: the baseline first, the rest as listed


def run(cfg: Config, progress: Progress = say_nothing) -> dict[str, Any]:
    """The whole bench: mesh up, every workload in its modes (iperf3 both ways before each), then the
    evacuations and the Podman baseline, mesh down. Returns the result that benchreport writes and
    tabulates; `result["targets"]` is issue 16's Targets table filled in."""
    result: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "config": {
            **asdict(cfg),
            "workloads": [{**asdict(wl), "label": wl.label, "modes": cfg.mode_order(wl)} for wl in cfg.workloads],
        },
        "iperf3": {},
        "runs": [],
        "warmups": [],  # unmeasured: so that no measured run starts on cold hosts
        "evacuate": None,
        "errors": [],
    }
    t0 = time.monotonic()
    result["machine"]["first_touch_s_per_gib"] = benchhosts.warm_memory(cfg.warm_memory_gib, progress)
    try:
        with benchhosts.hosts(cfg.wan, cfg.mesh_name or "bn" + secrets.token_hex(2), progress) as (state, mesh):
            result["mesh"], result["state_dir"] = mesh.name, str(state)
            workdir = state / "work"
            for i, wl in enumerate(cfg.workloads):
                try:
                    result["runs"] += _workload(state, mesh, workdir, cfg, wl, f"bench{i}", result, progress)
                except Exception as exc:  # this workload could not run at all; the next one may
                    result["errors"].append(f"{wl.label}: {type(exc).__name__}: {exc}")
            if cfg.evacuate is not None:
                evac = result["evacuate"] = bench_evacuate.measure(state, mesh, workdir, cfg.evacuate, progress)
                result["errors"] += [f"evacuate: {e}" for e in evac["errors"]]
            if cfg.keep_logs is not None and (odd := benchhosts.outliers(result)):
                progress(f"keeping the CRIU logs of {len(odd)} failed or outlying migration(s) in {cfg.keep_logs}")
                try:
                    result["kept_logs"] = benchhosts.keep_logs(state, odd, cfg.keep_logs)
                except OSError as exc:  # the measurements stand; only their evidence is missing
                    result["errors"].append(f"keeping logs in {cfg.keep_logs}: {exc}")
    except Exception as exc:  # the mesh could not come up: report that (the hosts are torn down)
        result["errors"].append(f"{type(exc).__name__}: {exc}")
    result["seconds"] = round(time.monotonic() - t0, 1)
    _add_ratios(result)
    result["targets"] = [asdict(t) for t in targets(result)]
    return result


def failed(result: dict[str, Any]) -> bool:
    """Whether any part of the bench failed: an error, a failed run or evacuation, or the Podman baseline."""
    evac = result.get("evacuate") or {}
    return bool(
        result["errors"]
        or not (result["runs"] or evac.get("runs") or evac.get("podman"))  # nothing ran at all
        or not all(r["ok"] for r in [*result["runs"], *evac.get("runs", [])])
        or (evac.get("podman") is not None and not evac["podman"]["ok"])
    )


def _workload(
    state: Path,
    mesh: Mesh,
    workdir: Path,
    cfg: Config,
    wl: Workload,
    name: str,
    result: dict[str, Any],
    progress: Progress,
) -> list[dict[str, Any]]:
    """iperf3 both ways with the workload running, then each of its modes on one container, alternating
    direction, so each run starts where the last one ended."""
    runs: list[dict[str, Any]] = []
    base = name
    touching = f" (touching {wl.memory_mib} MiB)" if wl.memory_mib else ""
    progress(f"{wl.label}: starting the workload on local-1{touching}")
    try:
        _start(state, wl, name, workdir, cfg.ready_timeout_s)
        perf = result["iperf3"][wl.label] = {}
        for src, dst in (HOSTS, HOSTS[::-1]):
            progress(f"{wl.label}: iperf3 {src} -> {dst} over the overlay")
            try:
                perf[f"{src}->{dst}"] = iperf3(mesh, src, dst, cfg.iperf_s)
            except (SkyferryError, OSError, subprocess.SubprocessError) as exc:
                result["errors"].append(f"{wl.label}: {exc}")
        plan = ([("warmup", migration.DEFAULT_MODE)] if cfg.warmup else []) + [("run", m) for m in cfg.mode_order(wl)]
        for k, (kind, mode) in enumerate(plan):
            host = Registry(state).get(name).host
            target = HOSTS[1] if host == HOSTS[0] else HOSTS[0]
            progress(f"{wl.label}: {kind} {mode} {host} -> {target}")
            one = _one_run(state, mesh, workdir, cfg, wl, name, mode, target)
            (runs if kind == "run" else result["warmups"]).append(one)
            if not one["error"]:
                continue
            progress(f"{wl.label}: {kind} {mode} failed: {one['error']}")
            if one.get("hung") and Journal(state).active_for(name) is not None:
                # Still mid-migration (post-copy waiting for its pages): the hosts may hold its lock for
                # minutes. Leave it to the teardown and go on with a fresh copy of the workload.
                name = f"{base}-{k}"
                progress(f"{wl.label}: {mode} left its container mid-migration; starting another one as {name}")
                _start(state, wl, name, workdir, cfg.ready_timeout_s)
            elif _state(state, name) != "running":
                progress(f"{wl.label}: the container is {_state(state, name)}; starting it again")
                with contextlib.suppress(Exception):
                    containers.remove(state, name)
                _start(state, wl, name, workdir, cfg.ready_timeout_s)
    finally:
        if Journal(state).active_for(name) is None:
            with contextlib.suppress(Exception):  # the mesh teardown removes it in any case
                containers.remove(state, name)
    return runs


def _start(state: Path, wl: Workload, name: str, workdir: Path, timeout: float) -> None:
    scenario.start_counter(state, HOSTS[0], name, workdir, memory_mib=wl.memory_mib, dirty_mb_s=wl.dirty_mb_s,
                           incompressible=wl.incompressible)  # fmt: skip
    if wl.memory_mib:  # the tiny service holds nothing: its client's first answer says it is up
        wait_touched(state, name, wl.memory_mib << 20, timeout)


def _state(state: Path, name: str) -> str:
    """running, paused, frozen (migrating), missing, ... as the hosts' agents see it (no lock taken)."""
    return {r["name"]: r for r in containers.live(state)}.get(name, {}).get("state", "gone")


def _one_run(
    state: Path, mesh: Mesh, workdir: Path, cfg: Config, wl: Workload, name: str, mode: str, target: str
) -> dict[str, Any]:
    source = Registry(state).get(name).host
    ip = Registry(state).get(name).ip
    run: dict[str, Any] = {
        "workload": wl.label, "memory_mib": wl.memory_mib, "dirty_mb_s": wl.dirty_mb_s,
        "incompressible": wl.incompressible, "mode": mode,
        "source": source, "target": target, "ok": False, "error": None,
    }  # fmt: skip
    client = scenario.CounterClient(mesh.hosts["local-3"].netns or "", ip, workdir)
    try:
        client.start()
        time.sleep(cfg.settle_s)
        run["rss_bytes"] = tree_rss(benchhosts.pid(state, name))
        timeout = cfg.run_timeout_s + cfg.run_timeout_s_per_mib * wl.memory_mib
        overlay_before = overlay_bytes(mesh)
        try:
            run["freeze_timeout_s"] = cfg.baseline_freeze_timeout_s if mode == BASELINE else FREEZE_TIMEOUT
            report = _call(["migrate", name, target, mode, f"{run['freeze_timeout_s']:g}"], timeout)
        except _Hung:
            run["hung"] = True
            mig = Journal(state).active_for(name)
            _unstick(state, name, UNSTICK_TIMEOUT_S)
            if mig is not None:
                run.update(_journalled(state, mig.id))
            raise
        run["report"] = report
        run.update(_measures(report))
        client.wait_for(client.progress() + cfg.after_requests, timeout=60)  # the connection carries on
        run["overlay_bytes"] = _overlay_quiet(mesh) - overlay_before
        run["ok"] = report["state"] == "done"
    except Exception as exc:
        run["error"] = str(exc) or type(exc).__name__
    finally:
        seen = client.stop()
    run["client"] = seen
    run["client_gap_ms"] = seen.get("max_gap_ms")
    run["connection_survived"] = bool(seen.get("survived"))
    if run["ok"] and not run["connection_survived"]:
        run["ok"] = False
        run["error"] = f"the client's connection did not survive: {seen.get('errors')}"
    if run.get("overlay_bytes") and run.get("rss_bytes"):
        run["bytes_per_rss"] = round(run["overlay_bytes"] / run["rss_bytes"], 3)
    return run


def overlay_bytes(mesh: Mesh) -> int:
    """Bytes the two migration hosts have sent on their WireGuard interfaces: everything between them
    (streams with their TLS, TCP and IP headers; lazy pages served after the restore), plus the little
    the client and the controller exchange with them."""
    total = 0
    for name in HOSTS:
        host = mesh.host(name)
        out = subprocess.run(["ip", "-n", host.netns or "", "-j", "-s", "link", "show", "dev", host.interface],
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
        total += json.loads(out)[0]["stats64"]["tx"]["bytes"]
    return total


def _overlay_quiet(mesh: Mesh, timeout: float = 120.0) -> int:
    """The overlay counters once traffic has died down (post-copy keeps fetching pages after the restore)."""
    last = overlay_bytes(mesh)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = overlay_bytes(mesh)
        if now - last < QUIET_BYTES:
            return now
        last = now
    return last


class _Hung(SkyferryError):
    """A controller operation did not finish in time and was killed."""


def _call(args: list[str], timeout: float) -> dict[str, Any]:
    """One controller operation (migrate, rollback, resume) in a child process, so that a hung one can be
    killed like a crashed controller; the journal lets the next operation undo or finish it."""
    argv = [sys.executable, "-m", "skyferry.pipeline.scenarios.bench", *args]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: the child and nothing else
        proc.communicate()
        raise _Hung(f"{args[0]} {' '.join(args[1:])} did not finish in {timeout:.0f} s; killed") from None
    lines = out.strip().splitlines()
    data = json.loads(lines[-1]) if lines else {}
    if proc.returncode != 0:
        detail = data.get("error") or (err.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        raise SkyferryError(detail)
    return data


def _unstick(state: Path, name: str, timeout: float) -> None:
    """After a killed migration: roll it back, or if it is past the point of no return, finish it."""
    mig = Journal(state).active_for(name)
    if mig is None:
        return
    for op in ("rollback", "resume"):
        with contextlib.suppress(SkyferryError):
            _call([op, mig.id], timeout)
            return


def _journalled(state: Path, mig_id: str) -> dict[str, Any]:
    """What the journal holds of a migration that did not finish in time: the stages it got done, and its
    freeze if the restore was one of them (post-copy freezes briefly, then waits for its lazy pages)."""
    transitions = Journal(state).transitions(mig_id)
    freeze = freeze_s(transitions)
    return {
        "migration": mig_id,
        "stages_done": [t["stage"] for t in transitions if t["status"] == "done"],
        "freeze_ms": round(freeze * 1000, 1) if freeze is not None else None,
    }


def _child(argv: list[str]) -> int:
    """`python -m skyferry.pipeline.scenarios.bench migrate NAME TARGET MODE FREEZE_TIMEOUT | rollback ID |
    resume ID`: prints the report (or {"error"}) as one JSON line."""
    state = Path(os.environ["SKYFERRY_STATE"])
    try:
        match argv:
            case ["migrate", name, target, mode, freeze_timeout]:
                report = migration.migrate(state, name, target, mode, freeze_timeout=float(freeze_timeout))
            case ["rollback", mig_id]:
                report = migration.rollback(state, mig_id)
            case ["resume", mig_id]:
                report = migration.resume(state, mig_id)
            case _:
                raise SkyferryError(f"bad arguments: {argv}")
    except SkyferryError as exc:
        print(json.dumps({"error": str(exc)}))
        return 2
    print(json.dumps(report, default=str))
    return 0


def _measures(report: dict[str, Any]) -> dict[str, Any]:
    """The numbers the table shows, from one migration report; the memory stream's rate comes from the
    first pre-copy round (all of memory, while the container runs) or else from the transfer stage."""
    rounds = report.get("rounds") or []
    out: dict[str, Any] = {
        "freeze_ms": report.get("freeze_ms"),
        "mode_chosen": report.get("mode"),  # auto: the finish its rounds chose (report's mode_reason says why)
        "predicted_freeze_ms": report.get("predicted_freeze_ms"),
        "total_ms": report.get("total_ms"),
        "bytes_wire": report.get("bytes_wire"),
        "bytes_at_freeze": report.get("bytes_at_freeze"),
        "rounds": len(rounds),
        "precopy_stop": report.get("precopy_stop"),
        # auto-converge: the deepest CPU throttle the rounds reached (0: none)
        "throttle_percent": max((s["percent"] for s in report.get("throttle_steps") or []), default=0),
    }
    if rounds:
        stream_bytes, stream_s, source = rounds[0]["bytes_out"], rounds[0]["duration"], "precopy round 1"
    else:
        stream_bytes, stream_s, source = report.get("bytes_at_freeze"), report["stages_s"].get("transfer"), "transfer"
    if stream_bytes and stream_s and stream_bytes >= MIN_STREAM_BYTES:
        out["stream"] = {"from": source, "bytes": stream_bytes, "seconds": stream_s,
                         "mbit_s": round(stream_bytes * 8 / stream_s / 1e6, 1)}  # fmt: skip
        if rounds:  # memory moved per second, before compression and zero-page elision
            out["stream"]["memory_mbit_s"] = round(rounds[0]["pages_changed"] * 4096 * 8 / stream_s / 1e6, 1)
    return out


def _add_ratios(result: dict[str, Any]) -> None:
    """Each run against the stop-copy run of the same workload in this result, and its stream against
    iperf3 measured just before that workload's runs, in the same direction."""
    base = {r["workload"]: r for r in result["runs"] if r["mode"] == BASELINE and r["ok"]}
    for r in result["runs"]:
        b = base.get(r["workload"])
        r["ratios"] = {}
        for key in ("freeze_ms", "client_gap_ms", "total_ms", "bytes_wire", "overlay_bytes"):
            if r["ok"] and b is not None and r.get(key) is not None and b.get(key):
                r["ratios"][key] = round(r[key] / b[key], 3)
        perf = result["iperf3"].get(r["workload"], {}).get(f"{r['source']}->{r['target']}")
        if r.get("stream") and perf:
            r["stream"]["iperf3_mbit_s"] = perf["mbit_s"]
            r["stream"]["vs_iperf3"] = round(r["stream"]["mbit_s"] / perf["mbit_s"], 3)
        r["goals"] = run_goals(r)


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
