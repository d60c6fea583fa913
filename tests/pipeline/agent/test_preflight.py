"""The check stage's scan for process shapes CRIU cannot dump, on real process trees."""

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from skyferry.pipeline.agent import preflight

# Each program forks a child, then does its thing in the child or to it, and sleeps.
PLAIN = "import os, time\nif os.fork() == 0:\n    time.sleep(60)\ntime.sleep(60)"
TRACED = (
    "import ctypes, os, time\nchild = os.fork()\nif child == 0:\n    time.sleep(60)\n"
    "assert ctypes.CDLL(None).ptrace(0x4206, child, None, None) == 0\nprint('ready', flush=True)\ntime.sleep(60)"
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
