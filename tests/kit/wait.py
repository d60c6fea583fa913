"""Waiting for what must happen: a generous deadline that fails the test naming what did not, never a
measurement (performance is the benchmarks' business)."""

import time
from collections.abc import Callable

DEADLINE_S = 180.0


def eventually(what: str, ok: Callable[[], object], timeout: float = DEADLINE_S, poll: float = 0.1) -> None:
    """Return once `ok()` is true; fail if it is not within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not ok():
        assert time.monotonic() < deadline, f"not within {timeout:.0f} s: {what}"
        time.sleep(poll)
