"""One container's lock on a host: one operation at a time, or its incoming streams side by side.

A migration's memory and files arrive on two connections at once (agent/source.py, the lanes). Applied
one after the other under one lock, the second waited unread: 3-5 s of round 1 for a JDK's rootfs,
with its sender stalled on a closed TCP window (whose clock Linux keeps, hostapi/client.py). Each kind
writes its own state (the memory store and images, or the payload's files), so they now run at once; an
operation (prepare, a restore, an abort) still runs alone, and waits for the streams under way.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

FILES = "fs-round"  # the one stream that writes the payload; every other one writes memory or images


class ContainerLock:
    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._streams: set[str] = set()  # the kinds being applied: "files", "memory"
        self._operating = False
        self._waiting = 0  # operations waiting: no new stream starts before them

    def __enter__(self) -> None:
        with self._changed:
            self._waiting += 1
            try:
                self._changed.wait_for(lambda: not self._operating and not self._streams)
            finally:
                self._waiting -= 1
            self._operating = True

    def __exit__(self, *exc: Any) -> None:
        with self._changed:
            self._operating = False
            self._changed.notify_all()

    @contextlib.contextmanager
    def stream(self, stream: str) -> Iterator[None]:
        """Around applying `stream`: beside a stream of the other kind, never beside an operation or
        another stream of its own kind (they share that kind's state)."""
        kind = "files" if stream == FILES else "memory"
        with self._changed:
            self._changed.wait_for(lambda: not self._operating and not self._waiting and kind not in self._streams)
            self._streams.add(kind)
        try:
            yield
        finally:
            with self._changed:
                self._streams.discard(kind)
                self._changed.notify_all()
