"""The freeze prediction and the policy that stops rounds at a downtime limit and picks the finish: pure."""

from skyferry.pipeline.memory.policy import NEEDS_THROTTLE, ConvergencePolicy, RoundStats
from skyferry.pipeline.memory.prediction import (
    DEFAULT_FIXED_MS,
    EAGER_S,
    GIB,
    LEAD_S,
    PAGE,
    Measured,
    fixed_cost,
    predict,
    predict_all,
)

MB = 1_000_000
AUTO = ("precopy", "hybrid")
QUICK = {"stop-copy": 20.0, "precopy": 40.0, "hybrid": 60.0, "postcopy": 20.0}  # a fast host pair's fixed costs


def rnd(seq: int, started: float, bytes_out: float, duration: float = 1.0, memory: int = 0) -> RoundStats:
    """A round that took `duration` s and sent `bytes_out`; round 1 found `memory` bytes of pages."""
    return RoundStats("round", seq, started, duration=duration, pages_changed=memory // PAGE, bytes_out=int(bytes_out))


def big(dirty_bytes: float, memory: int = GIB, round1: float = 300 * MB) -> list[RoundStats]:
    """1 GiB moved as 300 MB in 10 s (30 MB/s), then a round that sent `dirty_bytes` 10 s later."""
    return [rnd(1, 0, round1, 10.0, memory), rnd(2, 10.0, dirty_bytes, 2.0)]


def test_one_round_measures_size_and_bandwidth_but_not_the_dirty_rate() -> None:
    m = Measured.of([rnd(1, 0, 50 * MB, 2.0, 256 << 20)])
    assert (m.memory_bytes, m.memory_wire, m.bandwidth, m.dirty_rate) == (256 << 20, 50 * MB, 25 * MB, None)
    assert m.delta_wire() == 50 * MB  # not seen yet: anything may have changed
    m = Measured.of([rnd(1, 0, 50 * MB, 2.0, 256 << 20), rnd(2, 4.0, 8 * MB, 0.5)])
    assert m.dirty_rate == 2 * MB  # 8 MB changed in the 4 s between the rounds' starts
    assert m.delta_wire() == int(2 * MB * (0.5 + LEAD_S))
    assert Measured.of([rnd(1, 0, 50 * MB, 2.0)], bandwidth=100 * MB).bandwidth == 100 * MB  # a measured link wins


def test_each_mode_pays_where_it_should() -> None:
    m = Measured.of(big(60 * MB))  # 30 MB/s, 6 MB/s of changes
    p = predict_all(m, {})
    assert {k: v.fixed_ms for k, v in p.items()} == DEFAULT_FIXED_MS  # nothing learned yet
    # stop-copy moves everything inside the freeze, post-copy nothing (and every page afterwards, raw)
    assert p["stop-copy"].bytes_at_freeze == 300 * MB and p["stop-copy"].freeze_ms > 10_000
    assert p["postcopy"].freeze_ms == DEFAULT_FIXED_MS["postcopy"] and p["postcopy"].lazy_bytes == GIB
    # precopy moves the delta, hybrid only what the link moves in EAGER_S; the rest goes lazily
    assert p["precopy"].bytes_at_freeze == m.delta_wire()
    assert p["hybrid"].bytes_at_freeze == int(m.bandwidth * EAGER_S)
    assert p["hybrid"].lazy_bytes == m.delta_wire() - p["hybrid"].bytes_at_freeze
    assert p["hybrid"].freeze_ms < p["precopy"].freeze_ms < p["stop-copy"].freeze_ms
    # rounds count in the total and the bytes of the modes that run them
    assert p["precopy"].bytes_wire == 360 * MB + m.delta_wire() and p["precopy"].total_s > m.rounds_s
    assert p["stop-copy"].bytes_wire == 300 * MB
    # soft-dirty rounds: CRIU dumps only the delta, so the freeze grows less with memory
    assert predict("precopy", m, {}, "soft-dirty").freeze_ms < p["precopy"].freeze_ms
    assert predict("precopy", m, {"precopy": 10.0}).fixed_ms == 10.0


def test_a_mode_never_run_between_a_pair_is_scaled_like_the_ones_that_ran() -> None:
    slow = {"precopy": DEFAULT_FIXED_MS["precopy"] * 2}  # this pair took twice the default in precopy
    assert fixed_cost("precopy", slow) == DEFAULT_FIXED_MS["precopy"] * 2
    assert fixed_cost("hybrid", slow) == DEFAULT_FIXED_MS["hybrid"] * 2  # not the optimistic default
    assert fixed_cost("hybrid", {}) == DEFAULT_FIXED_MS["hybrid"]


def test_a_tiny_container_freezes_after_round_one_when_that_fits() -> None:
    tiny = [rnd(1, 0, 1.4 * MB, 0.05, 6 << 20)]  # the demo's counter
    d = ConvergencePolicy(max_freeze_ms=300, finishes=AUTO, fixed_ms=QUICK).decide(tiny)
    assert (d.stop, d.reason, d.finish) == (True, "fits", "precopy")  # both fit: precopy is preferred
    assert "fits --max-freeze 300 ms" in d.finish_reason
    assert d.predicted["precopy"]["freeze_ms"] <= 300
    # --estimate wants a second round whatever the first one says
    assert not ConvergencePolicy(max_freeze_ms=300, finishes=AUTO, fixed_ms=QUICK, min_rounds=2).decide(tiny).stop


def test_big_memory_that_keeps_changing_goes_hybrid() -> None:
    policy = ConvergencePolicy(max_delta_bytes=1 << 20, max_freeze_ms=300, finishes=AUTO, fixed_ms=QUICK)
    # One round: the dirty rate is not known yet, so all of memory may still be left for the lazy phase.
    d = policy.decide(big(10 * MB, 512 << 20)[:1])
    assert (d.stop, d.reason) == (False, "continue") and d.predicted["hybrid"]["lazy_bytes"] > 0
    d = policy.decide(big(10 * MB, 512 << 20))  # 1 MB/s changes: the link moves them inside the freeze
    assert d.predicted["precopy"]["freeze_ms"] > 300 >= d.predicted["hybrid"]["freeze_ms"]
    assert (d.stop, d.reason, d.finish) == (True, "fits", "hybrid")
    assert "precopy" in d.finish_reason and "hybrid" in d.finish_reason  # says what it compared
    # Faster changes: the freeze fits, but rounds go on while they shrink what is left for later.
    d = policy.decide(big(60 * MB, 512 << 20))
    assert d.predicted["hybrid"]["freeze_ms"] <= 300 and (d.stop, d.finish) == (False, "hybrid")
    d = policy.decide([*big(60 * MB, 512 << 20), rnd(3, 12.0, 70 * MB, 2.0)])
    assert (d.stop, d.reason, d.finish) == (True, "fits", "hybrid") and "after the restore" in d.detail


def test_fixed_costs_over_the_limit_fall_back_to_the_round_rules() -> None:
    slow = {"precopy": 500.0, "hybrid": 550.0}  # a pair whose freezes cost half a second before any memory
    policy = ConvergencePolicy(max_delta_bytes=1 << 20, max_freeze_ms=300, finishes=AUTO, fixed_ms=slow)
    d = policy.decide(big(500_000))
    assert (d.stop, d.reason) == (True, "converged") and "even with nothing to copy" in d.detail
    # at 1 GiB CRIU's writing and reading every page makes precopy's freeze the longer one
    assert d.finish == "hybrid" and "none fits --max-freeze 300 ms; shortest" in d.finish_reason
    assert d.predicted["hybrid"]["freeze_ms"] < d.predicted["precopy"]["freeze_ms"]
    d = policy.decide(big(60 * MB))
    assert (d.stop, d.reason) == (False, "continue")  # rounds still shrink the delta
    tiny = policy.decide([rnd(1, 0, 500_000, 0.05, 6 << 20)])
    assert (tiny.reason, tiny.finish) == ("converged", "precopy")  # a few MiB: precopy's freeze is shorter


def test_rounds_that_stop_shrinking_ask_for_a_throttle() -> None:
    policy = ConvergencePolicy(max_delta_bytes=1 << 20, max_freeze_ms=300, finishes=("precopy",), fixed_ms=QUICK)
    rounds = [*big(6 * MB, 64 << 20, 20 * MB), rnd(3, 12.0, 7 * MB, 2.0)]  # round 3 sent more than round 2
    d = policy.decide(rounds)
    assert (d.stop, d.reason, d.finish) == (True, NEEDS_THROTTLE, "precopy")
    assert "no longer shrink" in d.detail
    assert d.finish_reason == "the mode asked for"
    # Hybrid alone, its freeze just over the limit (250 ms fixed + 100 ms eager) though its floor is under:
    # it needs no throttle (what the rounds cannot move follows the restore), so the rules name the stop.
    lazy = ConvergencePolicy(
        max_delta_bytes=1 << 20, max_freeze_ms=300, finishes=("hybrid",), fixed_ms={"hybrid": 250.0}
    )
    d = lazy.decide(rounds)
    assert d.predicted["hybrid"]["floor_ms"] <= 300 < d.predicted["hybrid"]["freeze_ms"], d.predicted["hybrid"]
    assert (d.stop, d.reason) == (True, "not-converging"), d.detail
    # with a limit the pair can meet, the round and time limits still end the rounds
    shrinking = [*big(6 * MB, 64 << 20, 20 * MB), rnd(3, 12.0, 5 * MB, 2.0), rnd(4, 14.0, 4 * MB, 2.0)]
    limited = ConvergencePolicy(max_rounds=4, max_freeze_ms=300, fixed_ms=QUICK, bandwidth=30 * MB)
    assert limited.decide(shrinking).reason == "round-limit"


def test_no_throttle_when_no_freeze_could_fit_and_the_delta_costs_little() -> None:
    """Auto-converge serves the limit: when even an empty delta cannot fit, a throttle can only shrink the
    delta's share of the freeze, worth slowing the service for only while that share exceeds the limit."""
    behind = [*big(6 * MB, 64 << 20, 20 * MB), rnd(3, 12.0, 5.5 * MB, 2.0)]  # the delta does not halve
    quick = ConvergencePolicy(max_delta_bytes=1 << 20, max_freeze_ms=300, finishes=AUTO, fixed_ms=QUICK, throttle=True)
    d = quick.decide(behind)
    assert (d.stop, d.reason) == (False, "throttle"), d.detail  # control: a floor under the limit, so it steps
    slow = {"precopy": 500.0, "hybrid": 550.0}
    hopeless = ConvergencePolicy(
        max_delta_bytes=1 << 20, max_freeze_ms=300, finishes=AUTO, fixed_ms=slow, throttle=True
    )
    d = hopeless.decide(behind)
    assert d.reason != "throttle" and "even with nothing to copy" in d.detail, d.detail
    assert min(p["floor_ms"] for p in d.predicted.values()) > 300
    hybrid = d.predicted["hybrid"]  # the finish it would take: its delta's share is the eager pages
    assert d.finish == "hybrid" and hybrid["freeze_ms"] - hybrid["floor_ms"] <= 300
    # Precopy alone carries the whole delta in its freeze (seconds here): still worth throttling, as is any
    # delta for a limit of 1 ms ("as short as it gets").
    alone = ConvergencePolicy(max_delta_bytes=1 << 20, max_freeze_ms=300, fixed_ms=slow, throttle=True)
    assert alone.decide(behind).reason == "throttle"
    shortest = ConvergencePolicy(max_delta_bytes=1 << 20, max_freeze_ms=1, finishes=AUTO, fixed_ms=slow, throttle=True)
    assert shortest.decide(behind).reason == "throttle"
    # Without a limit, the throttle follows the rules alone, as before.
    assert ConvergencePolicy(max_delta_bytes=1 << 20, fixed_ms=slow, throttle=True).decide(behind).reason == "throttle"
    # The round limit is not held off for steps that will not come.
    many = [*big(6 * MB, 64 << 20, 20 * MB), rnd(3, 22.0, 5 * MB, 2.0), rnd(4, 34.0, 4.5 * MB, 2.0)]  # slowly shrinking
    capped = ConvergencePolicy(max_rounds=4, max_freeze_ms=300, finishes=AUTO, fixed_ms=slow, throttle=True)
    assert capped.decide(many, throttled=0.3).reason == "round-limit"
    stepping = ConvergencePolicy(max_rounds=4, max_freeze_ms=300, finishes=AUTO, fixed_ms=QUICK, throttle=True)
    stepped = stepping.decide(many, throttled=0.3)
    assert stepped.reason == "throttle"  # control: with a floor under the limit, the same rounds step


def test_without_a_limit_the_rounds_rules_alone_decide() -> None:
    policy = ConvergencePolicy(max_delta_bytes=1 << 20)
    assert policy.decide(big(500_000)).reason == "converged"
    assert policy.decide(big(60 * MB)).reason == "continue"
    assert policy.decide(big(60 * MB)).finish == "precopy"
