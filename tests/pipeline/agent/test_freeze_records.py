"""The source's freeze records (pipeline/agent/freeze.py): the bound counts from the first pause, an expired
freeze refuses the migration's later steps, and the watchdog ends exactly the freezes past their deadline."""

import threading
import time
from pathlib import Path

import pytest
from skyferry.pipeline.agent.freeze import Freeze, Freezes, Watchdog
from skyferry.pipeline.errors import SkyferryError


def test_a_repeated_checkpoint_keeps_the_first_deadline(tmp_path: Path) -> None:
    freezes = Freezes(tmp_path)
    first = freezes.arm("m1", "web", "checkpoint", 30, "10.0.0.2:7420")
    again = freezes.arm("m1", "web", "checkpoint", 300, "10.0.0.2:7420")
    assert again == first and freezes.get("m1") == first


def test_an_expired_freeze_refuses_the_migration_until_it_is_forgotten(tmp_path: Path) -> None:
    freezes = Freezes(tmp_path)
    record = freezes.arm("m1", "web", "checkpoint", 3)
    freezes.check("m1")  # control: a live freeze refuses nothing
    freezes.mark_expired(record, "thawed by the watchdog")
    for step in (lambda: freezes.check("m1"), lambda: freezes.arm("m1", "web", "checkpoint", 3)):
        with pytest.raises(SkyferryError, match=r"the freeze bound \(3 s\) was hit: thawed by the watchdog"):
            step()
    freezes.forget("m1")  # a rollback
    freezes.check("m1")


def test_check_reads_no_file_inside_the_freeze_and_a_new_agent_knows_what_expired(tmp_path: Path) -> None:
    freezes = Freezes(tmp_path)
    freezes.arm("live", "web", "checkpoint", 3)
    record = freezes.arm("done", "db", "checkpoint", 3)
    freezes.mark_expired(record, "thawed by the watchdog")
    live = tmp_path / "freezes" / "live.json"
    live.unlink()
    live.mkdir()  # a record that cannot be read: any read inside check would raise
    with pytest.raises(IsADirectoryError):
        freezes.get("live")  # control
    freezes.check("live")
    live.rmdir()
    restarted = Freezes(tmp_path)  # an agent that restarts reads the expired records once
    with pytest.raises(SkyferryError, match=r"the freeze bound \(3 s\) was hit: thawed by the watchdog"):
        restarted.check("done")


def test_frozen_says_whether_clients_wait_on_a_freeze_here(tmp_path: Path) -> None:
    """What a bulk round yields to (agent/bulk.py): from the pause until the copy runs on the target."""
    freezes = Freezes(tmp_path)
    assert not freezes.frozen()  # control
    freezes.arm("m1", "web", "checkpoint", 30)
    freezes.arm("m2", "db", "pre-dump", 30)
    assert freezes.frozen()
    freezes.forget("m2")  # the pre-dump's own freeze ended
    assert freezes.frozen()
    freezes.restored("m1")  # the target's copy runs: the record stays until confirm, the wait is over
    assert not freezes.frozen() and freezes.get("m1") is not None
    lazy = freezes.arm("m3", "web", "checkpoint", 30, lazy=True)
    freezes.serve(lazy, 60)  # a lazy copy runs on the target and fetches pages from the frozen one
    assert not freezes.frozen()
    expired = freezes.arm("m4", "db", "checkpoint", 30)
    freezes.mark_expired(expired, "thawed by the watchdog")
    assert not freezes.frozen()


def test_the_watchdog_ends_only_freezes_past_their_deadline(tmp_path: Path) -> None:
    freezes = Freezes(tmp_path)
    freezes.arm("due", "web", "checkpoint", 0.2)
    freezes.arm("later", "db", "checkpoint", 3600)
    ended: list[str] = []
    done = threading.Event()

    def expire(record: Freeze) -> None:
        ended.append(record.mig)
        freezes.mark_expired(record, "test")
        done.set()

    Watchdog(freezes, expire).start()
    assert done.wait(60)
    time.sleep(1)  # two more ticks: an expired record is not ended again, a live one not early
    assert ended == ["due"]


def test_a_lazy_checkpoint_whose_copy_went_live_is_watched_on_while_it_serves(tmp_path: Path) -> None:
    """Past the freeze bound with the target's copy live, a lazy checkpoint's record turns "serving" with a
    new deadline; it refuses no step meanwhile (the lazy phase and confirm go on), and a repeated
    checkpoint keeps it."""
    freezes = Freezes(tmp_path)
    record = freezes.arm("m1", "web", "checkpoint", 3, "10.0.0.2:7420", lazy=True)
    assert record.lazy and record.phase == "checkpoint"
    freezes.serve(record, 1020)
    serving = freezes.get("m1")
    assert serving is not None and serving.phase == "serving" and serving.bound == 1020 and serving.lazy
    assert serving.since == record.since and serving.deadline > time.time() + 1000
    freezes.check("m1")
    assert freezes.arm("m1", "web", "checkpoint", 3, "10.0.0.2:7420", lazy=True) == serving
