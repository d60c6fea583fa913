"""The guard of a lazy restore, on real userfaultfds: why it exists and that it works.

A "task" registers a page range with a userfaultfd (MISSING mode), as CRIU's restorer does, and hands it
to a "daemon" stand-in (which takes it with pidfd_getfd, as CRIU's daemon receives it), then closes its
own copy. When the daemon dies:
- unguarded, the kernel releases the uffd and the task reads a zero page where its data should be (the
  silent corruption of issue 15, shown here as the positive control);
- under the guard (pipeline/memory/lazyguard.py), the task's fault blocks, and the guard kills it before
  letting go: it never reads a byte.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="pidfd_getfd of another process needs root here")

UFFD = r"""
import ctypes, fcntl, mmap, os, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
"""
TASK = (
    UFFD
    + r"""
fd = libc.syscall(323, os.O_CLOEXEC)  # userfaultfd(2), x86_64
api = bytearray(struct.pack("QQQ", 0xAA, 0, 0)); fcntl.ioctl(fd, 0xC018AA3F, api)  # UFFDIO_API
m = mmap.mmap(-1, 4096)
reg = bytearray(struct.pack("QQQQ", ctypes.addressof(ctypes.c_char.from_buffer(m)), 4096, 1, 0))
fcntl.ioctl(fd, 0xC020AA00, reg)  # UFFDIO_REGISTER, MODE_MISSING: the page has not arrived
print(fd, flush=True)
sys.stdin.readline(); os.close(fd); print("closed", flush=True)  # the daemon holds it now
sys.stdin.readline(); print(m[:8].hex(), flush=True)  # touch the missing page
"""
)
DAEMON = (
    UFFD
    + r"""
pidfd = os.pidfd_open(int(sys.argv[1]))
fd = libc.syscall(438, pidfd, int(sys.argv[2]), 0)  # pidfd_getfd: what CRIU's daemon gets over its socket
assert fd >= 0, ctypes.get_errno()
print("holding", flush=True)
import time; time.sleep(3600)
"""
)


def _spawn(code: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", code, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, start_new_session=True)  # fmt: skip


def _say(proc: subprocess.Popen[str], line: str = "go") -> None:
    assert proc.stdin is not None
    proc.stdin.write(line + "\n")
    proc.stdin.flush()


def _hear(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    return proc.stdout.readline().strip()


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    try:
        yield started
    finally:
        for p in started:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def _task_and_daemon(procs: list, daemon_argv_prefix: list[str]) -> tuple[subprocess.Popen[str], subprocess.Popen]:
    task = _spawn(TASK)
    procs.append(task)
    fd = _hear(task)
    argv = [*daemon_argv_prefix, sys.executable, "-c", DAEMON, str(task.pid), fd]
    daemon = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)
    procs.append(daemon)
    return task, daemon


def _blocked_in_fault(pid: int) -> bool:
    return "userfault" in Path(f"/proc/{pid}/wchan").read_text()


def test_unguarded_a_dead_daemon_leaves_zeros(procs: list) -> None:
    """The hazard (and the control for the next test): the page never arrived, yet it reads as zeros."""
    task, daemon = _task_and_daemon(procs, [])
    assert _hear(daemon) == "holding"
    _say(task)
    assert _hear(task) == "closed"
    os.killpg(daemon.pid, signal.SIGKILL)
    daemon.wait()
    _say(task)
    assert _hear(task) == "00" * 8, "a missing page read as zeros: the copy runs on, corrupt"


def test_guarded_a_dead_daemon_kills_the_task_before_it_reads(procs: list) -> None:
    task, guard = _task_and_daemon(procs, [sys.executable, "-m", "skyferry.pipeline.memory.lazyguard", "--"])
    _wait(lambda: _uffds_of_children(guard.pid) == 1)  # the daemon stand-in (the guard's child) has it
    _say(task)  # so the task drops its own
    assert _hear(task) == "closed"
    _say(guard, json.dumps({"kill": ["kill", "-KILL", str(task.pid)]}))  # the restore is done
    assert json.loads(_hear(guard)) == {"held": 1, "error": None}
    _say(task)  # touch the missing page: it blocks, since the guard holds the uffd
    _wait(lambda: _blocked_in_fault(task.pid))
    daemon = _children(guard.pid)[0]
    os.kill(daemon, signal.SIGKILL)  # the daemon dies (its agent and proxy are gone)
    assert guard.wait() == 128 + signal.SIGKILL
    assert task.wait() == -signal.SIGKILL, "the guard killed the task"
    assert task.stdout is not None and task.stdout.read() == "", "the task never read the missing page"


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _uffds_of_children(pid: int) -> int:
    count = 0
    for child in _children(pid):
        for fd in Path(f"/proc/{child}/fd").iterdir():
            with contextlib.suppress(OSError):
                count += os.readlink(fd) == "anon_inode:[userfaultfd]"
    return count


def _wait(check: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "gave up waiting"
        time.sleep(0.02)
