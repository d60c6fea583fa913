"""What the bench's evacuation part computes and prints: the link's bound, ratios, fairness and tables.

Pure functions of the result that `bench_evacuate.measure` returns, so they are tested without hosts.
"""

from typing import Any

from skyferry.pipeline.scenarios.benchtargets import GAP_OVER_FREEZE_MS


def bound_s(count: int, memory_mib: int, mbit_s: float) -> float:
    """Seconds the link needs for `count` containers' memory at iperf3's rate: no evacuation can beat it
    (the memory is incompressible, so compression cannot either)."""
    return count * (memory_mib << 20) * 8 / (mbit_s * 1e6)


def link_mbit_s(run: dict[str, Any]) -> float | None:
    """The link's rate for a run's bound: the faster of iperf3 just before and just after it."""
    rates = [m["mbit_s"] for key in ("iperf3", "iperf3_after") if (m := run.get(key)) and m.get("mbit_s")]
    return max(rates) if rates else None


def max_concurrency(intervals: list[tuple[float, float]]) -> int:
    """The most intervals (start, end) open at one instant."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])  # an end sorts before a start
    most = now = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


def fairness(intervals: list[tuple[float, float]], t0: float) -> dict[str, Any]:
    """Per-container completion against the evacuation's start `t0`: when each finished (seconds, sorted),
    the spread from the first to the last, and the spread of the migrations' own durations (equal
    containers sharing a link fairly take equally long, whichever wave they ran in). Also when the first
    migration started and the span from then to the last one's end: the command's own time around them
    (start-up, placement, reports) is the rest."""
    if not intervals:
        return {}
    done = sorted(e - t0 for _, e in intervals)
    took = sorted(e - s for s, e in intervals)
    first = min(s for s, _ in intervals)
    return {
        "first_started_s": round(first - t0, 2),
        "span_s": round(max(e for _, e in intervals) - first, 2),
        "completed_s": [round(d, 2) for d in done],
        "completion_spread_s": round(done[-1] - done[0], 2),
        "duration_s": {"min": round(took[0], 2), "max": round(took[-1], 2)},
        "duration_spread": round(took[-1] / took[0], 2) if took[0] > 0 else None,
        "max_concurrency": max_concurrency(intervals),
    }


def add_ratios(result: dict[str, Any]) -> None:
    """Each evacuation against the iperf3 bound measured around it (the faster rate); the Podman baseline against
    skyferry's one-container evacuation of the same workload (skyferry ÷ baseline: below 1 is better)."""
    for r in result["runs"]:
        mbit = link_mbit_s(r)
        if mbit and r.get("seconds"):
            r["bound_s"] = round(bound_s(r["count"], r["memory_mib"], mbit), 2)
            r["vs_bound"] = round(r["seconds"] / r["bound_s"], 2)
            if span := (r.get("fairness") or {}).get("span_s"):
                r["span_vs_bound"] = round(span / r["bound_s"], 2)
            if (same := (r.get("iperf3_bytes") or {}).get("seconds")) and span:
                r["span_vs_same_bytes"] = round(span / same, 2)
            if r.get("wire_bytes"):
                r["wire_mbit_s"] = round(r["wire_bytes"] * 8 / r["seconds"] / 1e6, 1)
    base = result.get("podman") or {}
    one = next((r for r in result["runs"] if r["count"] == 1 and r.get("ok")), None)
    if not base.get("ok") or one is None:
        return
    sky = one["containers"][0]
    ours = {"client_gap_ms": sky.get("client_gap_ms"), "total_ms": sky.get("total_ms"),
            "freeze_ms": sky.get("freeze_ms")}  # fmt: skip
    base["skyferry"] = ours
    base["ratios"] = {k: round(ours[k] / base[k], 3) for k in ("client_gap_ms", "total_ms") if ours[k] and base.get(k)}


COLUMNS = ["containers", "parallel", "took (first start, span)", "iperf3 bound", "÷ bound (span ÷ bound)",
           "iperf3, same bytes (span ÷ it)", "wire vs iperf3", "completed at (s)", "durations", "freeze max",
           "client gap max", f"clients > freeze + {GAP_OVER_FREEZE_MS:.0f} ms (in it / outside)", "ok"]  # fmt: skip


def past_freeze(c: dict[str, Any]) -> str | None:
    """Whether a container's client waited longer than its freeze + GAP_OVER_FREEZE_MS for one answer, and
    when: "in" (the wait overlapped the freeze) or "outside" (before or after it, while the container ran:
    the link lost or held a reply). None if it did not, or if the times that tell are missing."""
    gap, freeze, wall, frozen = (c.get(k) for k in ("client_gap_ms", "freeze_ms", "client_gap_wall", "frozen_wall"))
    if gap is None or freeze is None or not wall or not frozen or gap <= freeze + GAP_OVER_FREEZE_MS:
        return None
    return "in" if wall[0] < frozen[1] and frozen[0] < wall[1] else "outside"


