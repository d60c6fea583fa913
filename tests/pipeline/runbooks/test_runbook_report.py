"""Runbook report files: per migration a JSON report and a PNG of bytes per pre-copy round and the freeze."""

import json
from pathlib import Path

from skyferry.pipeline.runbooks import report as runreport

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
    assert sorted(p.name for p in folder.iterdir()) == ["m1.json", "m1.png", "m2.json", "m2.png", "summary.json"]
    assert (folder / "m1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(json.loads((folder / "m1.json").read_text())["stages_s"]) == list(PRECOPY["stages_s"])
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["ok"] and len(summary["files"]) == 4 and summary["report_dir"] == str(folder)
