"""Process shapes CRIU cannot dump, found in the check stage while the container runs, before any freeze.

Each finding names the task and what it holds, with what to do: CRIU's own error comes only after the
freeze and says something like "send_fds failed (-22)" (an io_uring) or "zombie 23093 found while
seizing" (a traced task). Shapes that cannot arise in a skyferry container are not checked: a UNIX
socket cannot reach outside it (the netns is its own and no host directory is shared writable).
"""

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from skyferry.pipeline import proctree


@dataclass(frozen=True)
class Finding:
    pid: int
    comm: str
    what: str
    hint: str
    # The modes this shape rules out; empty: every mode (the checkpoint itself would fail).
    modes: tuple[str, ...] = ()

    def __str__(self) -> str:
        return f"{self.comm} (pid {self.pid}) {self.what}"


TRACED_HINT = "CRIU seizes every task with ptrace and cannot seize one that is traced: detach the debugger first"
# runc has CRIU freeze through the cgroup freezer, and CRIU's PTRACE_SEIZE of a stopped task in a frozen
# cgroup waits forever in ptrace_attach (checkpoint-restore/criu#1905): the freeze bound would end it.
STOPPED_HINT = "CRIU cannot checkpoint a stopped task in a frozen container: continue it (kill -CONT PID) or end it"
IO_URING_HINT = "CRIU 4.2 cannot dump io_uring (it cannot pass its fd): stop the program or run it without io_uring"
# A lazily restored process that forks hands every child's address space to CRIU's lazy-pages daemon,
# which fills each one: a tree forking all the time can keep the lazy phase from ever ending (a shell
# pipeline at ~23 forks/s: 13 215 children in 582 s; docs/compatibility.md). Measured over FORK_WINDOW s.
LAZY_MODES = ("hybrid", "postcopy")
FORKS_PER_S = 10.0
FORK_WINDOW = 0.5
MARK_MAX_AGE = 60.0  # a mark older than this (a migration resumed much later) would average a burst away
NS_LAST_PID = "/proc/sys/kernel/ns_last_pid"
FORKS_HINT = (
    "after a lazy restore every forked child's memory is filled by CRIU's lazy-pages daemon, so a tree that "
    "forks all the time may never finish the lazy phase: use --mode precopy or stop-copy"
)
OTHER_USER_HINT = (
    "CRIU reads each task's rlimits with prlimit(2), which for another user's task needs CAP_SYS_RESOURCE, and "
    "root on this host lacks it (skyferry doctor): run the program as root in the container, or move it from "
    "a host whose root has it (real machines and VMs do)"
)


def scan(root_pid: int, dumps_other_users: bool = True) -> list[Finding]:
    """Every finding in the process tree of `root_pid` (the container's init). `dumps_other_users`: whether
    CRIU here may read another user's tasks (facts.dumps_other_users)."""
    found: list[Finding] = []
    for pid in proctree.descendants(root_pid):
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            found += _stopped(pid, comm) + _traced(pid, comm) + _io_uring(pid, comm)
            found += [] if dumps_other_users else _other_user(pid, comm)
        except (FileNotFoundError, ProcessLookupError):
            continue  # it exited meanwhile
    return found


@dataclass(frozen=True)
class ForkMark:
    """One read of a pid namespace's `ns_last_pid`, and when (this agent's time.monotonic())."""

    last_pid: int
    at: float


def fork_mark(root_pid: int) -> ForkMark | None:
    """The last pid the pid namespace of `root_pid` (the container's init) handed out, read by a `cat` that
    `nsenter` starts inside that namespace (the sysctl answers for the reader's namespace, so a read from
    here would count the whole host). None when it cannot be read (no pid namespace of its own, the task
    gone, no nsenter)."""
    try:
        if os.readlink(f"/proc/{root_pid}/ns/pid") == os.readlink("/proc/self/ns/pid"):
            return None
        done = subprocess.run(["nsenter", "--target", str(root_pid), "--pid", "--", "cat", NS_LAST_PID],
                              capture_output=True, text=True, timeout=10)  # fmt: skip
        at = time.monotonic()
        return ForkMark(int(done.stdout), at) if done.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, ValueError):  # it exited meanwhile; no nsenter here
        return None


def fork_rate(root_pid: int, since: ForkMark | None = None, window: float = FORK_WINDOW) -> float | None:
    """New pids per second in the pid namespace of `root_pid`: forks, and threads, which take pids too.
    Counted from `since` (a mark taken earlier, as the check stage does for auto mode's rounds, if at most
    MARK_MAX_AGE old), else from a mark taken now; waits until `window` s have passed since it. Each
    read's own `cat` takes a pid: the second one is not counted. None when it cannot be measured."""
    fresh = since is not None and time.monotonic() - since.at < MARK_MAX_AGE
    first = since if fresh else fork_mark(root_pid)
    if first is None:
        return None
    time.sleep(max(0.0, first.at + window - time.monotonic()))
    last = fork_mark(root_pid)
    if last is None or last.at <= first.at:
        return None
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    new = (last.last_pid - first.last_pid) % pid_max  # pids wrap around at pid_max
    return max(new - 1, 0) / (last.at - first.at)


def forking(root_pid: int, since: ForkMark | None = None, limit: float = FORKS_PER_S) -> list[Finding]:
    """A finding that rules out the lazy modes when the tree forks faster than `limit` per second (counted
    from `since`, else over the next FORK_WINDOW s)."""
    rate = fork_rate(root_pid, since)
    if rate is None or rate <= limit:
        return []
    comm = Path(f"/proc/{root_pid}/comm").read_text().strip()
    what = f"forks {rate:.0f} times a second, counting its children (the lazy modes take up to {limit:g})"
    return [Finding(root_pid, comm, what, FORKS_HINT, LAZY_MODES)]


def ruled_out(found: list[Finding]) -> str:
    """What the rounds' report says when a tree's forks took the lazy finishes away (as the check says it)."""
    return f"{' and '.join(LAZY_MODES)} ruled out: {found[0]}"


def _stopped(pid: int, comm: str) -> list[Finding]:
    stopped = proctree.stopped([pid])
    return [Finding(pid, comm, "is stopped (state T: SIGSTOP or SIGTSTP)", STOPPED_HINT)] if stopped else []


def _traced(pid: int, comm: str) -> list[Finding]:
    status = Path(f"/proc/{pid}/status").read_text()
    tracer = next((int(ln.split()[1]) for ln in status.splitlines() if ln.startswith("TracerPid:")), 0)
    return [Finding(pid, comm, f"is traced by pid {tracer}", TRACED_HINT)] if tracer else []


def _io_uring(pid: int, comm: str) -> list[Finding]:
    fds = Path(f"/proc/{pid}/fd")
    for fd in fds.iterdir():
        try:
            if os.readlink(fd) == "anon_inode:[io_uring]":
                return [Finding(pid, comm, f"holds an io_uring instance (fd {fd.name})", IO_URING_HINT)]
        except FileNotFoundError:
            continue
    return []


def _other_user(pid: int, comm: str) -> list[Finding]:
    """A task whose uids or gids are not all root's (PostgreSQL's postgres, nginx's www-data workers)."""
    ids = {ln.split(":")[0]: ln.split()[1:] for ln in Path(f"/proc/{pid}/status").read_text().splitlines()
           if ln.startswith(("Uid:", "Gid:"))}  # fmt: skip
    if set(ids["Uid"]) | set(ids["Gid"]) == {"0"}:
        return []
    return [Finding(pid, comm, f"runs as uid {ids['Uid'][1]} gid {ids['Gid'][1]}", OTHER_USER_HINT)]
