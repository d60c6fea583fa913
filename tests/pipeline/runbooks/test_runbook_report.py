"""Runbook report files: per migration a JSON report and a PNG of bytes per pre-copy round and the freeze; the
run's report.html (its renderer is tested in tests/pipeline/controller/test_report_html.py)."""

import json
import os
import time
from pathlib import Path

from skyferry.pipeline.runbooks import report as runreport
from skyferry.pipeline.runbooks import testcutover
from skyferry.pipeline.runbooks.plotter import Plotter

PRECOPY = {
    "id": "m1", "container": "web", "source": "a", "target": "b", "mode": "precopy", "state": "done",
    "freeze_ms": 120.5, "bytes_wire": 9_300_000, "bytes_at_freeze": 300_000,
    "rounds": [{"seq": 1, "bytes_out": 8_000_000}, {"seq": 2, "bytes_out": 1_000_000}],
    "stages_s": {"check": 0.1, "precopy": 1.2, "checkpoint": 0.08, "transfer": 0.02, "restore": 0.02},
}  # fmt: skip


def test_bars_are_the_rounds_then_the_freeze() -> None:
    assert runreport.rounds(PRECOPY) == [("round 1", 8_000_000), ("round 2", 1_000_000), ("freeze", 300_000)]
    stop_copy = {**PRECOPY, "rounds": [], "bytes_at_freeze": None, "bytes_wire": 1_400_000}
    assert runreport.rounds(stop_copy) == [("freeze", 1_400_000)], "stop-copy sends everything in the freeze"


def test_a_run_writes_summary_and_one_report_and_plot_per_migration(tmp_path: Path) -> None:
    folder = runreport.write(tmp_path, "evacuate-x", {"ok": True}, [PRECOPY, {**PRECOPY, "id": "m2"}, {"id": None}])
    assert sorted(p.name for p in folder.iterdir()) == [
        "m1.json", "m1.png", "m2.json", "m2.png", "report.html", "summary.json"
    ]  # fmt: skip
    assert (folder / "m1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(json.loads((folder / "m1.json").read_text())["stages_s"]) == list(PRECOPY["stages_s"])
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["ok"] and len(summary["files"]) == 5 and summary["report_dir"] == str(folder)
    page = (folder / "report.html").read_text()
    assert page.count("not in this controller&#x27;s journal") == 2, "reports without a journal still get a section"
    assert "120.5 ms / 120.5 ms / 120.5 ms" in page


def test_plots_are_drawn_by_a_process_that_runs_only_on_idle_cpu(tmp_path: Path) -> None:
    """A runbook's plots are drawn beside its migrations, never in the controller's own process, and never
    on CPU that the agents or WireGuard could use."""
    assert os.sched_getscheduler(0) != os.SCHED_IDLE  # control: the test itself is an ordinary task
    with Plotter() as plotter:
        deadline = time.monotonic() + 10  # from `chrt`'s exec on (Popen returns when the fork is done)
        while os.sched_getscheduler(plotter.pid) != os.SCHED_IDLE and time.monotonic() < deadline:
            time.sleep(0.01)
        assert os.sched_getscheduler(plotter.pid) == os.SCHED_IDLE and plotter.pid != os.getpid()
        plotter.draw(PRECOPY, tmp_path / "m1.png")
        plotter.draw({"id": "m2", "stages_s": 5}, tmp_path / "m2.png")  # one that cannot be drawn stops no other
        plotter.draw({**PRECOPY, "id": "m3"}, tmp_path / "m3.png")
    assert (tmp_path / "m1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "m3.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "m2.png").exists()


def test_the_page_says_what_did_not_migrate() -> None:
    summary = {"run": "evacuate-x", "kind": "evacuate", "host": "a", "ok": False, "remaining": ["big"],
               "plan": {"targets": ["b", "c"], "moves": []},
               "results": [{"container": "big", "state": "no-capacity", "error": "needs 4 GiB"},
                           {"container": "web", "state": "done", "migration": PRECOPY}]}  # fmt: skip
    assert runreport.facts(summary) == [
        ("runbook", "evacuate"), ("host", "a"), ("targets", "b, c"), ("result", "NOT OK"), ("still on the host", "big"),
        ("not migrated", "big: needs 4 GiB"),
    ]  # fmt: skip


def test_a_test_cutover_is_its_steps_back_to_back_with_the_pause_as_its_freeze() -> None:
    report = {"id": "t1", "container": "web", "source": "a", "target": "b", "passed": True, "pause_s": 0.05,
              "steps": {"check": 0.1, "prepare": 0.2, "checkpoint": 0.3, "transfer": 0.1, "restore": 0.2},
              "bytes_wire": 1000, "health": {"rc": 0}, "source_untouched": True, "target_clean": True}  # fmt: skip
    section = testcutover.section(report)
    assert [(s.label, s.where, round(s.start_ms), round(s.end_ms)) for s in section.spans] == [
        ("check", "source, target", 0, 100), ("prepare", "target", 100, 300), ("checkpoint", "source", 300, 600),
        ("source paused", "source", 300, 350), ("transfer", "source -> target", 600, 700),
        ("restore", "target", 700, 900),
    ]  # fmt: skip
    assert section.outcome == "passed" and section.freeze_ms == 50.0 and section.kind == "test cutover"
