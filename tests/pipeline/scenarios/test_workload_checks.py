"""The shell pipeline's verdict (workloads.pipeline_verdict), on logs made by hand: what the live test
(test_workloads.py) could only show when something goes wrong; and the workloads table's writer."""

from pathlib import Path

from skyferry.pipeline.scenarios import workload_matrix as wm
from skyferry.pipeline.scenarios import workloads


def test_pipeline_verdict_finds_gaps_repeats_and_torn_lines() -> None:
    good = "A 1\nT 1\nB 1\nA 2\nB 2\nT 2\n"
    assert workloads.pipeline_verdict(good) == {"ok": True, "errors": [], "lines": 6, "last": {"A": 2, "T": 2, "B": 2}}
    bad = workloads.pipeline_verdict("A 1\nB 1\nT 1\nA 3\nB 1\nT 2 A\n")
    assert not bad["ok"] and bad["errors"] == ["line 4: A 3 after A 1", "line 5: B 1 after B 1",
                                              "line 6: torn or foreign 'T 2 A'"]  # fmt: skip


def test_the_table_replaces_only_its_own_part_and_merges_reruns(tmp_path: Path) -> None:
    doc, results = tmp_path / "compatibility.md", tmp_path / "results.json"
    doc.write_text(
        f"# Compatibility\n\nprose, kept\n\n{wm.SECTION.begin}\nSTALE\n{wm.SECTION.end}\n\nmore prose, kept\n"
    )
    old = wm.Matrix(when="2026-12-01", kernel="6.18", criu="4.2.1", cells=[
        wm.Cell(workload="jvm", mode="precopy", outcome="failed", stage="restore", reason="boom", when="2026-12-01"),
        wm.Cell(workload="nginx", mode="precopy", outcome="pass", freeze_ms=[1375.0, 1200.0], total_ms=[18900.0],
                client="fine", when="2026-12-01"),
    ])  # fmt: skip
    rerun = wm.Matrix(when="2026-12-03", kernel="6.18", criu="4.2.1", cells=[
        wm.Cell(workload="jvm", mode="precopy", outcome="refused", stage="check", reason="a reason", when="2026-12-03"),
    ])  # fmt: skip
    wm.write_doc(wm.merge(old, rerun), doc, results)
    text = doc.read_text()
    assert "prose, kept" in text and "more prose, kept" in text and "STALE" not in text
    assert "| nginx | nginx 1.22" in text and "| pass | 1.38 s, 1.20 s | 18.9 s | fine | 2026-12-01 |" in text
    assert "| jvm |" in text and "**refused** (check) [1]" in text
    assert "1. `jvm`, runc precopy: refused at check: a reason" in text
    assert text.index("| nginx |") < text.index("| jvm |"), "rows follow the workloads' order"
    assert [c.outcome for c in wm.Matrix.model_validate_json(results.read_text()).cells] == ["refused", "pass"]
