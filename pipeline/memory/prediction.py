"""Predict a migration's freeze, total time and bytes per mode from what its pre-copy rounds measured.

Pure arithmetic over the rounds' numbers, so the source's convergence policy (when to freeze and, in
auto mode, how to finish) and `skyferry migrate --estimate` share one model. A freeze is

    a fixed cost      pause, CRIU's and runc's own start-up, the agents' round trips, the cutover: per
                      host pair, learned from earlier migrations between them (the controller's
                      `freezecost` store), else DEFAULT_FIXED_MS
  + a cost per GiB    CRIU writing and reading every page, the freeze's hash of the dump (precopy) or
                      its scan beside the lazy dump (hybrid): PER_GIB_S
  + bytes / bandwidth what must cross inside the freeze, at the rate the rounds measured

The numbers below are this project's 2-core dev VM (README's bench, FIELD-NOTES 3b); a host pair's
learned fixed cost absorbs the difference at the sizes it has moved.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from skyferry.pipeline.hostapi.compat import NO_ROUNDS

GIB = 1 << 30
PAGE = 4096
MODES = ("stop-copy", "precopy", "hybrid", "postcopy")
EAGER_S = 0.1  # hybrid: changed pages that round 1's rate moves in this long go inside the freeze
LEAD_S = 0.1  # from the end of the last round to the dump: the controller's call, the pause
# A tiny service's freeze here is almost all fixed cost: about 150 ms in precopy since issue 16's cuts
# (README, `make demo`); a lazy dump, a lazy restore and the page server's start about 250 ms (what the
# bench's hybrid runs leave once their memory's share is taken out); stop-copy and post-copy run
# `runc checkpoint` and skip the final's hashing. A pair's own migrations replace these.
DEFAULT_FIXED_MS = {"stop-copy": 450.0, "precopy": 150.0, "hybrid": 250.0, "postcopy": 450.0}
# Seconds per GiB of memory inside the freeze. stop-copy: criu dump and restore of every page (0.55 s
# each, FIELD-NOTES 3b); precopy (content): the same dump, its hash (6 GB/s) and a restore through the
# parent image, slower than a plain one (bench: 2.6 s at 1 GiB); soft-dirty: CRIU writes only the delta
# but restores every page; hybrid: the freeze scan beside the lazy dump (bench: 643 ms at 256 MiB,
# 760 ms at 1 GiB); post-copy: no page is touched.
PER_GIB_S = {"stop-copy": 1.1, "precopy": 2.0, "precopy/soft-dirty": 1.4, "hybrid": 0.16, "postcopy": 0.0}


class Round(Protocol):
    """What the model reads of a round (policy.RoundStats)."""

    started: float
    duration: float
    pages_changed: int
    bytes_out: int


@dataclass(frozen=True)
class Measured:
    """What the rounds so far say about the container and the link."""

    memory_bytes: int  # pages round 1 found (it sends them all), raw
    memory_wire: int  # round 1's stream: the memory as it travels (compressed, zero pages elided)
    bandwidth: float  # bytes/s the streams carry
    dirty_rate: float | None  # wire bytes/s of memory that changes; None after one round (not seen yet)
    last_round_s: float  # how long the latest round took
    rounds_s: float  # from round 1's start to the end of the latest
    rounds_wire: int  # every round's stream
    files_wire: int = 0  # the first file round: the rootfs and volumes as they travel

    @classmethod
    def of(cls, rounds: Sequence[Round], bandwidth: float | None = None, files_wire: int = 0) -> Measured:
        first, last = rounds[0], rounds[-1]
        # Round 1 moves all memory, so whatever limits it (link, compression) is the pipeline's throughput.
        rate = bandwidth or first.bytes_out / max(first.duration, 1e-6)
        dirty = None
        if len(rounds) >= 2:
            dirty = last.bytes_out / max(last.started - rounds[-2].started, 1e-6)
        return cls(
            memory_bytes=first.pages_changed * PAGE,
            memory_wire=first.bytes_out,
            bandwidth=max(rate, 1.0),
            dirty_rate=dirty,
            last_round_s=last.duration,
            rounds_s=last.started + last.duration - first.started,
            rounds_wire=sum(r.bytes_out for r in rounds),
            files_wire=files_wire,
        )

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "delta_wire": self.delta_wire()}

    def delta_wire(self) -> int:
        """Memory that will have changed when the freeze dumps it, if it froze now: what changes during
        a round and the lead to the dump; after one round, all of it (the rate is not known yet)."""
        if self.dirty_rate is None:
            return self.memory_wire
        return min(self.memory_wire, int(self.dirty_rate * (self.last_round_s + LEAD_S)))


@dataclass(frozen=True)
class Prediction:
    mode: str
    freeze_ms: float
    fixed_ms: float  # of freeze_ms: the host pair's fixed cost
    floor_ms: float  # the freeze with nothing left to copy: what more rounds can never go below
    total_s: float  # the whole migration: rounds (measured so far), freeze, lazy phase
    bytes_wire: int  # every stream: rounds, what crosses inside the freeze, and lazily after it
    bytes_at_freeze: int
    lazy_bytes: int  # hybrid and post-copy: what the target fetches after the restore

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("freeze_ms", "fixed_ms", "floor_ms"):
            d[k] = round(d[k], 1)
        d["total_s"] = round(d["total_s"], 2)
        return d


def predict(mode: str, m: Measured, fixed_ms: Mapping[str, float], method: str = "content") -> Prediction:
    """`mode`'s freeze if the container froze now, and the whole migration's time and bytes; `method` is
    the pre-copy rounds' (soft-dirty: the dump writes only the delta)."""
    fixed = fixed_cost(mode, fixed_ms)
    gib = m.memory_bytes / GIB
    bw = m.bandwidth
    delta = m.delta_wire()
    per_gib = PER_GIB_S["precopy/soft-dirty" if mode == "precopy" and method == "soft-dirty" else mode]
    floor = fixed + per_gib * gib * 1000
    rounds_s, rounds_wire, lazy = m.rounds_s, m.rounds_wire, 0
    if mode == "stop-copy":  # no rounds: everything inside the freeze
        inside, rounds_s, rounds_wire = m.memory_wire + m.files_wire, 0.0, 0
    elif mode == "postcopy":  # no rounds, no page inside the freeze; every page raw afterwards
        inside, rounds_s, rounds_wire = m.files_wire, 0.0, 0
        lazy = m.memory_bytes
    elif mode == "hybrid":  # what the link moves in EAGER_S goes inside the freeze, the rest lazily
        inside = min(delta, int(bw * EAGER_S))
        lazy = delta - inside
    else:
        inside = delta
    freeze_ms = floor + inside / bw * 1000
    return Prediction(
        mode=mode,
        freeze_ms=freeze_ms,
        fixed_ms=fixed,
        floor_ms=floor + (inside / bw * 1000 if mode in NO_ROUNDS else 0.0),
        total_s=rounds_s + freeze_ms / 1000 + lazy / bw,
        bytes_wire=rounds_wire + inside + lazy,
        bytes_at_freeze=inside,
        lazy_bytes=lazy,
    )


def fixed_cost(mode: str, fixed_ms: Mapping[str, float]) -> float:
    """`mode`'s fixed cost between a pair: as measured, else the default scaled by how the pair's measured
    modes compare with theirs (a pair twice as slow in precopy is taken as twice as slow in hybrid, so a
    mode it has not run yet does not look faster for want of a measurement)."""
    if mode in fixed_ms:
        return fixed_ms[mode]
    seen = [fixed_ms[m] / DEFAULT_FIXED_MS[m] for m in fixed_ms if m in DEFAULT_FIXED_MS]
    return DEFAULT_FIXED_MS[mode] * (sum(seen) / len(seen) if seen else 1.0)


def predict_all(m: Measured, fixed_ms: Mapping[str, float], method: str = "content") -> dict[str, Prediction]:
    return {mode: predict(mode, m, fixed_ms, method) for mode in MODES}
