"""When to stop pre-copy rounds and freeze: a small pure object over the rounds' numbers.

Stop when the last delta is small enough to send inside the freeze budget, when memory is being
dirtied nearly as fast as the link can carry it (more rounds cannot shrink the delta), when the
delta grows, or at a round or time limit. P.Haul's rules are the model: <= 64 pages, > 10% growth,
8 rounds. With auto-converge (`throttle`), rounds that cannot keep up ask for a CPU throttle step
(reason `throttle`, QEMU's trigger: a delta at least half the one before) until it reaches its cap; a
completion timeout (`completion_seconds`) ends them whatever they do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

PAGE = 4096


@dataclass
class RoundStats:
    """What one stream carried. `started` is time.monotonic() when its scan began."""

    kind: str  # "round" or "final"
    seq: int
    started: float
    duration: float = 0.0
    processes: int = 0
    pages_scanned: int = 0  # pages read live (round) or found in the dump (final)
    pages_changed: int = 0  # pages the target did not have: sent as data or as zero runs
    pages_zero: int = 0  # of those, all-zero pages sent as runs without data
    pages_parent: int = 0  # final only: pages the target already has, marked in-parent
    bytes_raw: int = 0  # uncompressed page data in the stream
    bytes_out: int = 0  # the whole stream as sent
    bytes_files: int = 0  # final only: the non-page image files (soft-dirty: every image file, pages too)
    frozen_ms: float = 0.0  # soft-dirty only: how long CRIU froze the tasks to collect this round's pages

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Decision:
    stop: bool
    # continue | throttle | converged | not-converging | growing | completion-timeout | round-limit | time-limit
    reason: str
    detail: str


@dataclass(frozen=True)
class ConvergencePolicy:
    max_delta_bytes: int = 64 * PAGE  # a delta this small goes inside the freeze
    max_rounds: int = 8
    max_seconds: float = 300.0
    growth: float = 0.10  # stop when a delta is this much larger than the one before
    bandwidth: float | None = None  # bytes/s the link carries; None: round 1's throughput
    dirty_ratio: float = 0.8  # dirty rate / bandwidth at which rounds stop paying off
    throttle: bool = False  # auto-converge: throttle the container's CPU instead of stopping
    throttle_trigger: float = 0.5  # a step when a delta is >= this share of the one before (QEMU's 50%)
    throttle_cap: float = 0.99  # the last step (QEMU's maximum)
    completion_seconds: float | None = None  # stop after this long, converged or not

    def decide(self, rounds: Sequence[RoundStats], throttled: float = 0.0) -> Decision:
        """Whether to stop after the last of `rounds` (all kind "round", oldest first); `throttled` is the
        share of its CPU the container was denied while the last delta was dirtied (auto-converge)."""
        if not rounds:
            return Decision(False, "continue", "no round yet")
        last = rounds[-1]
        n = len(rounds)
        if last.bytes_out <= self.max_delta_bytes:
            return Decision(True, "converged", f"round {n} sent {last.bytes_out} B <= {self.max_delta_bytes} B")
        elapsed = last.started + last.duration - rounds[0].started
        if self.completion_seconds is not None and elapsed >= self.completion_seconds:
            return Decision(True, "completion-timeout", f"{elapsed:.1f} s of rounds >= {self.completion_seconds:g} s")
        if n >= 2:
            prev = rounds[-2]
            interval = max(last.started - prev.started, 1e-6)
            rate = last.bytes_out / interval
            # Round 1 moves all memory, so whatever limits it (link, compression, disk) is the pipeline's
            # throughput: the best estimate when nobody measured the link.
            bandwidth = self.bandwidth or rounds[0].bytes_out / max(rounds[0].duration, 1e-6)
            growing = last.bytes_out > (1 + self.growth) * prev.bytes_out
            # QEMU's trigger: what was dirtied during a round is at least half of what that round sent (here:
            # the delta did not halve), or at least half of what the streams move.
            halved = last.bytes_out < self.throttle_trigger * prev.bytes_out
            behind = not halved or rate >= self.throttle_trigger * bandwidth
            if self.throttle and throttled < self.throttle_cap and behind:
                why = f"memory changes at {rate / 1e6:.1f} MB/s, the streams move {bandwidth / 1e6:.1f} MB/s"
                return Decision(False, "throttle", why)
            capped = f" at a {throttled:.0%} CPU throttle" if throttled else ""
            if rate >= self.dirty_ratio * bandwidth:
                return Decision(
                    True,
                    "not-converging",
                    f"memory changes at {rate / 1e6:.1f} MB/s, >= {self.dirty_ratio:.0%} of the "
                    f"{bandwidth / 1e6:.1f} MB/s the streams move{capped}",
                )
            if growing:
                return Decision(
                    True, "growing", f"round {n} sent {last.bytes_out} B, more than {prev.bytes_out} B before{capped}"
                )
        # While the throttle can still step, its steps take the rounds: no round limit then (at the cap, yes).
        if n >= self.max_rounds and not 0 < throttled < self.throttle_cap:
            return Decision(True, "round-limit", f"{n} rounds")
        if elapsed >= self.max_seconds:
            return Decision(True, "time-limit", f"{elapsed:.1f} s of rounds")
        return Decision(False, "continue", f"round {n} sent {last.bytes_out} B")
