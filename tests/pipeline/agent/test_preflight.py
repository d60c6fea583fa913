"""The check stage's scan for process shapes CRIU cannot dump, on real process trees."""

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from skyferry.pipeline.agent import preflight

# Each program forks a child, then does its thing in the child or to it, and sleeps.
PLAIN = "import os, time\nif os.fork() == 0:\n    time.sleep(60)\ntime.sleep(60)"
TRACED = (
    "import ctypes, os, time\nchild = os.fork()\nif child == 0:\n    time.sleep(60)\n"
    "assert ctypes.CDLL(None).ptrace(0x4206, child, None, None) == 0\nprint('ready', flush=True)\ntime.sleep(60)"
)
STOPPED = (
    "import os, signal, time\nchild = os.fork()\nif child == 0:\n    time.sleep(60)\n"
    "os.kill(child, signal.SIGSTOP)\nos.waitpid(child, os.WUNTRACED)\nprint('ready', flush=True)\ntime.sleep(60)"
)
IO_URING = (
    "import ctypes, os, time\nif os.fork() == 0:\n"
    "    assert ctypes.CDLL(None).syscall(425, 8, ctypes.create_string_buffer(120)) >= 0\n"
    "    print('ready', flush=True)\n    time.sleep(60)\ntime.sleep(60)"
)


@contextmanager
def tree(program: str) -> Iterator[int]:
    proc = subprocess.Popen([sys.executable, "-c", program], stdout=subprocess.PIPE, text=True)
    try:
        if "ready" in program:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        else:
            time.sleep(0.3)
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def test_a_plain_tree_has_no_findings() -> None:
    with tree(PLAIN) as pid:
        assert preflight.scan(pid) == []


def test_a_traced_task_is_found_with_its_tracer() -> None:
    with tree(TRACED) as pid:
        found = preflight.scan(pid)
    assert len(found) == 1 and found[0].what == f"is traced by pid {pid}", found
    assert found[0].pid != pid and "ptrace" in found[0].hint


def test_an_io_uring_is_found() -> None:
    with tree(IO_URING) as pid:
        found = preflight.scan(pid)
    assert len(found) == 1 and found[0].pid != pid, found
    assert "holds an io_uring instance" in str(found[0]) and "python" in str(found[0])


def test_a_stopped_task_is_found() -> None:
    """A SIGSTOPped task hangs CRIU's seize in a frozen cgroup (docs/reliability.md): found before the freeze."""
    with tree(STOPPED) as pid:
        found = preflight.scan(pid)
    assert len(found) == 1 and found[0].pid != pid and found[0].what.startswith("is stopped"), found
    assert "kill -CONT" in found[0].hint


OTHER_USER = (
    "import os, time\nif os.fork() == 0:\n    os.setgid(65534)\n    os.setuid(65534)\n    time.sleep(60)\n"
    "time.sleep(60)"
)


def test_another_users_task_is_found_only_where_criu_cannot_read_it() -> None:
    """Root without CAP_SYS_RESOURCE cannot prlimit(2) another user's task, so CRIU cannot dump it."""
    with tree(OTHER_USER) as pid:
        time.sleep(0.3)
        found = preflight.scan(pid, dumps_other_users=False)
        assert preflight.scan(pid, dumps_other_users=True) == []  # the control: a host whose root can
    assert len(found) == 1 and found[0].what == "runs as uid 65534 gid 65534" and "CAP_SYS_RESOURCE" in found[0].hint


# A tree in a pid namespace of its own, as a container's: one shell forking `sleep` 20 times a second or more,
# and one that forks nothing (its init waits on one long sleep).
FORKING = "while :; do sleep 0.05; done"
QUIET = "sleep 60"


@contextmanager
def in_pid_namespace(script: str) -> Iterator[int]:
    """`script` under sh as pid 1 of a new pid namespace; yields that sh's host pid."""
    proc = subprocess.Popen(["unshare", "--pid", "--fork", "--kill-child", "--", "sh", "-c", script])
    try:
        for _ in range(100):
            children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
            if children:
                break
            time.sleep(0.05)
        assert children, "unshare started no child"
        yield int(children[0])
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (a pid namespace, nsenter)")
def test_a_tree_that_forks_all_the_time_rules_out_the_lazy_modes_only() -> None:
    with in_pid_namespace(QUIET) as pid:
        quiet = preflight.fork_rate(pid)
        assert quiet is not None and quiet < 1, quiet  # the control: nothing forks in there
        assert preflight.forking(pid) == []
    with in_pid_namespace(FORKING) as pid:
        rate = preflight.fork_rate(pid)
        found = preflight.forking(pid)
    assert rate is not None and rate > preflight.FORKS_PER_S, rate
    assert len(found) == 1 and found[0].pid == pid and found[0].modes == ("hybrid", "postcopy"), found
    assert "forks" in found[0].what and "--mode precopy" in found[0].hint


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (a pid namespace, nsenter)")
def test_auto_counts_the_forks_from_the_check_s_mark_without_waiting_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check only marks the count (auto mode); the rounds count from that mark. Once the window has
    passed, the count is one more read, not another 0.5 s."""
    waits: list[float] = []

    class Clock:  # preflight's own view of time: what it sleeps is recorded, nobody else's
        monotonic = staticmethod(time.monotonic)

        @staticmethod
        def sleep(seconds: float) -> None:
            waits.append(seconds)
            time.sleep(seconds)

    monkeypatch.setattr(preflight, "time", Clock)
    with in_pid_namespace(QUIET) as pid:
        mark = preflight.fork_mark(pid)
        assert mark is not None
        time.sleep(preflight.FORK_WINDOW)
        quiet = preflight.fork_rate(pid, since=mark)
        assert quiet is not None and quiet < 1, quiet  # the control: our own reads are not counted
    with in_pid_namespace(FORKING) as pid:
        mark = preflight.fork_mark(pid)
        assert mark is not None
        time.sleep(preflight.FORK_WINDOW)
        waits.clear()
        found = preflight.forking(pid, since=mark)
    assert len(found) == 1 and found[0].modes == preflight.LAZY_MODES, found
    assert waits == [0.0], waits  # no second window
    with in_pid_namespace(QUIET) as pid:
        waits.clear()
        assert preflight.fork_rate(pid) is not None  # the positive control: without a mark it waits the window
    assert len(waits) == 1 and 0.4 < waits[0] <= preflight.FORK_WINDOW, waits
    assert preflight.ruled_out(found).startswith("hybrid and postcopy ruled out: ")


def test_a_tree_sharing_our_pid_namespace_is_not_measured() -> None:
    """The sysctl would count the whole host's forks: no rate rather than a wrong one."""
    with tree(PLAIN) as pid:
        assert preflight.fork_rate(pid) is None and preflight.forking(pid) == []
