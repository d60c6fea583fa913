"""The source host's first-round slots (agent/bulk.py): pure threading, no hosts needed. The evacuation
that uses them end to end is tests/pipeline/runbooks/test_runbook_evacuate.py."""

import threading

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


def test_waiting_rounds_get_their_slots_in_the_order_they_asked() -> None:
    slots, out = BulkSlots(), {}
    entered = {n: threading.Event() for n in "abcde"}
    go = {n: threading.Event() for n in "abcde"}
    order: list[str] = []

    def run(name: str) -> None:
        stream(slots, 1, [b"x"], entered[name], go[name], out, name)

    def start(name: str) -> threading.Thread:
        thread = threading.Thread(target=run, args=(name,))
        thread.start()
        return thread

    threads = {"a": start("a")}
    assert entered["a"].wait(5)
    for name in "bcde":  # each asks after the one before it is surely waiting
        threads[name] = start(name)
        assert not entered[name].wait(0.1)
    for name in "abcde":
        assert entered[name].wait(5), f"{name} got its slot"
        assert not any(entered[later].is_set() for later in "abcde"[len(order) + 1 :]), "nobody overtook"
        order.append(name)
        go[name].set()
        threads[name].join(5)
    assert order == list("abcde") and len(out) == 5


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
    """Lower bounds only (a slow machine only sleeps longer): while frozen each piece waits TRICKLE_S;
    before and after, none waits at all."""
    monkeypatch.setattr(bulk_module, "PIECE", 1000)
    frozen = threading.Event()
    slots = BulkSlots(frozen.is_set)
    with slots.slot(None) as bulk:
        pieces = bulk.counted([b"x" * 5000, b"y" * 5000])
        first = next(pieces)
        assert len(first) == 1000 and bulk.paused == 0.0  # control: nothing frozen, it went at once
        frozen.set()
        slow = [next(pieces) for _ in range(3)]
        assert bulk.paused >= 3 * bulk_module.TRICKLE_S * 0.9, "frozen: a piece per TRICKLE_S, not nothing"
        frozen.clear()
        paused = bulk.paused
        rest = list(pieces)
    assert bulk.report["paused_s"] == round(paused, 4), "thawed: the rest went without waiting"
    assert b"".join([first, *slow, *rest]) == b"x" * 5000 + b"y" * 5000, "every byte, in order"
    assert bulk.report["bytes"] == 10000


def test_a_freeze_that_does_not_end_slows_a_round_only_so_long(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bulk_module, "PIECE", 1000)
    monkeypatch.setattr(bulk_module, "PAUSE_S", 0.3)
    slots = BulkSlots(lambda: True)  # a record nobody cleared: the round must still go on
    with slots.slot(None) as bulk:
        sent = list(bulk.counted([b"x" * 20000]))
    assert len(sent) == 20
    assert 0.25 <= bulk.report["paused_s"] < 1.5  # uncapped: about 2 s
