"""`skyferry bench` machinery on a tiny configuration: real hosts, agents, CRIU, iperf3 and client.

Checks what the bench writes and how it computes, never how fast anything was.
"""

import json
import os
from pathlib import Path

import pytest
from skyferry.netplane import netns
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.scenarios import bench, benchreport

pytestmark = [pytest.mark.integration, pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One tiny bench: 16 MiB, a warm-up, then the baseline, pre-copy, and a mode that does not exist (a run
    that fails)."""
    out = tmp_path_factory.mktemp("bench-out")
    cfg = bench.Config(
        workloads=(bench.Workload(16, dirty_mb_s=2.0),),
        modes=("precopy", "no-such-mode", "stop-copy"),
        wan="rate=1gbit,rtt=2ms",
        settle_s=0.5,
        after_requests=3,
        warmup=True,
        iperf_s=1.0,
        mesh_name="b" + os.urandom(2).hex(),
    )
    res = bench.run(cfg)
    res["paths"] = benchreport.write(res, out)
    return res


def test_every_mode_runs_baseline_first_and_a_failed_run_does_not_stop_the_others(result: dict) -> None:
    assert result["errors"] == []
    assert [r["mode"] for r in result["runs"]] == ["stop-copy", "precopy", "no-such-mode"]
    stop, pre, bad = result["runs"]
    assert stop["ok"] and pre["ok"], (stop["error"], pre["error"])
    assert not bad["ok"] and "unknown mode" in bad["error"] and bad["connection_survived"]
    # An unmeasured warm-up first; then each run starts where the previous one left the container.
    [warm] = result["warmups"]
    assert warm["ok"] and warm["mode"] == "auto" and (warm["source"], warm["target"]) == ("local-1", "local-2")
    assert (stop["source"], stop["target"]) == ("local-2", "local-1")
    assert (pre["source"], pre["target"]) == ("local-1", "local-2")
    assert (bad["source"], bad["target"]) == ("local-2", "local-1")


def test_ratios_are_against_the_same_runs_stop_copy(result: dict) -> None:
    stop, pre, bad = result["runs"]
    for r in (stop, pre):
        assert r["freeze_ms"] > 0 and r["client_gap_ms"] > 0 and r["total_ms"] > r["freeze_ms"]
        assert r["connection_survived"] and r["bytes_wire"] > 0 and r["rss_bytes"] >= 16 << 20
        # Counted on the hosts' WireGuard interfaces: the streams the report counts, plus their headers.
        assert r["overlay_bytes"] > r["bytes_wire"]
        assert r["bytes_per_rss"] == round(r["overlay_bytes"] / r["rss_bytes"], 3)
        assert r["report"]["mode"] == r["mode"] and r["report"]["state"] == "done"
    for key in ("freeze_ms", "client_gap_ms", "total_ms", "bytes_wire", "overlay_bytes"):
        assert stop["ratios"][key] == 1.0
        assert pre["ratios"][key] == round(pre[key] / stop[key], 3)
    assert bad["ratios"] == {}
    assert pre["rounds"] >= 1 and pre["precopy_stop"] and stop["rounds"] == 0
    # Round 1 moves all 16 MiB (compressed about 3x): enough for a stream rate against iperf3's.
    assert pre["stream"]["from"] == "precopy round 1"
    assert pre["stream"]["vs_iperf3"] == round(pre["stream"]["mbit_s"] / pre["stream"]["iperf3_mbit_s"], 3)


def test_iperf3_measured_both_ways_over_the_overlay(result: dict) -> None:
    assert set(result["iperf3"]["16 MiB"]) == {"local-1->local-2", "local-2->local-1"}
    assert all(v["mbit_s"] > 0 and v["window"] == "8M" for v in result["iperf3"]["16 MiB"].values())


def test_outputs_json_markdown_png_and_table(result: dict) -> None:
    paths = result["paths"]
    saved = json.loads(paths["json"].read_text())
    assert [r["mode"] for r in saved["runs"]] == [r["mode"] for r in result["runs"]]
    assert saved["machine"]["nproc"] == os.cpu_count() and saved["machine"]["kernel"] == os.uname().release
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths["png"].stat().st_size > 10_000
    markdown = paths["md"].read_text()
    assert "| stop-copy |" in markdown and "| precopy |" in markdown and "\nMachine: " in markdown
    rows = benchreport.rows(result)
    assert len(rows) == 3 and len(rows[0]) == len(benchreport.COLUMNS)
    assert rows[1][2].endswith(f"(x{result['runs'][1]['ratios']['freeze_ms']:.2f})")
    assert rows[2][-1].startswith("FAILED: ")
    assert any(row[0].startswith("freeze, 16 MiB") for row in benchreport.targets(result))


def test_nothing_is_left_behind(result: dict) -> None:
    """No namespace carries the mesh id, the state folder is gone, and no process refers to it."""
    assert not list(netns.RUN_DIR.glob(f"{result['mesh']}-*"))
    assert not Path(result["state_dir"]).exists()
    leftovers = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if result["state_dir"].encode() in cmdline.read_bytes():
                leftovers.append(cmdline.parent.name)
        except OSError:
            continue
    assert leftovers == []


def test_controller_calls_run_in_a_child_that_is_killed_when_it_hangs(state: Path) -> None:
    """Each migration runs in a child process: a hung one is killed (like a crashed controller) instead of
    stalling the bench, and a refused one comes back as the controller's own error."""
    with pytest.raises(SkyferryError, match=r"did not finish in 0 s; killed"):
        bench._call(["migrate", "counter", "local-2", "precopy"], timeout=0.01)
    with pytest.raises(SkyferryError, match=r"m-nonexistent"):
        bench._call(["resume", "m-nonexistent"], timeout=60)
