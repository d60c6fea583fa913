"""The engine processes a step is waiting on, per container, recorded on disk: what a freeze watchdog may
kill, and nothing else.

A `runc checkpoint` whose CRIU hangs (a stopped task inside the frozen cgroup waits forever in
`ptrace_attach`) keeps the container frozen for as long as it runs. Each such child is started in its own
session, so its process group is exactly what we started (runc and the CRIU it spawned), and listed in
`<dir>/<container>/<pgid>` with its start time while the step waits on it. An agent that restarts finds
the list of the one that died, and the start time keeps a recycled PID from being mistaken for ours.
"""

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

from skyferry.pipeline import proctree
from skyferry.pipeline.runtimes.freezer import CGROUP, thaw


class Children:
    def __init__(self, directory: Path) -> None:
        self.dir = directory

    @contextlib.contextmanager
    def waiting_on(self, name: str, pid: int) -> Iterator[None]:
        """Record `pid` (a session leader we started) as container `name`'s while the block runs."""
        entry = self.dir / name / str(pid)
        entry.parent.mkdir(parents=True, exist_ok=True)
        entry.write_text(_start_time(pid) or "")
        try:
            yield
        finally:
            entry.unlink(missing_ok=True)

    def started(self, name: str) -> list[int]:
        """The process groups recorded for `name` that still run; entries of processes gone are dropped
        (a recycled PID has another start time, so it is never taken for ours)."""
        ours = []
        for entry in sorted((self.dir / name).glob("*")):
            pid = int(entry.name)
            started = entry.read_text()
            if started and _start_time(pid) == started:
                ours.append(pid)
            else:
                entry.unlink(missing_ok=True)
        return ours


def kill_groups(pgids: list[int]) -> None:
    """SIGKILL each process group (runc and the CRIU it runs): CRIU detaches from the tasks it seized."""
    for pgid in pgids:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)


def kill_cgroup(rel: str) -> list[int]:
    """SIGKILL every task in cgroup `rel` (relative to the hierarchy's root), then thaw it so the kills land
    (a frozen task holds a SIGKILL pending, and dies before it runs again, so none can fork in between).
    Returns the PIDs killed. What runc no longer knows may still be there: the root task of a restore
    killed part-way (CRIU's, PID 1 of the new pid namespace), or a lazily restored copy whose page source
    was lost."""
    rel = rel.strip("/")
    v1 = not (CGROUP / "cgroup.controllers").exists()
    procs_file = (CGROUP / "pids" / rel if v1 else CGROUP / rel) / "cgroup.procs"
    killed: list[int] = []
    for _ in range(10):  # a cgroup that was not frozen may fork between the read and the kill
        try:
            procs = [int(p) for p in procs_file.read_text().split()]
        except OSError:
            procs = []
        for pid in procs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        killed += [p for p in procs if p not in killed]
        with contextlib.suppress(OSError):
            thaw(rel)
        if not procs:
            break
        time.sleep(0.05)
    return killed


def _start_time(pid: int) -> str | None:
    """Its start time in clock ticks since boot; None once it is gone."""
    fields = proctree.stat_fields(pid)
    return fields[19] if fields is not None else None
