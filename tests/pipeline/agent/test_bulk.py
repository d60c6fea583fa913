"""The source host's first-round slots (agent/bulk.py): pure threading, no hosts needed. The evacuation
that uses them end to end is tests/pipeline/runbooks/test_runbook_evacuate.py."""

import threading
import time

import pytest
from skyferry.pipeline.agent import bulk as bulk_module
from skyferry.pipeline.agent.bulk import BulkSlots


def stream(slots: BulkSlots, width: int | None, chunks: list[bytes], entered: threading.Event,
           go: threading.Event, out: dict[str, dict[str, float]], name: str) -> None:  # fmt: skip
    with slots.slot(width) as bulk:
        entered.set()
        go.wait(10)
        for _ in bulk.counted(chunks):
            pass
    out[name] = bulk.report


def test_a_first_round_waits_for_a_free_slot_and_measures_the_link_meanwhile() -> None:
    slots, out = BulkSlots(), {}
    entered = {n: threading.Event() for n in "abc"}
    go = {n: threading.Event() for n in "abc"}
    threads = {
        n: threading.Thread(target=stream, args=(slots, 2, [b"x" * 1000] * size, entered[n], go[n], out, n))
        for n, size in (("a", 3), ("b", 5), ("c", 7))
    }
    threads["a"].start()
    threads["b"].start()
    assert entered["a"].wait(5) and entered["b"].wait(5)
    threads["c"].start()
    assert not entered["c"].wait(0.3), "two slots: the third round waits"
    go["b"].set()
    threads["b"].join(5)
    assert entered["c"].wait(5), "a slot given back lets the waiting round in"
    go["c"].set()
    threads["c"].join(5)
    go["a"].set()
    threads["a"].join(5)
    assert out["b"]["bytes"] == 5000 and out["b"]["link_bytes"] == 5000, "a sent nothing while b held its slot"
    assert out["a"]["link_bytes"] == 3000 + 5000 + 7000, "a's slot saw b's and c's bytes pass"
    assert 1.0 < out["a"]["streams"] <= 2.0 and out["c"]["waited_s"] >= 0.3


def test_a_migration_of_its_own_neither_waits_nor_lifts_the_limit() -> None:
    slots = BulkSlots()
    entered, go, out = threading.Event(), threading.Event(), {}
    waiting = threading.Thread(target=stream, args=(slots, 1, [b"x"], entered, go, out, "d"))
    with slots.slot(1):
        waiting.start()
        assert not entered.wait(0.2), "the evacuation's second round waits for the first"
        with slots.slot(None) as own:
            assert own.waited < 1.0, "no width: not an evacuation's, it does not wait"
            assert not entered.wait(0.3), "and the evacuation's limit stands for the round waiting"
    assert entered.wait(5)
    go.set()
    waiting.join(5)


def test_a_round_slows_to_a_trickle_while_a_container_here_is_frozen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bulk_module, "PIECE", 1000)
    frozen = threading.Event()
    slots = BulkSlots(frozen.is_set)
    with slots.slot(None) as bulk:
        pieces = bulk.counted([b"x" * 5000, b"y" * 5000])
        t0 = time.monotonic()
        assert len(next(pieces)) == 1000 and time.monotonic() - t0 < 0.05  # control: nothing frozen, at once
        frozen.set()
        t0 = time.monotonic()
        slow = [next(pieces) for _ in range(3)]
        slowed = time.monotonic() - t0
        frozen.clear()
        t0 = time.monotonic()
        rest = list(pieces)
        after = time.monotonic() - t0
    assert slowed >= 3 * bulk_module.TRICKLE_S * 0.9, "frozen: a piece per TRICKLE_S, not nothing"
    assert after < bulk_module.TRICKLE_S, "thawed: the rest at once"
    assert b"".join([b"x" * 1000, *slow, *rest]) == b"x" * 5000 + b"y" * 5000, "every byte, in order"
    assert bulk.report["bytes"] == 10000 and bulk.report["paused_s"] >= 0.25


def test_a_freeze_that_does_not_end_slows_a_round_only_so_long(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bulk_module, "PIECE", 1000)
    monkeypatch.setattr(bulk_module, "PAUSE_S", 0.3)
    slots = BulkSlots(lambda: True)  # a record nobody cleared: the round must still go on
    with slots.slot(None) as bulk:
        sent = list(bulk.counted([b"x" * 20000]))
    assert len(sent) == 20, "20 pieces at a trickle would take 2 s"
    assert 0.25 <= bulk.report["paused_s"] < 0.8
