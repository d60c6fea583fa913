"""What `skyferry bench` runs and what it must reach: the workloads, the goals, and issue 16's Targets table.

Every goal and every figure the issue started from lives here, so the table, the per-run checks, the plot
and the docs agree. `targets(result)` fills the table in from one bench's result; it is a pure function,
tested without hosts.
"""

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from skyferry.pipeline.controller.migration import DEFAULT_MODE

BASELINE = "stop-copy"
WAN = "rate=1gbit,rtt=30ms"  # `make demo`'s too, so the tiny service sees the demo's link

# Issue 16's goals (the freeze by workload memory in MiB, 0 being the tiny service), and the figures the
# issue measured when it was filed (its "now" column), for the same workloads.
FREEZE_GOAL_MS = {0: 150.0, 256: 300.0, 1024: 500.0}
FREEZE_NOW_MS = {0: 502.0, 256: 797.0, 1024: 4536.0}
GAP_OVER_FREEZE_MS = 50.0  # the client's largest gap: at most the freeze plus this
GAP_NOW = "freeze ± 50 ms"
INCOMPRESSIBLE = (512, 20.0)  # MiB, MB/s: the workload the next goal is for
INCOMPRESSIBLE_GAP_GOAL = 0.05  # its client's gap in the default mode ÷ in stop-copy
INCOMPRESSIBLE_GAP_NOW = 0.23
EVACUATION = (8, 64)  # containers, MiB of incompressible memory: the workload the next goal is for
EVACUATION_GOAL = 1.2  # its evacuation's seconds ÷ the seconds iperf3's rate needs for that memory
EVACUATION_NOW = 1.6
# Issue 5's per-run checks (the runs table's last columns): a memory stream at iperf3's rate or near it,
# and bytes on the wire well under the memory moved.
STREAM_GOAL = 0.9
BYTES_GOAL = 0.6


@dataclass(frozen=True)
class Workload:
    """The counter service holding `memory_mib` of realistic (about 3 times compressible) or incompressible
    memory that it rewrites at `dirty_mb_s`; 0 MiB is the tiny service `make demo` moves. `modes`: the
    modes to run it in (empty: the bench's)."""

    memory_mib: int
    dirty_mb_s: float = 20.0
    incompressible: bool = False
    modes: tuple[str, ...] = field(default=(), compare=False)

    @property
    def label(self) -> str:
        if not self.memory_mib:
            return "tiny service"
        size = f"{self.memory_mib // 1024} GiB" if self.memory_mib % 1024 == 0 else f"{self.memory_mib} MiB"
        return f"{size} incompressible" if self.incompressible else size

    @property
    def part(self) -> str:
        """Its name for `skyferry bench --skip`."""
        if not self.memory_mib:
            return "tiny"
        return "incompressible" if self.incompressible else self.label.replace(" ", "").lower()


TINY = Workload(0, 0.0, modes=(BASELINE, DEFAULT_MODE))  # what `make demo` moves, in the default mode
FULL = (
    TINY,
    Workload(256),
    Workload(1024),
    Workload(*INCOMPRESSIBLE, incompressible=True, modes=(BASELINE, DEFAULT_MODE)),
)
QUICK = (TINY, Workload(256), Workload(64, 20.0, incompressible=True, modes=(BASELINE, DEFAULT_MODE)))
EVACUATE_COUNTS, EVACUATE_MIB = (1, 4, EVACUATION[0]), EVACUATION[1]
QUICK_EVACUATE_COUNTS, QUICK_EVACUATE_MIB = (1, 4), 32


@dataclass(frozen=True)
class Target:
    """One row of the Targets table. `met` is None where this bench's workload has no goal (`--quick`) or
    the row could not be measured."""

    target: str
    now: str  # what the issue measured when it was filed
    measured: str
    chose: str  # the mode auto chose, in the run(s) the row comes from
    goal: str
    met: bool | None


COLUMNS = ["target", "when filed", "measured", "auto chose", "goal", "met"]


