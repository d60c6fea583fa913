"""When to stop pre-copy rounds and freeze, and how to finish: a small pure object over the rounds' numbers.

With a downtime limit (`max_freeze_ms`, `--max-freeze`) the rounds stop as soon as a finish's predicted
freeze fits it (memory/prediction.py); when the rounds stop shrinking first, the decision says
`needs-throttle` (the hook for auto-converge). Without a limit, or when no finish could fit even with
nothing left to copy (the fixed costs alone exceed it), P.Haul's rules decide: stop when the last delta
is small enough, when memory is being dirtied nearly as fast as the link carries it (more rounds cannot
shrink the delta), when the delta grows (> 10%), or at a round or time limit (8 rounds).

With auto-converge (`throttle`), rounds that cannot keep up ask for a CPU throttle step instead of
stopping (reason `throttle`, QEMU's trigger: a delta at least half the one before) until the throttle is at
its cap. When no finish could fit the limit even with nothing to copy, a throttle can only shrink the
delta's share of the freeze, so it steps only while that share alone exceeds the limit: a bench run
throttled a 1 GiB service to 99% in nine steps for a hybrid freeze whose share is at most its eager pages
(376 ms predicted, 370 its floor), and its client waited 627 ms for one answer during the rounds. A
completion timeout (`completion_seconds`) ends the rounds whatever they do.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from skyferry.pipeline.memory.prediction import Measured, Prediction, predict_all

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
    # continue | throttle | fits | converged | completion-timeout | not-converging | growing | needs-throttle |
    # round-limit | time-limit
    reason: str
    detail: str
    finish: str = ""  # how the freeze ends: one of the policy's finishes
    finish_reason: str = ""  # why that one
    predicted: dict[str, dict[str, Any]] = field(default_factory=dict)  # per mode: Prediction.as_dict()
    measured: dict[str, Any] = field(default_factory=dict)  # what the predictions rest on: Measured.as_dict()


# The rounds stopped shrinking while a smaller delta would fit the limit: auto-converge's cue (slow the
# workload, then go on with rounds). Until something acts on it, the container freezes with `finish`.
NEEDS_THROTTLE = "needs-throttle"


@dataclass(frozen=True)
class ConvergencePolicy:
    max_delta_bytes: int = 64 * PAGE  # a delta this small goes inside the freeze
    max_rounds: int = 8
    max_seconds: float = 300.0
    growth: float = 0.10  # stop when a delta is this much larger than the one before
    bandwidth: float | None = None  # bytes/s the link carries; None: round 1's throughput
    dirty_ratio: float = 0.8  # dirty rate / bandwidth at which rounds stop paying off
    max_freeze_ms: float | None = None  # the downtime limit; None: the delta rules above alone
    finishes: Sequence[str] = ("precopy",)  # how the freeze may end, preferred first (auto: precopy, hybrid)
    fixed_ms: Mapping[str, float] = field(default_factory=dict)  # per mode, measured; else the model's defaults
    method: str = "content"  # the rounds' method (soft-dirty: the dump writes only the delta)
    min_rounds: int = 1  # --estimate: two, since one round cannot see how fast memory changes
    throttle: bool = False  # auto-converge: throttle the container's CPU instead of stopping
    throttle_trigger: float = 0.5  # a step when a delta is >= this share of the one before (QEMU's 50%)
    throttle_cap: float = 0.99  # the last step (QEMU's maximum)
    completion_seconds: float | None = None  # stop after this long, converged or not

    def decide(self, rounds: Sequence[RoundStats], files_wire: int = 0, throttled: float = 0.0) -> Decision:
        """Whether to stop after the last of `rounds` (all kind "round", oldest first), and which finish
        freezes shortest; `files_wire` is the first file round's stream (stop-copy carries it whole);
        `throttled` is the share of its CPU the container was denied while the last delta was dirtied."""
        if not rounds:
            return Decision(False, "continue", "no round yet")
        measured = Measured.of(rounds, self.bandwidth, files_wire)
        predicted = predict_all(measured, self.fixed_ms, self.method)
        finish, why = self._finish(predicted)
        stop, reason, detail = self._stop(rounds, predicted, throttled)
        return Decision(
            stop, reason, detail, finish, why, {k: p.as_dict() for k, p in predicted.items()}, measured.as_dict()
        )

    def _finish(self, predicted: Mapping[str, Prediction]) -> tuple[str, str]:
        """The first finish whose freeze fits the limit; else the shortest (the first of equals)."""
        if len(self.finishes) == 1:
            return self.finishes[0], "the mode asked for"
        ms = {f: predicted[f].freeze_ms for f in self.finishes}
        others = ", ".join(f"{f} {v:.0f} ms" for f, v in ms.items())
        limit = self.max_freeze_ms
        fitting = [f for f in self.finishes if limit is not None and ms[f] <= limit]
        if fitting:
            return fitting[0], f"predicted freeze fits --max-freeze {limit:.0f} ms ({others})"
        best = min(self.finishes, key=lambda f: ms[f])
        over = f"none fits --max-freeze {limit:.0f} ms; " if limit is not None else ""
        return best, f"{over}shortest predicted freeze ({others})"

    def _stop(
        self, rounds: Sequence[RoundStats], predicted: Mapping[str, Prediction], throttled: float
    ) -> tuple[bool, str, str]:
        n, limit = len(rounds), self.max_freeze_ms
        if n < self.min_rounds:
            return False, "continue", f"round {n} of at least {self.min_rounds}"
        candidates = [predicted[f] for f in self.finishes]
        best = min(candidates, key=lambda p: p.freeze_ms)
        floor = min(p.floor_ms for p in candidates)
        hopeless = limit is not None and floor > limit  # no delta, however small, makes a finish fit
        futile = hopeless and best.freeze_ms - best.floor_ms <= limit  # the delta's share is not worth a throttle
        stop, reason, detail = self._rounds_rule(rounds, throttled, throttle=self.throttle and not futile)
        if limit is None:
            return stop, reason, detail
        # A lazy finish's freeze fits early (what the link cannot move in EAGER_S waits for after the
        # restore), but while rounds still shrink the delta they shorten the phase the copy depends on
        # the source: so it stops at once only with nothing left for later.
        fitting = [p for p in candidates if p.freeze_ms <= limit and (stop or not p.lazy_bytes)]
        if fitting:
            p = fitting[0]
            later = f", {p.lazy_bytes} B after the restore ({reason}: {detail})" if p.lazy_bytes else ""
            return True, "fits", f"{p.mode} predicted {p.freeze_ms:.0f} ms <= --max-freeze {limit:.0f} ms{later}"
        if hopeless:  # more rounds (or a throttle) cannot help: P.Haul's rules alone
            return stop, reason, f"{detail}; no finish fits {limit:.0f} ms even with nothing to copy ({floor:.0f} ms)"
        # With a throttle: at its cap already. A lazy finish alone needs none: what the rounds cannot move
        # follows the restore (hybrid's rounds never throttle), so the rules name the stop.
        if reason in ("not-converging", "growing") and not self.throttle and "precopy" in self.finishes:
            return True, NEEDS_THROTTLE, (
                f"{detail}; {best.mode} predicted {best.freeze_ms:.0f} ms > --max-freeze {limit:.0f} ms "
                f"and the rounds no longer shrink it"
            )  # fmt: skip
        return stop, reason, detail

    def _rounds_rule(
        self, rounds: Sequence[RoundStats], throttled: float = 0.0, throttle: bool = False
    ) -> tuple[bool, str, str]:
        """P.Haul's rules over the deltas alone, with auto-converge's steps (`throttle`) and the completion
        timeout."""
        last = rounds[-1]
        n = len(rounds)
        if last.bytes_out <= self.max_delta_bytes:
            return True, "converged", f"round {n} sent {last.bytes_out} B <= {self.max_delta_bytes} B"
        elapsed = last.started + last.duration - rounds[0].started
        if self.completion_seconds is not None and elapsed >= self.completion_seconds:
            return True, "completion-timeout", f"{elapsed:.1f} s of rounds >= {self.completion_seconds:g} s"
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
            if throttle and throttled < self.throttle_cap and behind:
                return (
                    False,
                    "throttle",
                    f"memory changes at {rate / 1e6:.1f} MB/s, the streams move {bandwidth / 1e6:.1f} MB/s",
                )
            capped = f" at a {throttled:.0%} CPU throttle" if throttled else ""
            if rate >= self.dirty_ratio * bandwidth:
                return (
                    True,
                    "not-converging",
                    f"memory changes at {rate / 1e6:.1f} MB/s, >= {self.dirty_ratio:.0%} of the "
                    f"{bandwidth / 1e6:.1f} MB/s the streams move{capped}",
                )
            if growing:
                return (
                    True,
                    "growing",
                    f"round {n} sent {last.bytes_out} B, more than {prev.bytes_out} B before{capped}",
                )
        # While the throttle can still step, its steps take the rounds: no round limit then (at the cap, yes).
        if n >= self.max_rounds and not (throttle and 0 < throttled < self.throttle_cap):
            return True, "round-limit", f"{n} rounds"
        if elapsed >= self.max_seconds:
            return True, "time-limit", f"{elapsed:.1f} s of rounds"
        return False, "continue", f"round {n} sent {last.bytes_out} B"
