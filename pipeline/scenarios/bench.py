"""`skyferry bench`: every migration mode against stop-copy, on local hosts with an emulated WAN.

One mesh of three local hosts serves the whole bench. For each workload (a counter service holding N MiB
of realistic memory that it dirties at R MB/s) one container is migrated back and forth between local-1
and local-2, once per mode in `migration.MODES`, stop-copy first: every ratio compares a run with the
stop-copy run of the same workload, measured in the same process, on the same mesh, minutes apart. A
fresh client on local-3 holds one TCP connection through each run and reports its largest wait.

A failed run is recorded with its error and the bench goes on; the mesh is always torn down.
"""

import contextlib
import json
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from skyferry.netplane import netns
from skyferry.netplane.mesh import Mesh
from skyferry.pipeline.controller import containers, migration
from skyferry.pipeline.controller.journal import Journal
from skyferry.pipeline.controller.registry import Registry
from skyferry.pipeline.controller.stages import FREEZE_FROM, FREEZE_TO
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.scenarios import demo as scenario

BASELINE = "stop-copy"
WAN = "rate=1gbit,rtt=30ms"
IPERF_PORT = 5201
# The Targets table: freeze per size (MiB -> ms), the gap's allowance over the freeze, stream and bytes.
FREEZE_GOAL_MS = {256: 300.0, 1024: 500.0}
GAP_OVER_FREEZE_MS = 100.0
STREAM_GOAL = 0.9
BYTES_GOAL = 0.6
# Below this, a transfer's rate says more about its start-up than about the stream.
MIN_STREAM_BYTES = 4_000_000
HOSTS = ("local-1", "local-2")
UNSTICK_TIMEOUT_S = 60.0  # for the rollback (or resume) of a migration that hung
QUIET_BYTES = 256 << 10  # per half second: the overlay counts as idle after a run
Progress = Callable[[str], None]


@dataclass(frozen=True)
class Workload:
    memory_mib: int
    dirty_mb_s: float = 20.0

    @property
    def label(self) -> str:
        return f"{self.memory_mib // 1024} GiB" if self.memory_mib % 1024 == 0 else f"{self.memory_mib} MiB"


FULL = (Workload(256), Workload(1024))
QUICK = (Workload(64), Workload(256))


@dataclass
class Config:
    workloads: tuple[Workload, ...] = FULL
    modes: tuple[str, ...] = ()  # empty: every mode in migration.MODES, the baseline first
    wan: str | None = WAN
    settle_s: float = 4.0  # the workload dirties memory this long before each run, so rounds see its rate
    after_requests: int = 20  # the client must get this many answers after a run (1 s at 50 ms)
    warmup: bool = True  # one unmeasured migration per workload first, so no measured run starts cold
    iperf_s: float = 4.0
    ready_timeout_s: float = 180.0
    run_timeout_s: float = 180.0  # plus run_timeout_s_per_mib: a migration still going then is killed
    run_timeout_s_per_mib: float = 0.25
    mesh_name: str | None = None  # default: "bn" + 4 hex digits

    def mode_order(self) -> list[str]:
        modes = list(self.modes or migration.MODES)
        return sorted(modes, key=lambda m: m != BASELINE)  # stable: the baseline first, the rest as listed


def _say_nothing(_: str) -> None:
    pass


