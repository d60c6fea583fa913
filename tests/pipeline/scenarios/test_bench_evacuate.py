"""`skyferry bench --evacuate` at tiny sizes: real hosts, agents, CRIU, iperf3, clients and Podman.

Checks what the bench measures and writes, never how fast anything was.
"""

import json
import os
import shutil
from pathlib import Path

import pytest
from kit.mesh import cgroup_dirs
from skyferry.netplane import netns
from skyferry.pipeline.scenarios import bench_evacuate, evacreport

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.skipif(shutil.which("podman") is None, reason="podman is not installed (scripts/bootstrap-host.sh)"),
]


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict:
    cfg = bench_evacuate.Config(
        counts=(1, 2),
        memory_mib=8,
        wan="rate=1gbit,rtt=2ms",
        iperf_s=1.0,
        settle_s=0.5,
        after_requests=3,
        mesh_name="e" + os.urandom(2).hex(),
    )
    res = bench_evacuate.run(cfg)
    res["paths"] = evacreport.write(res, tmp_path_factory.mktemp("evacuate-out"))
    return res


def test_each_count_is_evacuated_and_measured_against_its_iperf3_bound(result: dict) -> None:
    assert result["errors"] == []
    one, two = result["runs"]
    assert (one["count"], one["parallel"], two["count"], two["parallel"]) == (1, 1, 2, 2)
    for run in (one, two):
        assert run["ok"], run["error"]
        assert run["iperf3"]["mbit_s"] > 0 and run["iperf3_after"]["mbit_s"] > 0  # around the evacuation
        link = max(run["iperf3"]["mbit_s"], run["iperf3_after"]["mbit_s"])
        assert run["bound_s"] == round(evacreport.bound_s(run["count"], 8, link), 2)
        assert run["vs_bound"] == round(run["seconds"] / run["bound_s"], 2)
        assert len(run["containers"]) == run["count"]
        for c in run["containers"]:
            assert c["state"] == "done" and c["connection_survived"] and c["client_gap_ms"] > 0
            assert c["freeze_ms"] > 0 and c["bytes_wire"] > 8 << 20, "incompressible: no less than the memory"
            assert c["rounds"] and c["rounds"][0]["bytes_out"] > 8 << 20 and c["precopy_stop"]
            assert run["seconds"] > c["finished"] - c["started"] > 0
        fair = run["fairness"]
        assert len(fair["completed_s"]) == run["count"] and fair["completed_s"] == sorted(fair["completed_s"])
        assert 1 <= fair["max_concurrency"] <= run["parallel"]


def test_podman_baseline_moves_the_same_workload_with_its_connection(result: dict) -> None:
    base = result["podman"]
    assert base["ok"], base["error"]
    assert base["connection_survived"] and base["client_gap_ms"] > 0
    assert set(base["seconds"]) == {"checkpoint", "transfer", "restore", "route"}
    assert base["total_ms"] == round(sum(base["seconds"].values()) * 1000, 1)
    sky = result["runs"][0]["containers"][0]
    assert base["ratios"]["client_gap_ms"] == round(sky["client_gap_ms"] / base["client_gap_ms"], 3)


def test_outputs_and_nothing_left_behind(result: dict) -> None:
    saved = json.loads(result["paths"]["json"].read_text())
    assert [r["count"] for r in saved["runs"]] == [1, 2]
    assert "skyferry ÷ podman" in result["paths"]["md"].read_text()
    assert not [n for n in os.listdir(netns.RUN_DIR) if n.startswith(result["mesh"])]
    assert not cgroup_dirs(f"skyferry-bench-{result['mesh']}"), "the Podman baseline's cgroups are gone"
    assert not Path("/run/skyferry-bench").exists(), "the Podman stores' runroots are gone"
