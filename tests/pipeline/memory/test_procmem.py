"""MemReader.map over a real process: every page in address order though two threads read, errors and
early stops reach the caller, and no reader thread outlives the iteration."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator

import numpy as np
import pytest
from skyferry.pipeline.memory.procmem import CHUNK_PAGES, LOOKAHEAD, PAGE, MemReader

PAGES = 5 * CHUNK_PAGES + 100  # several chunks, the last one short

# Each page of a fresh buffer starts with a marker and its own index.
CHILD = f"""
import mmap, struct, sys
m = mmap.mmap(-1, {PAGES} * {PAGE}, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # private: CRIU dumps these
for i in range({PAGES}):
    m[i * {PAGE} : i * {PAGE} + 16] = struct.pack("<QQ", 0x5EEDF00D, i)
print("ready", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def child() -> Iterator[subprocess.Popen[str]]:
    p = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    p.stdout.readline()  # the buffer is written
    try:
        yield p
    finally:
        p.kill()
        p.wait()


def markers(vpns: np.ndarray, pages: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    words = pages[:, :16].copy().view("<u8")
    return vpns.copy(), words[words[:, 0] == 0x5EEDF00D, 1]


def test_map_yields_every_page_in_address_order(child: subprocess.Popen[str]) -> None:
    before = threading.active_count()
    got = list(MemReader(child.pid).map(markers))
    vpns = np.concatenate([v for v, _ in got])
    assert (np.diff(vpns.astype(np.int64)) > 0).all()  # address order across both threads' chunks
    found = np.concatenate([m for _, m in got])
    assert found.tolist() == list(range(PAGES))  # positive control: the child's pages, each once, in order
    assert len(got) > LOOKAHEAD + 1  # more chunks than the readers may hold ahead (see the exit test)
    assert threading.active_count() == before


def test_map_raises_the_function_error_and_stops_early(child: subprocess.Popen[str]) -> None:
    before = threading.active_count()
    calls = 0

    def fail_on_third(vpns: np.ndarray, pages: np.ndarray) -> int:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise ValueError("third chunk")
        return len(vpns)

    with pytest.raises(ValueError, match="third chunk"):
        list(MemReader(child.pid).map(fail_on_third))
    it = MemReader(child.pid).map(lambda v, p: len(v))
    assert next(it) > 0
    it.close()  # a caller that stops early: the readers end with it
    assert threading.active_count() == before


def test_map_ends_when_the_process_exits(child: subprocess.Popen[str]) -> None:
    it = MemReader(child.pid).map(lambda v, p: len(v))
    first = next(it)
    child.kill()
    child.wait()
    rest = list(it)  # ends instead of hanging or raising: only chunks read before the kill come
    assert first > 0
    assert len(rest) <= LOOKAHEAD
