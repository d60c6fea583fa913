"""`skyferry bench` machinery on a tiny configuration, every part on one mesh: real hosts, agents, CRIU,
iperf3, clients, `skyferry evacuate` and Podman.

Checks what the bench runs, measures and writes, never how fast anything was.
"""

import json
import os
import shutil
from pathlib import Path

import pytest
from kit.mesh import cgroup_dirs
from skyferry.netplane import netns
from skyferry.pipeline.controller.migration import MODES
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.scenarios import bench, bench_evacuate, benchhosts, benchreport, benchtargets, evacreport

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]
PODMAN = shutil.which("podman") is not None  # scripts/bootstrap-host.sh installs it; without it, that test skips


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One tiny bench on one mesh: the tiny service in stop-copy and auto; 16 MiB with a warm-up, then the
    baseline, pre-copy, and a mode that does not exist (a run that fails); then 1 and 2 containers of 8 MiB
    evacuated, and the Podman baseline."""
    out = tmp_path_factory.mktemp("bench-out")
    cfg = bench.Config(
        workloads=(benchtargets.TINY, bench.Workload(16, dirty_mb_s=2.0)),
        modes=("precopy", "no-such-mode", "stop-copy"),
        evacuate=bench_evacuate.Config(
            counts=(1, 2), memory_mib=8, iperf_s=1.0, settle_s=0.5, after_requests=3, podman=PODMAN
        ),
        wan="rate=1gbit,rtt=2ms",
        settle_s=0.5,
        after_requests=3,
        warmup=True,
        iperf_s=1.0,
        mesh_name="b" + os.urandom(2).hex(),
        warm_memory_gib=0.25,
        keep_logs=out / "logs",
    )
    with pytest.MonkeyPatch.context() as mp:  # every freeze counts as far past its prediction: all their logs kept
        mp.setattr(benchhosts, "OUTLIER_X", 0.0)
        mp.setattr(benchhosts, "OUTLIER_MS", -1e9)
        res = bench.run(cfg)
    res["paths"] = benchreport.write(res, out)
    return res


def test_the_criu_logs_of_outlying_migrations_outlive_the_bench(result: dict) -> None:
    predicted = [r for r in [*result["warmups"], *result["runs"]] if r["ok"] and r.get("predicted_freeze_ms")]
    unpredicted = [r for r in result["runs"] if r["ok"] and not r.get("predicted_freeze_ms")]  # stop-copy
    assert predicted and unpredicted
    moves = [c for run in result["evacuate"]["runs"] for c in run["containers"]]
    assert moves and all(c["predicted_freeze_ms"] for c in moves)  # an evacuation's moves count as well
    kept = result["kept_logs"]
    # control: stop-copy's runs had no prediction to miss
    assert set(kept) == {r["report"]["id"] for r in predicted} | {c["migration"] for c in moves}
    hosts = [(r["report"]["id"], r["source"], r["target"]) for r in predicted]
    hosts += [(c["migration"], bench_evacuate.SOURCE, bench_evacuate.TARGET) for c in moves]
    for mig, source_host, target_host in hosts:
        where = Path(kept[mig])
        source, target = where / source_host, where / target_host
        assert any(p.name.endswith("dump.log") for p in source.iterdir()), sorted(source.iterdir())
        assert any(p.name.endswith("restore.log") for p in target.iterdir()), sorted(target.iterdir())
        assert "criu" in "".join(p.read_text(errors="replace")[:4000].lower() for p in source.iterdir())


def _runs(result: dict, workload: str) -> list[dict]:
    return [r for r in result["runs"] if r["workload"] == workload]


def test_every_mode_runs_baseline_first_and_a_failed_run_does_not_stop_the_others(result: dict) -> None:
    assert result["errors"] == [f"evacuate: {e}" for e in result["evacuate"]["errors"]] == []
    assert [r["mode"] for r in _runs(result, "16 MiB")] == ["stop-copy", "precopy", "no-such-mode"]
    stop, pre, bad = _runs(result, "16 MiB")
    assert stop["ok"] and pre["ok"], (stop["error"], pre["error"])
    assert not bad["ok"] and "unknown mode" in bad["error"] and bad["connection_survived"]
    # An unmeasured warm-up per workload first; then each run starts where the previous one left the container.
    assert [(w["workload"], w["mode"], w["ok"]) for w in result["warmups"]] == [
        ("tiny service", "auto", True), ("16 MiB", "auto", True)
    ]  # fmt: skip
    assert all((w["source"], w["target"]) == ("local-1", "local-2") for w in result["warmups"])
    assert (stop["source"], stop["target"]) == ("local-2", "local-1")
    assert (pre["source"], pre["target"]) == ("local-1", "local-2")
    assert (bad["source"], bad["target"]) == ("local-2", "local-1")
    assert bench.failed(result), "a failed run fails the bench"
    # The baseline alone gets a longer freeze bound; every other mode has the default a user gets.
    assert [r["freeze_timeout_s"] for r in (stop, pre, bad)] == [120.0, 30.0, 30.0]


def test_the_tiny_service_runs_in_its_own_modes_and_auto_says_what_it_chose(result: dict) -> None:
    stop, auto = _runs(result, "tiny service")
    assert (stop["mode"], auto["mode"]) == ("stop-copy", "auto") and stop["memory_mib"] == 0
    for r in (stop, auto):
        assert r["ok"], r["error"]
        assert r["freeze_ms"] > 0 and r["client_gap_ms"] > 0 and r["connection_survived"]
    assert auto["mode_chosen"] == auto["report"]["mode"] and auto["mode_chosen"] in MODES
    assert auto["ratios"]["client_gap_ms"] == round(auto["client_gap_ms"] / stop["client_gap_ms"], 3)


def test_ratios_are_against_the_same_runs_stop_copy(result: dict) -> None:
    stop, pre, bad = _runs(result, "16 MiB")
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
    assert set(result["iperf3"]) == {"tiny service", "16 MiB"}
    assert set(result["iperf3"]["16 MiB"]) == {"local-1->local-2", "local-2->local-1"}
    assert all(v["mbit_s"] > 0 and v["window"] == "8M" for v in result["iperf3"]["16 MiB"].values())


def test_each_count_is_evacuated_on_the_same_mesh_against_its_iperf3_bound(result: dict) -> None:
    evac = result["evacuate"]
    one, two = evac["runs"]
    assert (one["count"], one["parallel"], two["count"], two["parallel"]) == (1, 1, 2, 2)
    for run in (one, two):
        assert run["ok"], run["error"]
        assert run["iperf3"]["mbit_s"] > 0 and run["iperf3_after"]["mbit_s"] > 0  # around the evacuation
        link = max(run["iperf3"]["mbit_s"], run["iperf3_after"]["mbit_s"])
        assert run["bound_s"] == round(evacreport.bound_s(run["count"], 8, link), 2)
        assert run["vs_bound"] == round(run["seconds"] / run["bound_s"], 2)
        same = run["iperf3_bytes"]  # the containers' memory as one iperf3 stream
        assert same["bytes"] == run["count"] * (8 << 20) and 0 < same["received"]["bytes"] <= same["bytes"]
        assert same["seconds"] == pytest.approx(same["bytes"] * 8 / (same["mbit_s"] * 1e6), abs=0.02)
        assert run["span_vs_same_bytes"] == round(run["fairness"]["span_s"] / same["seconds"], 2)
        assert len(run["containers"]) == run["count"]
        for c in run["containers"]:
            assert c["state"] == "done" and c["connection_survived"] and c["client_gap_ms"] > 0
            assert c["freeze_ms"] > 0 and c["bytes_wire"] > 8 << 20, "incompressible: no less than the memory"
            assert c["rounds"] and c["rounds"][0]["bytes_out"] > 8 << 20 and c["precopy_stop"]
            assert run["seconds"] > c["finished"] - c["started"] > 0
            pause, restored = c["frozen_wall"]  # the freeze in wall-clock time, as the report counts it
            assert c["started"] < pause < restored <= c["finished"]
            assert (restored - pause) * 1000 == pytest.approx(c["freeze_ms"], abs=0.1)
            assert c["client_past_freeze"] in (None, "in", "outside")
        fair = run["fairness"]
        assert len(fair["completed_s"]) == run["count"] and fair["completed_s"] == sorted(fair["completed_s"])
        assert 1 <= fair["max_concurrency"] <= run["parallel"]


@pytest.mark.skipif(not PODMAN, reason="podman is not installed (scripts/bootstrap-host.sh)")
def test_podman_baseline_moves_the_same_workload_with_its_connection(result: dict) -> None:
    base = result["evacuate"]["podman"]
    assert base["ok"], base["error"]
    assert base["connection_survived"] and base["client_gap_ms"] > 0
    assert set(base["seconds"]) == {"checkpoint", "transfer", "restore", "route"}
    assert base["total_ms"] == round(sum(base["seconds"].values()) * 1000, 1)
    sky = result["evacuate"]["runs"][0]["containers"][0]
    assert base["ratios"]["client_gap_ms"] == round(sky["client_gap_ms"] / base["client_gap_ms"], 3)
    assert result["targets"][-1]["target"].startswith("client's gap, skyferry ÷ Podman")


def test_the_targets_table_comes_from_this_run(result: dict) -> None:
    rows = {t["target"]: t for t in result["targets"]}
    tiny = rows["freeze, tiny service (`make demo`)"]
    auto = _runs(result, "tiny service")[1]
    assert tiny["measured"] == f"{auto['freeze_ms']:.0f} ms" and tiny["chose"] == auto["mode_chosen"]
    assert tiny["met"] == (auto["freeze_ms"] <= benchtargets.FREEZE_GOAL_MS[0])
    # The 16 MiB workload ran no auto run: no freeze row of its own, and the gap row is the tiny service's.
    assert not any("16 MiB" in t for t in rows)
    assert rows["client's largest gap, default mode"]["measured"].endswith("(worst: tiny service)")
    evac = rows["evacuation of 2 x 8 MiB (incompressible) vs the iperf3 bound"]
    assert evac["goal"] == "-" and evac["met"] is None, "the issue's goal is for 8 x 64 MiB only"
    assert evac["measured"].startswith(f"{result['evacuate']['runs'][1]['vs_bound']:.2f}x")


def test_outputs_json_markdown_png_and_table(result: dict) -> None:
    paths = result["paths"]
    saved = json.loads(paths["json"].read_text())
    assert [r["mode"] for r in saved["runs"]] == [r["mode"] for r in result["runs"]]
    assert saved["targets"] == result["targets"] and [r["count"] for r in saved["evacuate"]["runs"]] == [1, 2]
    assert saved["machine"]["nproc"] == os.cpu_count() and saved["machine"]["kernel"] == os.uname().release
    assert saved["machine"]["first_touch_s_per_gib"] > 0  # the memory was touched once before the runs
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths["png"].stat().st_size > 10_000
    markdown = paths["md"].read_text()
    assert "| stop-copy |" in markdown and "| precopy |" in markdown and "\nMachine: " in markdown
    assert "| freeze, tiny service (`make demo`) | 502 ms |" in markdown and "| 2 x 8 MiB | 2 |" in markdown
    assert markdown.index("| target |") < markdown.index("| workload |") < markdown.index("| containers |")
    rows = benchreport.rows(result)
    assert len(rows) == len(result["runs"]) and all(len(row) == len(benchreport.COLUMNS) for row in rows)
    pre = result["runs"].index(_runs(result, "16 MiB")[1])
    assert rows[pre][3].endswith(f"(x{result['runs'][pre]['ratios']['freeze_ms']:.2f})")
    assert rows[-1][-1].startswith("FAILED: ")
    auto = result["runs"].index(_runs(result, "tiny service")[1])
    assert rows[auto][1:3] == ["auto", result["runs"][auto]["mode_chosen"]]
    freeze = benchreport.freeze_rows(result)  # every run that got past its restore says where its freeze went
    assert len(freeze) == sum(1 for r in result["runs"] if r["ok"]) and "| pause + lock |" in markdown
    assert all(len(row) == len(benchreport.FREEZE_COLUMNS) for row in freeze)


def test_nothing_is_left_behind(result: dict) -> None:
    """No namespace carries the mesh id, the state folder and the Podman stores are gone, and no process
    refers to the state folder."""
    assert not list(netns.RUN_DIR.glob(f"{result['mesh']}-*"))
    assert not Path(result["state_dir"]).exists()
    assert not cgroup_dirs(f"skyferry-bench-{result['mesh']}"), "the Podman baseline's cgroups are gone"
    assert not Path("/run/skyferry-bench").exists(), "the Podman stores' runroots are gone"
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
        bench._call(["migrate", "counter", "local-2", "precopy", "30"], timeout=0.01)
    with pytest.raises(SkyferryError, match=r"m-nonexistent"):
        bench._call(["resume", "m-nonexistent"], timeout=60)