def run(cfg: Config, progress: Progress = _say_nothing) -> dict[str, Any]:
    """The whole bench: mesh up, iperf3 both ways, every workload in every mode, mesh down. Returns the
    result that `write` saves and `rows` tabulates."""
    result: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "config": {**asdict(cfg), "modes": cfg.mode_order()},
        "iperf3": {},
        "runs": [],
        "warmups": [],  # unmeasured: so that no measured run starts on cold hosts
        "errors": [],
    }
    t0 = time.monotonic()
    old_env = os.environ.get("SKYFERRY_STATE")
    state = Path(tempfile.mkdtemp(prefix="skyferry-bench-"))
    state.chmod(0o700)
    result["state_dir"] = str(state)
    os.environ["SKYFERRY_STATE"] = str(state)  # agents and anything they start use the bench's own state
    workdir = state / "work"
    workdir.mkdir()
    try:
        progress(f"bringing up 3 local hosts, WAN {cfg.wan or 'none'}")
        mesh = scenario.mesh_up(state, 3, cfg.wan, name=cfg.mesh_name or "bn" + secrets.token_hex(2))
        result["mesh"] = mesh.name
        for i, wl in enumerate(cfg.workloads):
            try:
                result["runs"] += _workload(state, mesh, workdir, cfg, wl, f"bench{i}", result, progress)
            except Exception as exc:  # this workload could not run at all; the next one may
                result["errors"].append(f"{wl.label}: {type(exc).__name__}: {exc}")
    except Exception as exc:  # the mesh could not come up: report that, tear down what there is
        result["errors"].append(f"{type(exc).__name__}: {exc}")
    finally:
        progress("tearing down the mesh")
        try:
            scenario.mesh_down(state)
        finally:
            shutil.rmtree(state, ignore_errors=True)
            if old_env is None:
                os.environ.pop("SKYFERRY_STATE", None)
            else:
                os.environ["SKYFERRY_STATE"] = old_env
    result["seconds"] = round(time.monotonic() - t0, 1)
    _add_ratios(result)
    return result


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
    """iperf3 both ways with the workload running, then every mode on one container, alternating
    direction, so each run starts where the last one ended."""
    runs: list[dict[str, Any]] = []
    base = name
    progress(f"{wl.label}: starting the workload on local-1 (touching {wl.memory_mib} MiB)")
    try:
        _start(state, wl, name, workdir, cfg.ready_timeout_s)
        perf = result["iperf3"][wl.label] = {}
        for src, dst in (HOSTS, HOSTS[::-1]):
            progress(f"{wl.label}: iperf3 {src} -> {dst} over the overlay")
            try:
                perf[f"{src}->{dst}"] = iperf3(mesh, src, dst, cfg.iperf_s)
            except (SkyferryError, OSError, subprocess.SubprocessError) as exc:
                result["errors"].append(f"{wl.label}: {exc}")
        plan = ([("warmup", migration.DEFAULT_MODE)] if cfg.warmup else []) + [("run", m) for m in cfg.mode_order()]
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
    scenario.start_counter(state, HOSTS[0], name, workdir, memory_mib=wl.memory_mib, dirty_mb_s=wl.dirty_mb_s)
    _wait_touched(state, name, wl.memory_mib << 20, timeout)


def _state(state: Path, name: str) -> str:
    """running, paused, frozen (migrating), missing, ... as the hosts' agents see it (no lock taken)."""
    return {r["name"]: r for r in containers.live(state)}.get(name, {}).get("state", "gone")


def _one_run(
    state: Path, mesh: Mesh, workdir: Path, cfg: Config, wl: Workload, name: str, mode: str, target: str
) -> dict[str, Any]:
    source = Registry(state).get(name).host
    ip = Registry(state).get(name).ip
    run: dict[str, Any] = {
        "workload": wl.label, "memory_mib": wl.memory_mib, "dirty_mb_s": wl.dirty_mb_s, "mode": mode,
        "source": source, "target": target, "ok": False, "error": None,
    }  # fmt: skip
    client = scenario.CounterClient(mesh.hosts["local-3"].netns or "", ip, workdir)
    try:
        client.start()
        time.sleep(cfg.settle_s)
        run["rss_bytes"] = tree_rss(_pid(state, name))
        timeout = cfg.run_timeout_s + cfg.run_timeout_s_per_mib * wl.memory_mib
        overlay_before = overlay_bytes(mesh)
        try:
            report = _call(["migrate", name, target, mode], timeout)
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
    at: dict[tuple[str, str], float] = {}
    for t in transitions:
        at.setdefault((t["stage"], t["status"]), t["at"])
    frozen, restored = at.get((FREEZE_FROM, "started")), at.get((FREEZE_TO, "done"))
    return {
        "migration": mig_id,
        "stages_done": [t["stage"] for t in transitions if t["status"] == "done"],
        "freeze_ms": round((restored - frozen) * 1000, 1) if frozen and restored else None,
    }


