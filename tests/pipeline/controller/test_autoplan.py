"""Auto mode's stage list and the fixed freeze costs the controller learns per host pair: no hosts needed."""

from pathlib import Path

from skyferry.pipeline.controller import freezecost, migration


def names(mode: str, finish: str | None = None) -> list[str]:
    return [s.name for s in migration.plan(mode, finish)]


def test_auto_knows_its_finish_only_after_the_rounds() -> None:
    assert names("auto") == ["check", "prepare", "precopy"]
    assert names("auto", "precopy") == names("precopy")
    assert names("auto", "hybrid") == names("hybrid")
    assert names("precopy", "hybrid") == names("precopy")  # an explicit mode keeps its own list
    assert names("estimate") == ["check", "prepare", "precopy"]


def test_fixed_costs_are_learned_per_pair_and_mode(tmp_path: Path) -> None:
    assert freezecost.fixed_ms(tmp_path, "a", "b") == {}
    # predicted 700 ms of which 500 fixed: a 450 ms freeze shows a fixed cost of 250 ms
    seen = freezecost.learn(tmp_path, "a", "b", "hybrid", 450.0, {"freeze_ms": 700.0, "fixed_ms": 500.0})
    assert seen == 250.0 and freezecost.fixed_ms(tmp_path, "a", "b") == {"hybrid": 250.0}
    freezecost.learn(tmp_path, "a", "b", "hybrid", 550.0, {"freeze_ms": 450.0, "fixed_ms": 250.0})
    assert freezecost.fixed_ms(tmp_path, "a", "b") == {"hybrid": 300.0}  # the mean of 250 and 350
    assert freezecost.fixed_ms(tmp_path, "b", "a") == {}  # each direction is its own pair
    for _ in range(20):  # a running mean of the last few: it follows a host that got faster
        freezecost.learn(tmp_path, "a", "b", "hybrid", 100.0, {"freeze_ms": 100.0, "fixed_ms": 100.0})
    assert abs(freezecost.fixed_ms(tmp_path, "a", "b")["hybrid"] - 100.0) < 1.0
    freezecost.learn(tmp_path, "a", "b", "precopy", 10.0, {"freeze_ms": 900.0, "fixed_ms": 500.0})
    assert freezecost.fixed_ms(tmp_path, "a", "b")["precopy"] == 0.0  # never below nothing


def test_one_freeze_far_off_moves_the_learned_cost_only_so_far(tmp_path: Path) -> None:
    for _ in range(4):
        freezecost.learn(tmp_path, "a", "b", "hybrid", 220.0, {"freeze_ms": 220.0, "fixed_ms": 220.0})
    # A warm-up whose lazy dump wrote every page: 7 s, against 220 ms predicted.
    seen = freezecost.learn(tmp_path, "a", "b", "hybrid", 7025.0, {"freeze_ms": 220.0, "fixed_ms": 220.0})
    assert seen == 7025.0  # what it showed is reported as it was
    assert freezecost.fixed_ms(tmp_path, "a", "b")["hybrid"] == 220.0 + (440.0 - 220.0) / 4  # counted as 440
    # A pair that really got slower (every freeze 1 s now) is followed within a few migrations.
    for _ in range(12):
        freezecost.learn(tmp_path, "a", "b", "hybrid", 1000.0, {"freeze_ms": 220.0, "fixed_ms": 220.0})
    assert freezecost.fixed_ms(tmp_path, "a", "b")["hybrid"] > 950.0
