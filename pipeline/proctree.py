"""A process tree from /proc, read one way for every package that needs it (agent, engines, memory, bench)."""

from pathlib import Path


def descendants(pid: int) -> list[int]:
    """`pid` and all its descendants, parents before children; processes that exit meanwhile are skipped."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop(0)
        try:
            kids = [
                int(c) for task in Path(f"/proc/{p}/task").iterdir() for c in (task / "children").read_text().split()
            ]
        except (FileNotFoundError, ProcessLookupError):
            continue
        found.append(p)
        todo += kids
    return found


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and its descendants: about what a full dump of them writes."""
    total = 0
    for p in descendants(pid):
        try:
            status = Path(f"/proc/{p}/status").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        total += next((int(ln.split()[1]) * 1024 for ln in status.splitlines() if ln.startswith("VmRSS:")), 0)
    return total


def stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name: [0] is the state (field 3), [19] the start time
    in clock ticks since boot (field 22). None once the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None


def stopped(pids: list[int]) -> list[int]:
    """Those of `pids` stopped by a signal (state T). CRIU cannot dump such a task inside a frozen cgroup
    (docs/reliability.md, "The freeze bound")."""
    return [pid for pid in pids if (fields := stat_fields(pid)) is not None and fields[0] == "T"]