def _child(argv: list[str]) -> int:
    """`python -m skyferry.pipeline.scenarios.bench migrate NAME TARGET MODE | rollback ID | resume ID`: prints the
    report (or {"error"}) as one JSON line."""
    state = Path(os.environ["SKYFERRY_STATE"])
    try:
        match argv:
            case ["migrate", name, target, mode]:
                report = migration.migrate(state, name, target, mode)
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
        "total_ms": report.get("total_ms"),
        "bytes_wire": report.get("bytes_wire"),
        "bytes_at_freeze": report.get("bytes_at_freeze"),
        "rounds": len(rounds),
        "precopy_stop": report.get("precopy_stop"),
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
        r["goals"] = _goals(r)


def _goals(r: dict[str, Any]) -> dict[str, bool]:
    goals: dict[str, bool] = {}
    if r.get("freeze_ms") is not None and r["memory_mib"] in FREEZE_GOAL_MS:
        goals["freeze"] = r["freeze_ms"] <= FREEZE_GOAL_MS[r["memory_mib"]]
    if r.get("freeze_ms") is not None and r.get("client_gap_ms") is not None:
        goals["client_gap"] = r["client_gap_ms"] <= r["freeze_ms"] + GAP_OVER_FREEZE_MS
    if r.get("stream", {}).get("vs_iperf3") is not None:
        goals["stream"] = r["stream"]["vs_iperf3"] >= STREAM_GOAL
    if r.get("bytes_per_rss") is not None:
        goals["bytes"] = r["bytes_per_rss"] <= BYTES_GOAL
    return goals


# --- measurements around the runs ----------------------------------------------------------------------


