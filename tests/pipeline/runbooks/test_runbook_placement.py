"""Placement and pacing shared by the runbooks: pure decisions over measured numbers (no hosts needed)."""

import pytest
from skyferry.pipeline.runbooks import placement
from skyferry.pipeline.runbooks import streams as evacuate_streams

MIB = 1 << 20


def test_priority_first_then_larger_first() -> None:
    needs = [
        placement.Need("small-urgent", 10 * MIB, priority=9),
        placement.Need("big", 300 * MIB),
        placement.Need("medium", 100 * MIB),
        placement.Need("big-urgent", 200 * MIB, priority=9),
    ]
    assert [n.name for n in placement.order(needs)] == ["big-urgent", "small-urgent", "big", "medium"]


def test_spreads_over_targets_and_reports_what_fits_nowhere() -> None:
    needs = [placement.Need(f"c{i}", 100 * MIB) for i in range(4)] + [placement.Need("huge", 900 * MIB)]
    rooms = [placement.Room("t1", 250 * MIB, 1.0), placement.Room("t2", 250 * MIB, 1.0)]
    assigned, unplaced = placement.place(needs, rooms)
    assert sorted(assigned.values()) == ["t1", "t1", "t2", "t2"]
    assert [n.name for n in unplaced] == ["huge"]
    assert [r.memory_free for r in rooms] == [50 * MIB, 50 * MIB], "rooms shrink as containers land"


def test_cpu_counts_as_much_as_memory() -> None:
    assigned, unplaced = placement.place(
        [placement.Need("busy", 10 * MIB, cpu=1.5)],
        [placement.Room("roomy-but-busy", 900 * MIB, 0.5), placement.Room("idle", 50 * MIB, 2.0)],
    )
    assert assigned == {"busy": "idle"} and unplaced == []


def climbed(pace: evacuate_streams.Streams, samples: list[tuple[float, float]]) -> list[int]:
    """The cap after each (the link's rate, streams at once) sample; each stream its share of the link."""
    caps = []
    for link, alongside in samples:
        pace.add(link, alongside, link / alongside)
        caps.append(pace.cap())
    return caps


def test_streams_climb_while_each_one_more_raises_what_the_link_carries() -> None:
    pace = evacuate_streams.Streams(parallel=8)
    assert pace.cap() == 1, "one to start with"
    # 1: 300 -> try 2; 2: 600 raised it -> try 3; 3: 900 -> try 4; 4: 920 did not -> back to 3, and stay
    assert climbed(pace, [(3e8, 1), (6e8, 2), (9e8, 3), (9.2e8, 4), (9e8, 3)]) == [2, 3, 4, 3, 3]
    assert pace.as_dict()["link_bps"] == {"1": 3e8, "2": 6e8, "3": 9e8, "4": 9.2e8}


def test_where_one_stream_fills_the_link_one_streams_at_a_time() -> None:
    # This machine: wireguard-go's CPU bounds the link near 300 Mbit/s, shared by however many stream.
    pace = evacuate_streams.Streams(parallel=4)
    assert climbed(pace, [(2.9e8, 1), (3e8, 2), (2.8e8, 1), (2.9e8, 1.2)]) == [2, 1, 1, 1], "tried, taken back"
    waits = evacuate_streams.Streams(parallel=4)
    waits.add(2.9e8, 1, 2.9e8, sending=0.8)
    assert waits.cap() == 1, "a stream that mostly waited for its socket: the link is full, no second tried"


@pytest.mark.parametrize(
    ("budget", "parallel", "samples", "cap"),
    [
        (10**9, 4, [(9.5e8, 1)], 1),  # a known uplink already full: no second stream
        (10**9, 8, [(5e8, 1), (10**9, 2)], 2),  # one stream moves half the uplink: no more than two
        (10**9, 8, [(5e7, 1), (1e8, 2)], 3),  # small streams on a big uplink: climb
        (None, 1, [(1e8, 1)], 1),  # never more than asked
        (None, 3, [(1e8, 1), (2e8, 2), (3e8, 3)], 3),
    ],
)
def test_streams_stay_within_the_uplink_and_the_parallel_asked(
    budget: int | None, parallel: int, samples: list[tuple[float, float]], cap: int
) -> None:
    assert climbed(evacuate_streams.Streams(parallel, budget), samples)[-1] == cap


def test_a_sample_is_the_first_rounds_turn_on_the_link() -> None:
    bulk = {"seconds": 2.0, "bytes": 50_000_000, "link_bytes": 75_000_000, "streams": 1.5, "sending_s": 1.5}
    assert evacuate_streams.sample({"state": "done", "bulk": bulk}) == (3e8, 1.5, 2e8, 0.75)
    assert evacuate_streams.sample({"state": "rolled-back", "bulk": bulk}) is None, "only finished ones count"
    assert evacuate_streams.sample({"state": "done", "bulk": None}) is None, "stop-copy: no first round"
