"""What a freeze costs besides moving memory, per host pair and mode, learned from the migrations between them.

The source's policy predicts a freeze as a fixed cost, plus a cost per GiB of memory, plus the bytes
that cross inside it over the bandwidth the rounds measured (memory/prediction.py). The fixed part
(CRIU's and runc's start-up, pause, round trips, cutover) depends on the two hosts and cannot be seen
before a freeze. So after each migration with pre-copy rounds the controller takes the freeze it
measured, minus the variable part its prediction had, and keeps a running mean of the last few per
(source, target, mode). The policy uses its own defaults for a pair that has moved nothing yet.

One freeze counts for at most twice the mean so far: a `make bench` warm-up whose lazy dump wrote every
page (542 MB inside a 7 s freeze, 2026-12-05) raised the pair's hybrid cost from 220 ms to about 1.9 s, and
the next migration chose precopy, freezing 918 ms where hybrid froze 300-400. A pair that really got
slower still moves the mean up by a quarter per migration.
"""

import time
from pathlib import Path
from typing import Any

from skyferry.netplane import store
from skyferry.pipeline.controller import db

WINDOW = 4  # a running mean over about this many migrations: hosts change (load, upgrades), slowly
CLIP = 2.0  # one freeze counts for at most this many times the mean so far


def fixed_ms(state: Path, source: str, target: str) -> dict[str, float]:
    """The learned fixed cost (ms) per mode of a freeze from `source` to `target`; modes never seen are absent."""
    rows = db.connect(state).execute(
        "SELECT mode, fixed_ms FROM freeze_costs WHERE source=? AND target=?", (source, target)
    )
    return {r["mode"]: r["fixed_ms"] for r in rows}


def learn(state: Path, source: str, target: str, mode: str, freeze_ms: float, predicted: dict[str, Any]) -> float:
    """Fold one measured freeze into the pair's estimate; `predicted` is the policy's Prediction (as a dict)
    for the mode that ran. Returns the fixed cost this freeze showed (before clipping)."""
    observed = max(0.0, freeze_ms - (predicted["freeze_ms"] - predicted["fixed_ms"]))
    conn = db.connect(state)
    with store.immediate(conn):
        row = conn.execute(
            "SELECT fixed_ms, samples FROM freeze_costs WHERE source=? AND target=? AND mode=?", (source, target, mode)
        ).fetchone()
        samples = row["samples"] + 1 if row else 1
        if row:
            counted = min(observed, CLIP * row["fixed_ms"])
            mean = row["fixed_ms"] + (counted - row["fixed_ms"]) / min(samples, WINDOW)
        else:
            mean = observed
        conn.execute(
            "INSERT OR REPLACE INTO freeze_costs (source, target, mode, fixed_ms, samples, updated)"
            " VALUES (?,?,?,?,?,?)",
            (source, target, mode, mean, samples, time.time()),
        )
    return observed
