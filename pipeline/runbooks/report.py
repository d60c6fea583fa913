"""What a runbook command leaves behind: `<state>/reports/<run>/` with summary.json, report.html (the
run's summary and every migration's stages and rounds on one time axis: pipeline/controller/report_html.py)
and, per migration, `<migration>.json` and `<migration>.png` (bytes sent in each pre-copy round and inside
the freeze, and the stage timeline with the freeze shaded). Rendered with matplotlib's Agg backend: no
display needed."""

import json
import secrets
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from skyferry.pipeline.controller import report_html
from skyferry.pipeline.controller.journal import Journal
from skyferry.pipeline.errors import SkyferryError

REPORTS = "reports"
HTML = "report.html"


def new_run_id(kind: str) -> str:
    return f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def write(
    state: Path,
    run_id: str,
    summary: dict[str, Any],
    migrations: list[dict[str, Any]],
    sections: Sequence[report_html.Section] = (),
) -> Path:
    """Write the run's summary, its HTML page and one report file (+ plot) per migration; returns the run's
    directory. `sections`: what the page shows besides the journal's migrations (a test cutover)."""
    folder = Path(state) / REPORTS / run_id
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    files = []
    for report in migrations:
        if not report.get("id"):
            continue
        path = folder / f"{report['id']}.json"
        path.write_text(json.dumps(report, indent=2, default=str))  # unsorted: stages stay in run order
        files.append(str(path))
        try:
            if not (folder / f"{report['id']}.png").exists():  # evacuate draws each as its migration ends
                plot(report, folder / f"{report['id']}.png")
            files.append(str(folder / f"{report['id']}.png"))
        except ImportError:
            pass  # matplotlib missing: the JSON report still stands
    page = report_html.page(run_id, [*_sections(state, migrations), *sections], facts(summary))
    (folder / HTML).write_text(page)
    files.append(str(folder / HTML))
    summary = {**summary, "report_dir": str(folder), "files": files}
    (folder / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True, default=str))
    return folder


def _sections(state: Path, migrations: list[dict[str, Any]]) -> list[report_html.Section]:
    journal, out = Journal(state), []
    for report in migrations:
        if not report.get("id"):
            continue
        try:
            out.append(report_html.migration_section(journal, report["id"]))
        except SkyferryError:  # not in this journal: its report still says what happened
            out.append(report_html.Section(
                id=report["id"], title=f"{report.get('container')}: {report.get('source')} -> {report.get('target')}",
                outcome=str(report.get("state")), hosts={}, facts=[("timeline", "not in this controller's journal")],
                freeze_ms=report.get("freeze_ms"), bytes_wire=report.get("bytes_wire"),
            ))  # fmt: skip
    return out


def facts(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """What the page's summary says about the run itself, besides its migrations."""
    out = [(label, summary[key]) for key, label in FACTS if isinstance(summary.get(key), str) and summary[key]]
    plan = summary.get("plan") if isinstance(summary.get("plan"), dict) else {}  # evacuate's is the whole plan
    for key in ("sources", "targets"):
        hosts = summary.get(key) or plan.get(key)
        if hosts and all(isinstance(h, str) for h in hosts):
            out.append((key, ", ".join(hosts)))
    ok = summary.get("ok", summary.get("passed"))
    if ok is not None:
        out.append(("result", "OK" if ok else "NOT OK"))
    if summary.get("remaining"):
        out.append(("still on the host", ", ".join(summary["remaining"])))
    unmoved = [r for r in summary.get("results") or [] if not (r.get("migration") or {}).get("id")
               and r.get("state") not in ("done", "already-there")]  # fmt: skip
    if unmoved:
        out.append(("not migrated", "; ".join(f"{r['container']}: {r.get('error') or r['state']}" for r in unmoved)))
    return out


FACTS = (("kind", "runbook"), ("host", "host"), ("plan", "plan"), ("container", "container"))


def rounds(report: dict[str, Any]) -> list[tuple[str, int]]:
    """(label, bytes) per transfer: each pre-copy round, then what was sent inside the freeze."""
    history = report.get("rounds") or []
    bars = [(f"round {r.get('seq', i + 1)}", int(r.get("bytes_out") or 0)) for i, r in enumerate(history)]
    at_freeze = report.get("bytes_at_freeze")
    if at_freeze is None:
        at_freeze = report.get("bytes_wire") if not bars else None
    if at_freeze is not None:
        bars.append(("freeze", int(at_freeze)))
    return bars


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bytes_ax, time_ax) = plt.subplots(1, 2, figsize=(10, 3.6))
    bars = rounds(report)
    labels = [b[0] for b in bars] or ["-"]
    values = [b[1] / 1e6 for b in bars] or [0.0]
    colors = ["tab:red" if label == "freeze" else "tab:blue" for label in labels]
    bytes_ax.bar(labels, values, color=colors)
    bytes_ax.set_ylabel("MB on the wire")
    bytes_ax.set_title("bytes per pre-copy round and in the freeze")

    start = 0.0
    freeze = report.get("freeze_ms")
    frozen_at = None
    for stage, seconds in (report.get("stages_s") or {}).items():
        if stage == "checkpoint":
            frozen_at = start
        time_ax.barh(0, seconds * 1000, left=start, height=0.5, label=stage)
        start += seconds * 1000
    if freeze is not None and frozen_at is not None:  # the freeze runs from the checkpoint on
        time_ax.axvspan(frozen_at, frozen_at + freeze, ymin=0.8, ymax=0.95, color="black", alpha=0.6, label="freeze")
    time_ax.set_yticks([])
    time_ax.set_xlabel("ms")
    time_ax.set_title(f"stages; freeze {freeze} ms" if freeze is not None else "stages")
    if report.get("stages_s"):
        time_ax.legend(fontsize=6, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.2))
    fig.suptitle(
        f"{report.get('container')}: {report.get('source')} -> {report.get('target')} "
        f"({report.get('mode')}, {report.get('state')})",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
