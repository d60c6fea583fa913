"""Fault injection for tests and drills: make a named step fail on purpose.

An agent fails step S when its host's state root holds a file `faults` with a line `S` (for example
`restore`). The controller crashes (exits 137) right after recording stage S when SKYFERRY_CRASH_AFTER=S.
Both are read at the moment of the step, so a running mesh can be drilled without restarts.
"""

import os
from collections.abc import Callable
from pathlib import Path

from skyferry.pipeline.errors import SkyferryError

CRASH_EXIT = 137


def check(state_root: Path, step: str) -> None:
    path = state_root / "faults"
    if path.exists() and step in path.read_text().split():
        raise SkyferryError(f"injected fault at {step!r}", hint=f"remove {path} to stop injecting")


def act(state_root: Path, step: str, action: Callable[[], None]) -> None:
    """Run `action` (the fault itself, e.g. killing a process) when step S is listed, as in check()."""
    path = state_root / "faults"
    if path.exists() and step in path.read_text().split():
        action()


def crash_point(stage: str) -> None:
    if os.environ.get("SKYFERRY_CRASH_AFTER") == stage:
        os._exit(CRASH_EXIT)