def rows(result: dict[str, Any]) -> list[list[str]]:
    out = []
    for r in result["runs"]:
        fair = r.get("fairness") or {}
        mbit = link_mbit_s(r)
        conts = r.get("containers") or []
        freezes = [c["freeze_ms"] for c in conts if c.get("freeze_ms") is not None]
        gaps = [c["client_gap_ms"] for c in conts if c.get("client_gap_ms") is not None]
        took = fair.get("duration_s") or {}
        out.append([
            f"{r['count']} x {r['memory_mib']} MiB", str(r["parallel"]),
            _took(r),
            f"{r['bound_s']:.1f} s ({mbit:.0f} Mbit/s)" if r.get("bound_s") else "-",
            f"{r['vs_bound']:.2f}" + (f" ({r['span_vs_bound']:.2f})" if r.get("span_vs_bound") else "")
            if r.get("vs_bound") else "-",
            _same_bytes(r),
            f"{r['wire_mbit_s']:.0f} Mbit/s ({r['wire_mbit_s'] / mbit:.0%})" if r.get("wire_mbit_s") and mbit else "-",
            ", ".join(f"{d:.1f}" for d in fair.get("completed_s", [])) or "-",
            f"{took['min']:.1f}-{took['max']:.1f} s" if took else "-",
            f"{max(freezes):.0f} ms" if freezes else "-",
            f"{max(gaps):.0f} ms" if gaps else "-",
            _past_freeze(conts),
            "yes" if r.get("ok") else f"FAILED: {r.get('error') or 'see containers'}",
        ])  # fmt: skip
    return out


def _past_freeze(conts: list[dict[str, Any]]) -> str:
    """How many clients waited past their freeze + 50 ms, in it / outside it ("-": not recorded)."""
    if not any("client_past_freeze" in c for c in conts):
        return "-"
    past = [c.get("client_past_freeze") for c in conts]
    return f"{past.count('in')} / {past.count('outside')}"


def _same_bytes(r: dict[str, Any]) -> str:
    """How long iperf3 took to move the run's memory as one stream, and the span against it."""
    same = (r.get("iperf3_bytes") or {}).get("seconds")
    if not same:
        return "-"
    return f"{same:.1f} s" + (f" ({r['span_vs_same_bytes']:.2f})" if r.get("span_vs_same_bytes") else "")


def _took(r: dict[str, Any]) -> str:
    """The command's seconds; in parentheses when its first migration started and how long from then to
    the last one's end."""
    if not r.get("seconds"):
        return "-"
    fair = r.get("fairness") or {}
    inner = f" ({fair['first_started_s']:.1f} s, {fair['span_s']:.1f} s)" if "span_s" in fair else ""
    return f"{r['seconds']:.1f} s{inner}"


PODMAN_COLUMNS = ["", "checkpoint", "transfer", "restore", "route", "total", "client's largest gap"]


def podman_rows(result: dict[str, Any]) -> list[list[str]]:
    """The baseline's phases, then skyferry's one-container run, then skyferry ÷ baseline."""
    base = result.get("podman")
    if not base:
        return []
    if not base.get("ok"):
        return [["podman checkpoint/restore", f"FAILED: {base.get('error')}", "", "", "", "", ""]]
    s = base["seconds"]
    out = [["podman --export/--import", *(f"{s[k] * 1000:.0f} ms" for k in ("checkpoint", "transfer", "restore",
            "route")), f"{base['total_ms']:.0f} ms", f"{base['client_gap_ms']:.0f} ms"]]  # fmt: skip
    sky, ratios = base.get("skyferry"), base.get("ratios") or {}
    if sky:
        out.append(["skyferry (1 container)", "", "", "", "", f"{sky['total_ms']:.0f} ms",
                    f"{sky['client_gap_ms']:.0f} ms (freeze {sky['freeze_ms']:.0f} ms)"])  # fmt: skip
        out.append(["skyferry ÷ podman", "", "", "", "", _ratio(ratios.get("total_ms")),
                    _ratio(ratios.get("client_gap_ms"))])  # fmt: skip
    return out


def _ratio(x: float | None) -> str:
    return f"{x:.2f}" if x is not None else "-"


def iperf3_line(result: dict[str, Any]) -> str:
    """Per count: iperf3 before and after its evacuation."""
    return ", ".join(
        f"{r['count']}: {r['iperf3']['mbit_s']:.0f}"
        + (f" / {r['iperf3_after']['mbit_s']:.0f}" if r.get("iperf3_after") else "")
        + " Mbit/s"
        for r in result["runs"]
        if r.get("iperf3")
    )