def run_goals(r: dict[str, Any]) -> dict[str, bool]:
    """One run's checks against the goals that apply to any run: its size's freeze goal, the client's gap
    against its freeze, the memory stream against iperf3, and bytes on the wire against RSS (realistic
    memory only: incompressible memory crosses whole)."""
    goals: dict[str, bool] = {}
    if r.get("freeze_ms") is not None and not r.get("incompressible") and r["memory_mib"] in FREEZE_GOAL_MS:
        goals["freeze"] = r["freeze_ms"] <= FREEZE_GOAL_MS[r["memory_mib"]]
    if r.get("freeze_ms") is not None and r.get("client_gap_ms") is not None:
        goals["client_gap"] = r["client_gap_ms"] <= r["freeze_ms"] + GAP_OVER_FREEZE_MS
    if r.get("stream", {}).get("vs_iperf3") is not None:
        goals["stream"] = r["stream"]["vs_iperf3"] >= STREAM_GOAL
    if r.get("bytes_per_rss") is not None and not r.get("incompressible"):
        goals["bytes"] = r["bytes_per_rss"] <= BYTES_GOAL
    return goals


def targets(result: dict[str, Any]) -> list[Target]:
    """Issue 16's Targets table from one bench: the default mode's freeze per workload, its worst client gap
    against its freeze, the incompressible workload's gap against stop-copy's, the largest evacuation
    against its iperf3 bound, and the Podman baseline. Rows for parts the bench skipped are left out."""
    runs = result["runs"]
    workloads = list(dict.fromkeys(r["workload"] for r in runs))
    default = {r["workload"]: r for r in runs if r["mode"] == DEFAULT_MODE}
    out = [*_freeze_rows(runs, workloads, default)]
    if default:
        out.append(_gap_row([default[w] for w in workloads if w in default]))
    out += _incompressible_rows(runs, workloads, default)
    evac = result.get("evacuate") or {}
    if evac.get("runs"):
        out.append(_evacuation_row(evac["runs"]))
    if evac.get("podman"):
        out.append(_podman_row(evac))
    return out


def _freeze_rows(runs: list[dict[str, Any]], workloads: list[str], default: dict[str, Any]) -> Iterator[Target]:
    for w in workloads:
        first = next(r for r in runs if r["workload"] == w)
        if first.get("incompressible") or w not in default:
            continue
        mib, r = first["memory_mib"], default[w]
        goal = FREEZE_GOAL_MS.get(mib)
        ok = r["ok"] and r.get("freeze_ms") is not None
        yield Target(
            "freeze, tiny service (`make demo`)" if mib == 0 else f"freeze, {w}, default mode",
            _ms(FREEZE_NOW_MS.get(mib)),
            _ms(r["freeze_ms"]) if ok else _failed(r),
            r.get("mode_chosen") or "-",
            f"≤ {goal:.0f} ms" if goal else "-",
            r["freeze_ms"] <= goal if ok and goal else None,
        )


def _gap_row(default: list[dict[str, Any]]) -> Target:
    """The worst (client's largest gap - freeze) over the default mode's runs."""
    rated = [r for r in default if r["ok"] and r.get("freeze_ms") is not None and r.get("client_gap_ms") is not None]
    goal = f"≤ freeze + {GAP_OVER_FREEZE_MS:.0f} ms"
    if not rated:
        return Target("client's largest gap", GAP_NOW, "-", "-", goal, None)
    worst = max(rated, key=lambda r: r["client_gap_ms"] - r["freeze_ms"])
    over = worst["client_gap_ms"] - worst["freeze_ms"]
    lost = len(default) - len(rated)
    return Target(
        "client's largest gap, default mode",
        GAP_NOW,
        f"freeze {over:+.0f} ms (worst: {worst['workload']})" + (f"; {lost} run(s) failed" if lost else ""),
        worst.get("mode_chosen") or "-",
        goal,
        over <= GAP_OVER_FREEZE_MS and not lost,
    )


