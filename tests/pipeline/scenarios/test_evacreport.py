"""The bench's evacuation arithmetic and tables, on results written by hand (no hosts)."""

from typing import Any

from skyferry.pipeline.scenarios import evacreport


def test_bound_is_all_the_memory_at_iperf3s_rate() -> None:
    # The figure: 8 x 64 MiB at 429.5 Mbit/s is 10 s.
    assert round(evacreport.bound_s(8, 64, 429.5), 2) == 10.0
    assert evacreport.bound_s(1, 64, 100.0) == 64 * 2**20 * 8 / 100e6


def test_max_concurrency_counts_overlaps_and_not_touching_ends() -> None:
    assert evacreport.max_concurrency([]) == 0
    assert evacreport.max_concurrency([(0, 1), (1, 2), (2, 3)]) == 1  # one ends as the next starts
    assert evacreport.max_concurrency([(0, 4), (1, 2), (1.5, 3), (3.5, 5)]) == 3
    # "--parallel 4" with 8 containers in two waves.
    waves = [(0, 2)] * 4 + [(2, 4)] * 4
    assert evacreport.max_concurrency(waves) == 4


def test_fairness_reports_completions_from_the_start_and_duration_spread() -> None:
    t0 = 100.0
    fair = evacreport.fairness([(101.0, 103.0), (101.0, 104.0), (103.0, 106.5), (104.0, 107.0)], t0)
    assert fair["first_started_s"] == 1.0 and fair["span_s"] == 6.0
    assert fair["completed_s"] == [3.0, 4.0, 6.5, 7.0]
    assert fair["completion_spread_s"] == 4.0
    assert fair["duration_s"] == {"min": 2.0, "max": 3.5}
    assert fair["duration_spread"] == round(3.5 / 2.0, 2)
    assert fair["max_concurrency"] == 2
    assert evacreport.fairness([], t0) == {}


def _result(podman_ok: bool = True) -> dict[str, Any]:
    one = {"container": "ev1-0", "client_gap_ms": 600.0, "total_ms": 3000.0, "freeze_ms": 550.0, "state": "done"}
    return {
        "config": {"wan": "rate=1gbit,rtt=30ms", "memory_mib": 64, "dirty_mb_s": 0.0, "parallel": 4},
        "machine": {"nproc": 2, "cpu": "cpu", "kernel": "k", "memory_gb": 1.0, "load_avg": [1.0]},
        "seconds": 100.0,
        "errors": [],
        "runs": [
            {
                "count": 1,
                "memory_mib": 64,
                "parallel": 1,
                "ok": True,
                "seconds": 3.0,
                "wire_bytes": 70_000_000,
                "iperf3": {"mbit_s": 400.0},
                "containers": [one],
                "fairness": evacreport.fairness([(0.0, 3.0)], 0.0),
            },
            {
                "count": 8,
                "memory_mib": 64,
                "parallel": 4,
                "ok": False,
                "error": None,
                "seconds": 16.2,
                "iperf3": {"mbit_s": 300.0},
                "iperf3_after": {"mbit_s": 429.5},
                "iperf3_bytes": {"mbit_s": 350.0, "seconds": 12.0, "bytes": 8 * (64 << 20)},
                "containers": [{**one, "container": f"ev8-{i}"} for i in range(8)],
                "fairness": evacreport.fairness([(0.0, 4.0)] * 4 + [(4.0, 16.2)] * 4, 0.0),
            },
        ],
        "podman": {
            "ok": podman_ok,
            "error": None if podman_ok else "podman restore failed: x",
            "seconds": {"checkpoint": 1.0, "transfer": 2.0, "restore": 1.5, "route": 0.1},
            "total_ms": 4600.0,
            "client_gap_ms": 4800.0,
        },
    }


def test_the_link_is_the_faster_of_iperf3_before_and_after() -> None:
    assert evacreport.link_mbit_s({"iperf3": {"mbit_s": 300.0}, "iperf3_after": {"mbit_s": 429.5}}) == 429.5
    assert evacreport.link_mbit_s({"iperf3": {"mbit_s": 300.0}}) == 300.0
    assert evacreport.link_mbit_s({}) is None


def test_ratios_against_the_bound_and_the_podman_baseline() -> None:
    result = _result()
    evacreport.add_ratios(result)
    one, eight = result["runs"]
    assert eight["bound_s"] == 10.0 and eight["vs_bound"] == round(16.2 / 10.0, 2)
    assert eight["span_vs_bound"] == round(16.2 / 10.0, 2)  # its migrations ran from 0 s to 16.2 s
    assert eight["span_vs_same_bytes"] == round(16.2 / 12.0, 2)  # iperf3 moved the 512 MiB in 12 s
    assert "span_vs_same_bytes" not in one  # not measured: no ratio made up
    assert one["wire_mbit_s"] == round(70e6 * 8 / 3.0 / 1e6, 1)
    assert "wire_mbit_s" not in eight  # no wire bytes recorded: no rate made up
    base = result["podman"]
    assert base["skyferry"]["client_gap_ms"] == 600.0
    assert base["ratios"] == {"client_gap_ms": round(600 / 4800, 3), "total_ms": round(3000 / 4600, 3)}


def test_no_podman_ratio_when_the_baseline_failed() -> None:
    result = _result(podman_ok=False)
    evacreport.add_ratios(result)
    assert "ratios" not in result["podman"]
    assert evacreport.podman_rows(result) == [
        ["podman checkpoint/restore", "FAILED: podman restore failed: x", "", "", "", "", ""]
    ]


def test_a_client_past_its_freeze_is_told_in_it_from_outside_it() -> None:
    frozen = {"freeze_ms": 200.0, "frozen_wall": [100.0, 100.2]}
    assert evacreport.past_freeze({**frozen, "client_gap_ms": 240.0, "client_gap_wall": [100.0, 100.24]}) is None
    assert evacreport.past_freeze({**frozen, "client_gap_ms": 300.0, "client_gap_wall": [100.0, 100.3]}) == "in"
    assert evacreport.past_freeze({**frozen, "client_gap_ms": 300.0, "client_gap_wall": [95.0, 95.3]}) == "outside"
    assert evacreport.past_freeze({"freeze_ms": 200.0, "client_gap_ms": 300.0, "client_gap_wall": [95.0, 95.3]}) is None


def test_tables() -> None:
    result = _result()
    evacreport.add_ratios(result)
    one, eight = evacreport.rows(result)
    assert one[:5] == ["1 x 64 MiB", "1", "3.0 s (0.0 s, 3.0 s)", "1.3 s (400 Mbit/s)", "2.24 (2.24)"]
    assert eight[4] == "1.62 (1.62)" and eight[5] == "12.0 s (1.35)" and one[5] == "-"
    assert eight[7] == "4.0, 4.0, 4.0, 4.0, 16.2, 16.2, 16.2, 16.2"
    assert eight[-1].startswith("FAILED")
    assert one[-2] == "-"  # not recorded (a bench before the column): nothing made up
    inside = {"frozen_wall": [0.1, 0.65], "client_gap_wall": [0.1, 0.7], "client_past_freeze": "in"}
    result["runs"][0]["containers"][0].update(inside)
    assert evacreport.rows(result)[0][-2] == "1 / 0"
    base, sky, ratio = evacreport.podman_rows(result)
    assert base == ["podman --export/--import", "1000 ms", "2000 ms", "1500 ms", "100 ms", "4600 ms", "4800 ms"]
    assert sky[5:] == ["3000 ms", "600 ms (freeze 550 ms)"] and ratio[5:] == ["0.65", "0.12"]
