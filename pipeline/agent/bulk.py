"""How many pre-copy first rounds this source host streams at once, and what the link carried meanwhile.

A first round carries a container's whole memory. An evacuation names how many may stream together
(`streams` in each pre-copy request: runbooks/streams.py learns it); the others wait here, inside their
pre-copy call, with their connections open and their target's store reset, and start the moment a slot
frees: the link waits for no controller call and no handshake. Each round also measures the link:
every slot's bytes over its own time, how many streamed beside it on average, and how long it waited
for its socket to take the bytes (most of its time: the link, not the round, sets the pace).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any


class BulkSlots:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._width = 1  # the latest evacuation's
        self._active = 0
        self._sent = 0  # every slot's bytes, ever
        self._area = 0.0  # slots in use, integrated over time
        self._last = time.monotonic()

    @contextlib.contextmanager
    def slot(self, width: int | None) -> Iterator[Bulk]:
        """Wait until fewer than `width` slots stream, then hold one. `width` also becomes the limit for
        rounds waiting already (the latest request knows best). None (a migration of its own, not an
        evacuation's): hold one at once, and change no limit."""
        asked = time.monotonic()
        with self._cond:
            if width is not None:
                self._width = width
                self._cond.notify_all()
                self._cond.wait_for(lambda: self._active < self._width)
            self._tick()
            self._active += 1
            bulk = Bulk(self, time.monotonic(), self._sent, self._area, waited=time.monotonic() - asked)
        try:
            yield bulk
        finally:
            with self._cond:
                self._tick()
                self._active -= 1
                bulk.end(time.monotonic(), self._sent, self._area)
                self._cond.notify_all()

    def _count(self, n: int) -> None:
        with self._cond:
            self._sent += n

    def _tick(self) -> None:
        now = time.monotonic()
        self._area += (now - self._last) * self._active
        self._last = now


@dataclass
class Bulk:
    """One first round's slot: its own bytes, and what every slot sent while it held this one."""

    slots: BulkSlots
    start: float
    sent_at_start: int
    area_at_start: float
    waited: float
    bytes: int = 0
    sending: float = 0.0  # seconds its consumer spent sending (a full socket: the link is the limit)
    report: dict[str, Any] = field(default_factory=dict)

    def counted(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            self.bytes += len(chunk)
            self.slots._count(len(chunk))
            handed = time.monotonic()
            yield chunk
            self.sending += time.monotonic() - handed

    def end(self, now: float, sent: int, area: float) -> None:
        seconds = now - self.start
        self.report = {
            "seconds": round(seconds, 4),
            "bytes": self.bytes,
            "link_bytes": sent - self.sent_at_start,  # its own and every other slot's meanwhile
            "streams": round((area - self.area_at_start) / seconds, 3) if seconds > 0 else 1.0,
            "sending_s": round(self.sending, 4),
            "waited_s": round(self.waited, 4),
        }
