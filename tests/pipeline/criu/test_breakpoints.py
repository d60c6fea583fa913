"""PerfHooks holds one real perf event on this process while held, and none after (criu/breakpoints.py)."""

from __future__ import annotations

import os

from skyferry.pipeline.criu.breakpoints import PerfHooks


def perf_fds() -> set[int]:
    fds = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "anon_inode:[perf_event]":
                fds.add(int(name))
        except FileNotFoundError:
            continue  # the listing's own fd
    return fds


def test_holds_one_event_until_released() -> None:
    before = perf_fds()
    hooks = PerfHooks()
    assert hooks.hold() and hooks.hold()  # idempotent: still one event
    assert perf_fds() - before == {hooks.fd}  # positive control: the kernel made a perf event
    hooks.release()
    hooks.release()
    assert perf_fds() == before and hooks.fd is None
