"""What `skyferry bench` prints and writes: the machine line, tables, Markdown, JSON and a plot.

The goals and the Targets table's figures come from benchtargets; the evacuation's tables from evacreport.
"""

import json
import os
import platform
from pathlib import Path
from typing import Any

from skyferry.pipeline.controller import freezeparts
from skyferry.pipeline.scenarios import benchtargets, evacreport
from skyferry.pipeline.scenarios.benchtargets import BYTES_GOAL, FREEZE_GOAL_MS, GAP_OVER_FREEZE_MS


def machine() -> dict[str, Any]:
    cpu = proc_field("/proc/cpuinfo", "model name") or platform.processor() or "unknown"
    mem = int(proc_field("/proc/meminfo", "MemTotal").split()[0])
    return {
        "nproc": os.cpu_count(),
        "kernel": platform.release(),
        "cpu": cpu,
        "memory_gb": round(mem / 1e6, 1),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
        "note": "shared VM: other engineers' tests run on the same 2 cores; timings vary run to run",
    }


def proc_field(path: str, key: str) -> str:
    for line in Path(path).read_text().splitlines():
        if line.startswith(key):
            return line.split(":", 1)[1].strip()
    return ""


def machine_line(m: dict[str, Any]) -> str:
    touch = m.get("first_touch_s_per_gib")
    warmed = f", memory touched once first at {touch} s/GiB" if touch is not None else ""
    return (f"{m['nproc']} cores ({m['cpu']}), kernel {m['kernel']}, {m['memory_gb']} GB RAM, "
            f"load average {m['load_avg'][0]} at start{warmed}, shared VM")  # fmt: skip


# --- outputs ---------------------------------------------------------------------------------------------

COLUMNS = ["workload", "mode", "auto chose", "freeze ms", "client gap ms", "total s", "overlay bytes", "÷ RSS",
           "rounds (stop)", "stream vs iperf3", "ok"]  # fmt: skip


