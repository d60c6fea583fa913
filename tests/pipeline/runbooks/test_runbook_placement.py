"""Placement and pacing shared by the runbooks: pure decisions over measured numbers (no hosts needed)."""

import pytest
from skyferry.pipeline.runbooks import evacuate, placement

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


@pytest.mark.parametrize(
    ("budget", "samples", "parallel", "cap"),
    [
        (None, [], 4, 4),  # no known uplink: the operator's --parallel
        (10**9, [], 4, 4),  # known uplink, nothing measured yet: no migration waits to measure
        (10**9, [4e8, 3e8, 5e8], 4, 2),  # 1 Gbit/s at ~400 Mbit/s each: two streams at once
        (10**9, [9.5e8], 4, 2),  # one fills the link: still two, so its start and tail leave none idle
        (10**9, [9.5e8], 1, 1),  # ... but never more than asked
        (10**9, [5e7], 3, 3),  # small migrations: never more than asked
    ],
)
def test_streams_stay_within_the_measured_bandwidth(
    budget: int | None, samples: list[float], parallel: int, cap: int
) -> None:
    assert evacuate.Throughput(budget, parallel, samples).cap() == cap


def test_throughput_learns_from_finished_migrations() -> None:
    pace = evacuate.Throughput(10**9, 8)
    pace.add({"migration": {"state": "done", "bytes_wire": 50_000_000, "stages_s": {"precopy": 0.6, "transfer": 0.2}}})
    assert pace.as_dict()["per_migration_bps"] == pytest.approx(5e8) and pace.cap() == 2
    pace.add({"migration": {"state": "rolled-back", "bytes_wire": 1, "stages_s": {"transfer": 1.0}}})
    assert len(pace.samples) == 1, "only finished migrations measure the link"


@pytest.mark.parametrize(
    ("stages", "bulk_left"),
    [
        ([], True),  # started, no stage reported yet
        (["check", "prepare", "precopy"], True),
        (["check", "prepare", "precopy", "checkpoint"], False),  # pre-copy: the freeze moves only what changed
        (["check", "prepare", "precopy", "checkpoint", "cutover", "transfer", "restore"], False),
        (["check", "prepare", "checkpoint", "cutover"], True),  # stop-copy: everything goes in the transfer
        (["check", "prepare", "checkpoint", "cutover", "transfer"], True),
        (["check", "prepare", "checkpoint", "cutover", "transfer", "restore"], True),  # the transfer carries it
        (["check", "prepare", "checkpoint", "cutover", "transfer", "restore", "confirm"], False),
        (["check", "prepare", "checkpoint", "cutover", "transfer", "restore", "lazy"], True),  # post-copy's pages
        (["finishing interrupted migration m1"], False),
    ],
)
def test_a_migration_holds_a_stream_until_its_bulk_has_gone(stages: list[str], bulk_left: bool) -> None:
    assert evacuate.streaming(stages) is bulk_left
