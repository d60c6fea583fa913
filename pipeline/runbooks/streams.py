"""How many of an evacuation's migrations stream their first pre-copy round (all their memory) at once.

`--parallel` migrations run at once; the source's agent holds each first round back until fewer than
`Streams.cap()` stream (agent/bulk.py), so the next one, connected and reset already, starts the moment
one ends. Modes without rounds (stop-copy, post-copy) move their memory inside or after the freeze and
are bounded by `--parallel` alone.

How many: more streams fill a link one stream cannot, but where one already fills it (here: the CPU
that encrypts it), more only share it, unfairly, and every freeze among them waits behind their queues.
Four at once on this machine: one 64 MiB stream took 10.5 s beside one that took 3.8 s, and freezes
reached 1.4 s; one at a time, each took about 2 s and no freeze passed 400 ms. So `Streams` climbs: it
starts with one, and compares the rate the link carried (every first round's bytes during each one, over
its time: the agent counts them) at the current number with the best at fewer. A step up that raised it
by less than GAIN is taken back; one that did is followed by another, up to `--parallel`, unless the
streams spent most of their time waiting for their sockets (the link, not the senders, is the limit) or
a known uplink (`--bandwidth`, or an emulated WAN's rate) is full already.
"""

from __future__ import annotations

from statistics import mean
from typing import Any

GAIN = 1.25  # one more stream must raise the link's rate by this much to stay (runs swing by 10 %)
FULL = 0.9  # of a known uplink: no further stream can add to it
BOUND = 0.5  # of a stream's time spent waiting for its socket: the link is the limit


class Streams:
    """The number of bulk streams at once, learned from what the link carried (`add`)."""

    def __init__(self, parallel: int, budget: int | None = None) -> None:
        self.parallel, self.budget = parallel, budget
        self.level = 1
        self.rates: dict[int, list[float]] = {}  # streams at once -> the link's rates seen (bits/s)
        self.sending: dict[int, list[float]] = {}  # streams at once -> the share of time spent sending
        self.fastest = 0.0  # the fastest one stream went (bits/s)

    def add(self, link: float, streams: float, own: float, sending: float = 0.0) -> None:
        """The link carried `link` bits/s while a stream went at `own` beside `streams` on average (itself
        included), spending the share `sending` of its time waiting for its socket."""
        k = max(1, int(streams + 0.5))
        self.rates.setdefault(k, []).append(link)
        self.sending.setdefault(k, []).append(sending)
        self.fastest = max(self.fastest, own)
        here = self.rate(self.level)
        if here is None:  # nothing measured at this level yet
            return
        fewer = max((mean(v) for j, v in self.rates.items() if j < self.level), default=None)
        if fewer is not None and here < GAIN * fewer:
            self.level -= 1  # the last stream added only shared the link
            return
        more = self.rate(self.level + 1)
        full = self.budget is not None and here >= FULL * self.budget
        bound = mean(self.sending[self.level]) >= BOUND
        if not (full or bound) and self.level < self.parallel and (more is None or more >= GAIN * here):
            self.level += 1

    def rate(self, streams: int) -> float | None:
        seen = self.rates.get(streams)
        return mean(seen) if seen else None

    def cap(self) -> int:
        """Streams at once now: the level, and with a known uplink no more than it holds at the fastest
        stream's rate (never fewer than one, nor more than `parallel`)."""
        cap = self.level
        if self.budget is not None and self.fastest:
            cap = min(cap, max(1, int(self.budget // self.fastest)))
        return min(cap, self.parallel)

    def as_dict(self) -> dict[str, Any]:
        return {
            "budget_bps": self.budget,
            "parallel": self.parallel,
            "cap": self.cap(),
            "fastest_stream_bps": round(self.fastest) or None,
            "link_bps": {str(k): round(mean(v)) for k, v in sorted(self.rates.items())},  # by streams at once
            "sending": {str(k): round(mean(v), 2) for k, v in sorted(self.sending.items())},
        }


def sample(report: dict[str, Any] | None) -> tuple[float, float, float, float] | None:
    """A finished migration's first round as `Streams.add` takes it: the link's rate, the streams beside
    it, its own rate (bits/s), its share of time sending; None without one."""
    report = report or {}
    bulk = report.get("bulk") or {}
    if report.get("state") != "done" or not bulk.get("seconds") or not bulk.get("bytes"):
        return None
    seconds = bulk["seconds"]
    sending = bulk.get("sending_s", 0.0) / seconds
    return bulk["link_bytes"] * 8 / seconds, bulk["streams"], bulk["bytes"] * 8 / seconds, sending
