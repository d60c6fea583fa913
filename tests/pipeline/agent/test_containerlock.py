"""A container's lock on a host: its memory and file streams at once, operations alone."""

import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from kit.wait import eventually
from skyferry.pipeline.agent.containerlock import ContainerLock

Holder = Callable[[], AbstractContextManager[Any]]


def in_thread(take: Holder, log: list[str], label: str, hold: float = 0.0) -> threading.Thread:
    """A thread that takes `take()`, logs `label in`, holds it `hold` s, then logs `label out`."""

    def run() -> None:
        with take():
            log.append(f"{label} in")
            time.sleep(hold)
            log.append(f"{label} out")

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def overlapped(first: Holder, second: Holder) -> bool:
    """Whether `second` got in while `first` held on for 0.3 s."""
    log: list[str] = []
    threads = [in_thread(first, log, "first", hold=0.3)]
    while not log:
        time.sleep(0.01)
    threads.append(in_thread(second, log, "second"))
    for thread in threads:
        thread.join(5)
    return log.index("second in") < log.index("first out")


def test_memory_and_files_are_applied_at_once() -> None:
    lock = ContainerLock()
    assert overlapped(lambda: lock.stream("fs-round"), lambda: lock.stream("precopy-round"))
    assert overlapped(lambda: lock.stream("precopy-final"), lambda: lock.stream("fs-round"))


def test_two_streams_of_one_kind_take_turns() -> None:
    lock = ContainerLock()
    assert not overlapped(lambda: lock.stream("precopy-round"), lambda: lock.stream("precopy-final"))
    assert not overlapped(lambda: lock.stream("fs-round"), lambda: lock.stream("fs-round"))


def test_an_operation_runs_alone() -> None:
    lock = ContainerLock()
    assert not overlapped(lambda: lock.stream("fs-round"), lambda: lock)  # an abort waits for the stream
    assert not overlapped(lambda: lock, lambda: lock.stream("precopy-round"))
    assert not overlapped(lambda: lock, lambda: lock)


def test_a_waiting_operation_goes_before_later_streams() -> None:
    """A restore waiting for a round to end is not starved by a stream of the other kind that comes later."""
    lock = ContainerLock()
    log: list[str] = []
    release = threading.Event()

    def round_() -> None:
        with lock.stream("precopy-round"):
            log.append("round in")
            release.wait(5)
            log.append("round out")

    threads = [threading.Thread(target=round_)]
    threads[0].start()
    eventually("the round in", lambda: log == ["round in"], timeout=5, poll=0.005)
    threads.append(in_thread(lambda: lock, log, "restore", hold=0.1))
    # nothing public says the restore waits for the round
    eventually("the restore waiting", lambda: lock._waiting == 1, timeout=5, poll=0.005)
    threads.append(in_thread(lambda: lock.stream("fs-round"), log, "files"))
    time.sleep(0.05)  # a lock that let the files in would have by now
    release.set()
    for thread in threads:
        thread.join(5)
    assert log == ["round in", "round out", "restore in", "restore out", "files in", "files out"]
