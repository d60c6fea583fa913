"""How many pre-copy first rounds this source host streams at once, and what the link carried meanwhile.

A first round carries a container's whole memory. An evacuation names how many may stream together
(`streams` in each pre-copy request: runbooks/streams.py learns it); the others wait here, inside their
pre-copy call, with their connections open and their target's store reset, and start the moment a slot
frees, in the order they asked: the link waits for no controller call and no handshake, and no migration
waits while later ones overtake it (an 8-container evacuation had one wait 6.5 s for its turn while
others asked and went before it). Each round also measures the link:
every slot's bytes over its own time, how many streamed beside it on average, and how long it waited
for its socket to take the bytes (most of its time: the link, not the round, sets the pace).

A round yields to freezes: while a container of this host is frozen for a migration (another one's stop-
copy, final delta and restore, which its clients wait for), the round sends only a piece per TRICKLE_S, for
at most PAUSE_S at a time. At full rate, the freeze's CPU and its few packets queued behind the round:
freezes of 0.6-1.2 s in an evacuation whose rounds went over a warm connection, 0.2-0.4 s alone. Not
nothing: a connection idle for an RTO (0.2 s or more) starts TCP's window over when it sends again.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

PIECE = 256 << 10  # bytes a round hands on at once, so that it can slow down between them
TRICKLE_S = 0.1  # while frozen: a piece per this long (< TCP's idle limit, an RTO of at least 0.2 s)
PAUSE_S = 2.0  # the longest a round slows down for freezes at once: a freeze's own bound is longer
POLL_S = 0.005  # how often a slowed round looks again


class BulkSlots:
    def __init__(self, frozen: Callable[[], bool] = lambda: False) -> None:
        self.frozen = frozen  # whether a container of this host is frozen for a migration now
        self._cond = threading.Condition()
        self._width = 1  # the latest evacuation's
        self._active = 0
        self._tickets = 0  # turns handed out to rounds that wait
        self._turn = 0  # the turn that goes next
        self._sent = 0  # every slot's bytes, ever
        self._area = 0.0  # slots in use, integrated over time
        self._last = time.monotonic()

    @contextlib.contextmanager
    def slot(self, width: int | None) -> Iterator[Bulk]:
        """Wait until fewer than `width` slots stream and every round that asked before has its slot, then
        hold one. `width` also becomes the limit for rounds waiting already (the latest request knows best).
        None (a migration of its own, not an evacuation's): hold one at once, and change no limit."""
        asked = time.monotonic()
        with self._cond:
            if width is not None:
                self._width = width
                ticket, self._tickets = self._tickets, self._tickets + 1
                self._cond.notify_all()
                self._cond.wait_for(lambda: self._turn == ticket and self._active < self._width)
                self._turn += 1
                self._cond.notify_all()  # the next turn may fit beside this one
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

    def sent(self, n: int) -> None:
        """A slot's round handed `n` more bytes to its socket (every slot's add to what each one saw pass)."""
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
    paused: float = 0.0  # seconds it held back for freezes
    report: dict[str, Any] = field(default_factory=dict)
    _slow_since: float | None = None  # when the freezes it is slowing down for began

    def counted(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            for at in range(0, len(chunk), PIECE):
                piece = chunk[at : at + PIECE]
                self._yield_to_freezes()
                self.bytes += len(piece)
                self.slots.sent(len(piece))
                handed = time.monotonic()
                yield piece
                self.sending += time.monotonic() - handed

    def _yield_to_freezes(self) -> None:
        if not self.slots.frozen():
            self._slow_since = None
            return
        start = time.monotonic()
        self._slow_since = self._slow_since or start
        while self.slots.frozen() and time.monotonic() - start < TRICKLE_S and start - self._slow_since < PAUSE_S:
            time.sleep(POLL_S)
        self.paused += time.monotonic() - start

    def end(self, now: float, sent: int, area: float) -> None:
        seconds = now - self.start
        self.report = {
            "seconds": round(seconds, 4),
            "bytes": self.bytes,
            "link_bytes": sent - self.sent_at_start,  # its own and every other slot's meanwhile
            "streams": round((area - self.area_at_start) / seconds, 3) if seconds > 0 else 1.0,
            "sending_s": round(self.sending, 4),
            "waited_s": round(self.waited, 4),
            "paused_s": round(self.paused, 4),
        }
