"""Process shapes CRIU cannot dump, found in the check stage while the container runs, before any freeze.

Each finding names the task and what it holds, with what to do: CRIU's own error comes only after the
freeze and says something like "send_fds failed (-22)" (an io_uring) or "zombie 23093 found while
seizing" (a traced task). Shapes that cannot arise in a skyferry container are not checked: a UNIX
socket cannot reach outside it (the netns is its own and no host directory is shared writable).
"""

import os
from dataclasses import dataclass
from pathlib import Path

from skyferry.pipeline import proctree


@dataclass(frozen=True)
class Finding:
    pid: int
    comm: str
    what: str
    hint: str

    def __str__(self) -> str:
        return f"{self.comm} (pid {self.pid}) {self.what}"


TRACED_HINT = "CRIU seizes every task with ptrace and cannot seize one that is traced: detach the debugger first"
IO_URING_HINT = "CRIU 4.2 cannot dump io_uring (it cannot pass its fd): stop the program or run it without io_uring"


def scan(root_pid: int) -> list[Finding]:
    """Every finding in the process tree of `root_pid` (the container's init)."""
    found: list[Finding] = []
    for pid in proctree.descendants(root_pid):
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            found += _traced(pid, comm) + _io_uring(pid, comm)
        except (FileNotFoundError, ProcessLookupError):
            continue  # it exited meanwhile
    return found


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
