"""Fault injection for tests and drills: make a named step fail on purpose.

An agent fails step S when its host's state root holds a file `faults` with a line `S` (a migration
step such as `restore`; `peers`, a route push to this member; `facts`, what a check reads of it). The
controller crashes (exits 137) right after recording stage S when SKYFERRY_CRASH_AFTER=S, and SECONDS
into stage S, its call to an agent under way, when SKYFERRY_CRASH_DURING=S:SECONDS.
Both are read at the moment of the step, so a running mesh can be drilled without restarts.
A listed `stop-task:checkpoint` makes the source agent SIGSTOP the container's last task right before
the pause: CRIU then hangs, as with a workload that stops a child (the freeze bound's drill). A listed
`stop-engine:restore` makes the target agent SIGSTOP its restore (runc and its CRIU) as soon as it
starts, as a hung runc or CRIU would.

One-shot kinds, each consumed (its line removed) when it fires:
  die:S       the agent kills itself (SIGKILL) on reaching step S, mid-request, as a crash would
  corrupt:S   the agent flips one byte of the stream S it sends (`receive`, `precopy-round`,
              `precopy-final`, `fs-round`) after its checksums were computed, as a bad link or NIC would
  stall:S     the agent holds step S, or reads nothing of the stream S it receives, for STALL_S, as when
              a file round holds the container's lock meanwhile: the sender waits on a closed window
"""

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from skyferry.pipeline.errors import SkyferryError

CRASH_EXIT = 137
STALL_S = 1.0


def check(state_root: Path, step: str) -> None:
    path = state_root / "faults"
    if _consume(path, f"die:{step}"):
        os.kill(os.getpid(), signal.SIGKILL)
    if _consume(path, f"stall:{step}"):
        time.sleep(STALL_S)
    if path.exists() and step in path.read_text().split():
        raise SkyferryError(f"injected fault at {step!r}", hint=f"remove {path} to stop injecting")


def listed(state_root: Path, step: str) -> bool:
    """True while step S is listed (a drill that lasts, e.g. `hold-pages`: after a lazy restore, the
    target's page proxy hands no page to the daemon and fetches none from the source while it is listed,
    which keeps a post-copy migration in its lazy phase with its pages outstanding)."""
    path = state_root / "faults"
    return path.exists() and step in path.read_text().split()


def act(state_root: Path, step: str, action: Callable[[], None]) -> None:
    """Run `action` (the fault itself, e.g. killing a process) when step S is listed, as in check()."""
    path = state_root / "faults"
    if path.exists() and step in path.read_text().split():
        action()


def corrupt(state_root: Path, stream_path: str, chunks: Iterable[bytes]) -> Iterable[bytes]:
    """`chunks` as sent to PUT `stream_path` (/v1/migrations/ID/STREAM?...), with one byte flipped when
    `corrupt:STREAM` is listed: the middle byte of the first chunk of at least 64 bytes."""
    stream = stream_path.split("?")[0].rsplit("/", 1)[-1]
    if not _consume(state_root / "faults", f"corrupt:{stream}"):
        return chunks
    return _flip_one(chunks)


def _flip_one(chunks: Iterable[bytes]) -> Iterator[bytes]:
    flipped = False
    for chunk in chunks:
        if not flipped and len(chunk) >= 64:
            damaged = bytearray(chunk)
            damaged[len(damaged) // 2] ^= 0xFF
            chunk, flipped = bytes(damaged), True
        yield chunk


def _consume(path: Path, line: str) -> bool:
    """True (and the line removed) if `line` is listed in the faults file."""
    if not path.exists():
        return False
    lines = path.read_text().split()
    if line not in lines:
        return False
    lines.remove(line)
    path.write_text("".join(f"{x}\n" for x in lines))
    return True


def crash_point(stage: str) -> None:
    if os.environ.get("SKYFERRY_CRASH_AFTER") == stage:
        os._exit(CRASH_EXIT)


@contextlib.contextmanager
def crash_during(stage: str) -> Iterator[None]:
    """Around stage S: with SKYFERRY_CRASH_DURING=S:SECONDS the controller exits that long into it, as one
    killed mid-stage would, its agents still working for it (a stage that ends first cancels the crash)."""
    name, _, after = os.environ.get("SKYFERRY_CRASH_DURING", "").partition(":")
    if name != stage:
        yield
        return
    timer = threading.Timer(float(after or 0), os._exit, (CRASH_EXIT,))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