def iperf3(mesh: Mesh, src: str, dst: str, seconds: float, attempts: int = 3) -> dict[str, Any]:
    """TCP throughput from host `src` to host `dst` over the overlay, as the agents' streams go: the server
    in dst's netns on its overlay address, the client in src's netns, an 8 MiB window. A test that ends
    without a result (the server not listening yet, a control connection lost) is tried again."""
    server_ns, client_ns = mesh.host(dst).netns, mesh.host(src).netns
    ip = mesh.host(dst).overlay_ip
    if server_ns is None or client_ns is None:
        raise SkyferryError("iperf3 needs local hosts (network namespaces)")
    argv = ["iperf3", "-c", ip, "-p", str(IPERF_PORT), "-w", "8M", "-t", str(max(1, round(seconds))), "-J"]
    errors: list[str] = []
    for _ in range(attempts):
        server = subprocess.Popen(
            netns.command(server_ns, ["iperf3", "-s", "-1", "-B", ip, "-p", str(IPERF_PORT)]),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            for _ in range(50):  # the server needs a moment to listen
                proc = subprocess.run(netns.command(client_ns, argv), capture_output=True, text=True,
                                      timeout=seconds + 30)  # fmt: skip
                if "Connection refused" not in proc.stdout + proc.stderr:
                    break
                time.sleep(0.1)
        finally:
            if server.poll() is None:
                server.kill()
            server.wait()
        data: dict[str, Any] = {}
        with contextlib.suppress(ValueError):
            data = json.loads(proc.stdout)
        received = (data.get("end") or {}).get("sum_received")
        if not received:
            lines = proc.stderr.strip().splitlines()
            errors.append(data.get("error") or (lines[-1] if lines else f"exit status {proc.returncode}"))
            continue
        return {
            "mbit_s": round(received["bits_per_second"] / 1e6, 1),
            "seconds": round(received["seconds"], 2),
            "retransmits": data["end"].get("sum_sent", {}).get("retransmits"),
            "window": "8M",
            "failed_attempts": errors,
        }
    raise SkyferryError(f"iperf3 {src} -> {dst} gave no result: {'; '.join(errors)}")


def _pid(state: Path, name: str) -> int:
    row = {r["name"]: r for r in containers.live(state)}.get(name) or {}
    if not row.get("pid"):
        raise SkyferryError(f"bench container {name!r} is {row.get('state', 'gone')}")
    return int(row["pid"])


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and its descendants."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
        total += next((int(ln.split()[1]) * 1024 for ln in status.splitlines() if ln.startswith("VmRSS:")), 0)
    return total


def _wait_touched(state: Path, name: str, size: int, timeout: float) -> None:
    """Until the workload holds its memory: RSS at least `size` and steady for a second (building the
    buffer briefly takes twice that)."""
    deadline = time.monotonic() + timeout
    last = -1
    while time.monotonic() < deadline:
        rss = tree_rss(_pid(state, name))
        if rss >= size and abs(rss - last) < size * 0.02:
            return
        last = rss
        time.sleep(1.0)
    raise SkyferryError(f"the bench workload did not reach {size >> 20} MiB resident in {timeout:.0f} s")


def machine() -> dict[str, Any]:
    cpu = _proc_field("/proc/cpuinfo", "model name") or platform.processor() or "unknown"
    mem = int(_proc_field("/proc/meminfo", "MemTotal").split()[0])
    return {
        "nproc": os.cpu_count(),
        "kernel": platform.release(),
        "cpu": cpu,
        "memory_gb": round(mem / 1e6, 1),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
        "note": "shared VM: other engineers' tests run on the same 2 cores; timings vary run to run",
    }


def _proc_field(path: str, key: str) -> str:
    for line in Path(path).read_text().splitlines():
        if line.startswith(key):
            return line.split(":", 1)[1].strip()
    return ""


def machine_line(m: dict[str, Any]) -> str:
    return (f"{m['nproc']} cores ({m['cpu']}), kernel {m['kernel']}, {m['memory_gb']} GB RAM, "
            f"load average {m['load_avg'][0]} at start, shared VM")  # fmt: skip


# --- outputs ---------------------------------------------------------------------------------------------

COLUMNS = ["workload", "mode", "freeze ms", "client gap ms", "total s", "overlay bytes", "÷ RSS",
           "rounds (stop)", "stream vs iperf3", "ok"]  # fmt: skip


def rows(result: dict[str, Any]) -> list[list[str]]:
    """One table row per run; ratios to the same workload's stop-copy run in parentheses."""
    out = []
    for r in result["runs"]:
        ratio = r.get("ratios", {})
        stream = r.get("stream") or {}
        rounds = f"{r['rounds']} ({r['precopy_stop']})" if r.get("rounds") else "-"
        vs = f"{stream['mbit_s']:.0f} Mbit/s ({stream['vs_iperf3']:.0%})" if "vs_iperf3" in stream else "-"
        out.append([
            r["workload"], r["mode"],
            _with_ratio(r.get("freeze_ms"), ratio.get("freeze_ms"), "{:.0f}"),
            _with_ratio(r.get("client_gap_ms"), ratio.get("client_gap_ms"), "{:.0f}"),
            _with_ratio(r["total_ms"] / 1000 if r.get("total_ms") else None, ratio.get("total_ms"), "{:.1f}"),
            _with_ratio(r["overlay_bytes"] / 1e6 if r.get("overlay_bytes") else None, ratio.get("overlay_bytes"),
                        "{:.0f} MB"),
            f"{r['bytes_per_rss']:.2f}" if r.get("bytes_per_rss") is not None else "-",
            rounds, vs,
            "yes" if r["ok"] else f"FAILED: {r['error']}",
        ])  # fmt: skip
    return out


def _with_ratio(value: float | None, ratio: float | None, fmt: str) -> str:
    if value is None:
        return "-"
    text = fmt.format(value)
    return f"{text} (x{ratio:.2f})" if ratio is not None else text


def iperf3_line(result: dict[str, Any]) -> str:
    order = list(dict.fromkeys([r["workload"] for r in result["runs"]] + list(result["iperf3"])))  # bench order
    parts = [f"{w}: " + ", ".join(f"{d} {v['mbit_s']:.0f} Mbit/s" for d, v in result["iperf3"][w].items())
             for w in order if result["iperf3"].get(w)]  # fmt: skip
    return "; ".join(parts) or "not measured"


def markdown(result: dict[str, Any]) -> str:
    """Both tables as Markdown, for the README."""

    def table(header: list[str], body: list[list[str]]) -> str:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in body]
        return "\n".join(lines)

    cfg = result["config"]
    return "\n\n".join([
        f"WAN `{cfg.get('wan') or 'none'}`; each workload dirties {cfg['workloads'][0]['dirty_mb_s']:g} MB/s; "
        f"(xN) is the ratio to the same workload's stop-copy run in this bench.",
        table(COLUMNS, rows(result)),
        table(["", "stop-copy", "best mode", "goal"], targets(result)),
        f"iperf3 over the overlay (8 MiB window), measured before each workload's runs: {iperf3_line(result)}.",
        f"Machine: {machine_line(result['machine'])}. Bench took {result['seconds']:.0f} s"
        + (f"; errors: {'; '.join(result['errors'])}" if result["errors"] else "") + ".",
    ]) + "\n"  # fmt: skip