def _incompressible_rows(runs: list[dict[str, Any]], workloads: list[str], default: dict[str, Any]) -> Iterator[Target]:
    for w in workloads:
        mine = [r for r in runs if r["workload"] == w]
        if not mine[0].get("incompressible"):
            continue
        issue = (mine[0]["memory_mib"], mine[0]["dirty_mb_s"]) == INCOMPRESSIBLE
        base = next((r for r in mine if r["mode"] == BASELINE), None)
        r = default.get(w)
        ratio = (r or {}).get("ratios", {}).get("client_gap_ms")
        measured = "-"
        if ratio is not None and r is not None and base is not None:
            measured = f"{ratio:.2f} ({r['client_gap_ms']:.0f} ms ÷ {base['client_gap_ms']:.0f} ms)"
        elif r is not None and not r["ok"]:
            measured = _failed(r)
        elif base is not None and not base["ok"]:
            measured = f"stop-copy {_failed(base)}"
        yield Target(
            f"{w}, {mine[0]['dirty_mb_s']:g} MB/s: client's gap, default mode ÷ stop-copy",
            f"{INCOMPRESSIBLE_GAP_NOW:.2f}" if issue else "-",
            measured,
            (r or {}).get("mode_chosen") or "-",
            f"≤ {INCOMPRESSIBLE_GAP_GOAL:.2f}" if issue else "-",
            ratio <= INCOMPRESSIBLE_GAP_GOAL if issue and ratio is not None else None,
        )


def _evacuation_row(evac_runs: list[dict[str, Any]]) -> Target:
    """The evacuation of the most containers, against its bound."""
    r = max(evac_runs, key=lambda r: r["count"])
    issue = (r["count"], r["memory_mib"]) == EVACUATION
    chose = Counter(c.get("mode") or "?" for c in r.get("containers") or [])
    ok = r.get("ok") and r.get("vs_bound") is not None
    measured = _failed(r)
    if ok:
        same = (r.get("iperf3_bytes") or {}).get("seconds")  # iperf3 moving the same bytes, ramp-up included
        also = f"; iperf3 moved the same bytes in {same:.1f} s" if same else ""
        measured = f"{r['vs_bound']:.2f}x ({r['seconds']:.1f} s, bound {r['bound_s']:.1f} s{also})"
    return Target(
        f"evacuation of {r['count']} x {r['memory_mib']} MiB (incompressible) vs the iperf3 bound",
        f"{EVACUATION_NOW:.1f}x" if issue else "-",
        measured,
        ", ".join(f"{mode} x{n}" for mode, n in chose.most_common()) or "-",
        f"≤ {EVACUATION_GOAL:.1f}x" if issue else "-",
        r["vs_bound"] <= EVACUATION_GOAL if ok and issue else None,
    )


def _podman_row(evac: dict[str, Any]) -> Target:
    """skyferry's one-container evacuation against Podman's checkpoint/restore of the same container; the
    README quotes it, the issue sets no goal."""
    base = evac["podman"]
    ratios = base.get("ratios") or {}
    sky = base.get("skyferry") or {}
    if "client_gap_ms" in ratios:
        measured = f"{ratios['client_gap_ms']:.2f} ({sky['client_gap_ms']:.0f} ms ÷ {base['client_gap_ms']:.0f} ms)"
        measured += f"; total {ratios['total_ms']:.2f}" if "total_ms" in ratios else ""
    else:
        measured = _failed(base) if not base.get("ok") else "- (no 1-container evacuation to compare)"
    chosen = next((c.get("mode") for r in evac["runs"] if r["count"] == 1 for c in r.get("containers") or []), None)
    return Target(
        f"client's gap, skyferry ÷ Podman checkpoint/restore (1 x {base['memory_mib']} MiB)",
        "-", measured, chosen or "-", "- (quoted)", None,
    )  # fmt: skip


def _ms(value: float | None) -> str:
    return f"{value:.0f} ms" if value is not None else "-"


def _failed(r: dict[str, Any]) -> str:
    """The error's first clause (the runs table has all of it): "migration m-1 failed at transfer"."""
    return f"failed: {(r.get('error') or 'see the runs').split(': ')[0][:80]}"