def rows(result: dict[str, Any]) -> list[list[str]]:
    """One table row per run; ratios to the same workload's stop-copy run in parentheses."""
    out = []
    for r in result["runs"]:
        ratio = r.get("ratios", {})
        stream = r.get("stream") or {}
        rounds = f"{r['rounds']} ({r['precopy_stop']})" if r.get("rounds") else "-"
        vs = f"{stream['mbit_s']:.0f} Mbit/s ({stream['vs_iperf3']:.0%})" if "vs_iperf3" in stream else "-"
        chosen = r.get("mode_chosen")  # auto: the finish its rounds chose
        out.append([
            r["workload"], r["mode"], chosen if chosen and chosen != r["mode"] else "-",
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


FREEZE_COLUMNS = ["workload", "mode", "freeze", "pause + lock", "dump", "checkpoint call", "cutover", "transfer",
                  "restore", "unlock + replay", "restore call", "between stages"]  # fmt: skip


def freeze_rows(result: dict[str, Any]) -> list[list[str]]:
    """Where each run's freeze went (ms; the report's `freeze_parts_ms`, controller/freezeparts.py)."""
    out = []
    for r in result["runs"]:
        parts = (r.get("report") or {}).get("freeze_parts_ms")
        if parts:
            mode = f"{r['mode']} ({r['mode_chosen']})" if r.get("mode_chosen") not in (None, r["mode"]) else r["mode"]
            out.append([r["workload"], mode, f"{r['freeze_ms']:.0f}", *(f"{parts[k]:.0f}" for k in freezeparts.PARTS)])
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


def target_rows(result: dict[str, Any]) -> list[list[str]]:
    """Issue 16's Targets table as text rows (benchtargets.COLUMNS), from the result's `targets`."""
    met = {True: "yes", False: "no", None: "-"}
    return [[t["target"], t["now"], t["measured"], t["chose"], t["goal"], met[t["met"]]] for t in result["targets"]]


def markdown(result: dict[str, Any]) -> str:
    """The Targets table, the runs, and the evacuations with the Podman baseline, as Markdown."""
    cfg = result["config"]
    parts = [
        f"WAN `{cfg.get('wan') or 'none'}`. Targets (issue 16): the default mode is `{benchtargets.DEFAULT_MODE}`; "
        '"auto chose" is the finish its rounds chose; "when filed" is what the issue measured before the work on it.',
        _table(benchtargets.COLUMNS, target_rows(result)),
    ]
    if result["runs"]:
        dirty = ", ".join(sorted({f"{r['dirty_mb_s']:g}" for r in result["runs"]}))
        parts += [
            f"Migrations: each workload dirties its memory at {dirty} MB/s; (xN) is the ratio to the same workload's "
            "stop-copy run in this bench.",
            _table(COLUMNS, rows(result)),
            f"iperf3 over the overlay (8 MiB window), measured before each workload's runs: {iperf3_line(result)}.",
        ]
        if freeze := freeze_rows(result):
            parts += [
                "Where each freeze went (ms): each agent's own work, the rest of each stage's call (round trip, "
                "other steps) and the controller's time between the stages.",
                _table(FREEZE_COLUMNS, freeze),
            ]
    if evac := result.get("evacuate"):
        parts += _evacuation_markdown(evac)
    parts.append(f"Machine: {machine_line(result['machine'])}. Bench took {result['seconds']:.0f} s"
                 + (f"; errors: {'; '.join(result['errors'])}" if result["errors"] else "") + ".")  # fmt: skip
    return "\n\n".join(parts) + "\n"


def _table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in body]
    return "\n".join(lines)


def _evacuation_markdown(evac: dict[str, Any]) -> list[str]:
    cfg = evac["config"]
    parts = [
        f"Evacuations: each container holds {cfg['memory_mib']} MiB of incompressible memory (dirtying "
        f"{cfg['dirty_mb_s']:g} MB/s); `skyferry evacuate --parallel {cfg['parallel']}` (fewer for fewer containers), "
        "default mode, as a user runs it. took: the command's seconds (when its first migration started, and the span "
        "from then to the last one's end). ÷ bound: seconds taken ÷ the seconds iperf3's rate needs for all that "
        "memory.",
        _table(evacreport.COLUMNS, evacreport.rows(evac)),
    ]
    if evac.get("podman"):
        parts.append(_table(evacreport.PODMAN_COLUMNS, evacreport.podman_rows(evac)))
    parts.append("iperf3 local-1 -> local-2 over the overlay (8 MiB window), just before / just after each "
                 "evacuation, by containers (the bound uses the faster): "
                 f"{evacreport.iperf3_line(evac) or 'not measured'}.")  # fmt: skip
    return parts


def write(result: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """bench.json, bench.md and (with migrations to draw) bench.png into `out_dir`; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "bench.json", "md": out_dir / "bench.md"}
    tmp = paths["json"].with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2, sort_keys=True, default=str) + "\n")
    tmp.replace(paths["json"])
    paths["md"].write_text(markdown(result))
    if result["runs"]:
        paths["png"] = out_dir / "bench.png"
        plot(result, paths["png"])
    return paths


def plot(result: dict[str, Any], path: Path) -> None:
    """Grouped bars per workload, one bar per mode: freeze, client's largest gap (log scale), and bytes on
    the wire ÷ RSS; dashed lines are the goals (for the gap: each run's freeze + GAP_OVER_FREEZE_MS).
    A failed run leaves a gap marked "failed"; a mode a workload does not run in, an unmarked one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(r["workload"] for r in result["runs"]))
    modes = list(dict.fromkeys(r["mode"] for r in result["runs"]))
    by = {(r["workload"], r["mode"]): r for r in result["runs"] if r["ok"]}
    ran = {(r["workload"], r["mode"]) for r in result["runs"]}
    first = {r["workload"]: r for r in reversed(result["runs"])}
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
                if (w, mode) in ran - by.keys():  # failed: say so where the bar would stand
                    ax.annotate("failed", (x, 0.02), xycoords=("data", "axes fraction"), ha="center", va="bottom",
                                rotation=90, fontsize=7, color="tab:red")  # fmt: skip
            if key == "client_gap_ms":  # each run's own goal: its freeze + GAP_OVER_FREEZE_MS
                for x, w in zip(xs, workloads, strict=True):
                    if (freeze := (by.get((w, mode)) or {}).get("freeze_ms")) is not None:
                        ax.hlines(freeze + GAP_OVER_FREEZE_MS, x - width / 2, x + width / 2, colors="black",
                                  linestyles="dashed", linewidth=1)  # fmt: skip
        for i, w in enumerate(workloads):
            incompressible = first[w].get("incompressible")  # neither goal is for incompressible memory
            goal = {"freeze_ms": FREEZE_GOAL_MS.get(first[w]["memory_mib"]), "bytes_per_rss": BYTES_GOAL}.get(key)
            goal = None if incompressible else goal
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