def write(result: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """bench.json, bench.md and bench.png into `out_dir`; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "bench.json", "md": out_dir / "bench.md", "png": out_dir / "bench.png"}
    tmp = paths["json"].with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2, sort_keys=True, default=str) + "\n")
    tmp.replace(paths["json"])
    paths["md"].write_text(markdown(result))
    plot(result, paths["png"])
    return paths


def plot(result: dict[str, Any], path: Path) -> None:
    """Grouped bars per workload, one bar per mode: freeze, client's largest gap (log scale), and bytes on
    the wire ÷ RSS; dashed lines are the issue's goals (for the gap: each run's freeze + 100 ms). Failed runs
    leave a gap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(r["workload"] for r in result["runs"]))
    modes = list(dict.fromkeys(r["mode"] for r in result["runs"]))
    by = {(r["workload"], r["mode"]): r for r in result["runs"] if r["ok"]}
    mib = {r["workload"]: r["memory_mib"] for r in result["runs"]}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    width = 0.8 / max(1, len(modes))
    panels = [("freeze_ms", "freeze (ms)", True), ("client_gap_ms", "client's largest gap (ms)", True),
              ("bytes_per_rss", "bytes on the wire ÷ RSS", False)]  # fmt: skip
    for ax, (key, title, log) in zip(axes, panels, strict=True):
        for j, mode in enumerate(modes):
            xs = [i + (j - (len(modes) - 1) / 2) * width for i in range(len(workloads))]
            ys = [(by.get((w, mode)) or {}).get(key) or 0.0 for w in workloads]
            bars = ax.bar(xs, ys, width, label=mode)
            ax.bar_label(bars, labels=[(f"{y:.2f}" if key == "bytes_per_rss" else f"{y:.0f}") if y else ""
                                       for y in ys], fontsize=6)  # fmt: skip
            for x, w in zip(xs, workloads, strict=True):
                if (w, mode) not in by:  # failed or not run: say so where the bar would stand
                    ax.annotate("failed", (x, 0.02), xycoords=("data", "axes fraction"), ha="center", va="bottom",
                                rotation=90, fontsize=7, color="tab:red")  # fmt: skip
            if key == "client_gap_ms":  # each run's own goal: its freeze + 100 ms
                for x, w in zip(xs, workloads, strict=True):
                    if (freeze := (by.get((w, mode)) or {}).get("freeze_ms")) is not None:
                        ax.hlines(freeze + GAP_OVER_FREEZE_MS, x - width / 2, x + width / 2, colors="black",
                                  linestyles="dashed", linewidth=1)  # fmt: skip
        for i, w in enumerate(workloads):
            goal = {"freeze_ms": FREEZE_GOAL_MS.get(mib[w]), "bytes_per_rss": BYTES_GOAL}.get(key)
            if goal:
                ax.hlines(goal, i - 0.45, i + 0.45, colors="black", linestyles="dashed", linewidth=1)
        ax.set_xticks(range(len(workloads)), workloads)
        ax.set_title(title)
        if log and any(r.get(key) for r in by.values()):
            ax.set_yscale("log")
            ax.set_ylim(bottom=10)  # bars from 10 ms, so their heights compare
    if modes:
        axes[0].legend(fontsize=8)
    m = result.get("machine", {})
    fig.suptitle(f"skyferry bench, WAN {result['config'].get('wan') or 'none'}; {machine_line(m) if m else ''}",
                 fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def targets(result: dict[str, Any]) -> list[list[str]]:
    """The issue's Targets table filled in, per workload: stop-copy, and on each row the best of the other
    modes for that row (with its name)."""
    out = []
    for w in dict.fromkeys(r["workload"] for r in result["runs"]):
        ok = [r for r in result["runs"] if r["workload"] == w and r["ok"]]
        base = next((r for r in ok if r["mode"] == BASELINE), None)
        others = [r for r in ok if r["mode"] != BASELINE]
        goal = FREEZE_GOAL_MS.get(next(r["memory_mib"] for r in result["runs"] if r["workload"] == w))
        out += [
            [f"freeze, {w}", _ms(base), _best(others, lambda r: r.get("freeze_ms"), _ms),
             f"≤ {goal:.0f} ms" if goal else "-"],
            [f"client's largest gap, {w}", _gap_text(base), _best(others, _over, _gap_text),
             f"≤ freeze + {GAP_OVER_FREEZE_MS:.0f} ms"],
            [f"memory stream vs iperf3, {w}", _pct(base), _best(others, _vs, _pct, low=False), f"≥ {STREAM_GOAL:.0%}"],
            [f"bytes on the wire ÷ RSS, {w}", _per_rss(base), _best(others, lambda r: r.get("bytes_per_rss"), _per_rss),
             f"≤ {BYTES_GOAL}"],
        ]  # fmt: skip
    return out


def _best(
    runs: list[dict[str, Any]], value: Callable[[dict[str, Any]], float | None],
    fmt: Callable[[dict[str, Any]], str], low: bool = True,
) -> str:  # fmt: skip
    rated = [r for r in runs if value(r) is not None]
    if not rated:
        return "-"
    pick = (min if low else max)(rated, key=lambda r: value(r) or 0.0)
    return f"{fmt(pick)} ({pick['mode']})"


def _over(r: dict[str, Any]) -> float | None:
    """How much longer the client waited than the container was frozen."""
    return r["client_gap_ms"] - r["freeze_ms"] if r.get("freeze_ms") and r.get("client_gap_ms") else None


def _vs(r: dict[str, Any]) -> float | None:
    return (r.get("stream") or {}).get("vs_iperf3")


def _gap_text(r: dict[str, Any] | None) -> str:
    over = _over(r) if r else None
    return f"{r['client_gap_ms']:.0f} ms (freeze {over:+.0f})" if r and over is not None else "-"


def _pct(r: dict[str, Any] | None) -> str:
    return f"{_vs(r):.0%}" if r and _vs(r) is not None else "-"


def _per_rss(r: dict[str, Any] | None) -> str:
    return f"{r['bytes_per_rss']:.2f}" if r and r.get("bytes_per_rss") is not None else "-"


def _ms(r: dict[str, Any] | None, key: str = "freeze_ms") -> str:
    return f"{r[key]:.0f} ms" if r is not None and r.get(key) is not None else "-"


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
