"""The freezer (pipeline/runtimes/freezer.py) on a real cgroup of this machine (v1 or v2) holding a busy
process: frozen, it gets no CPU until thawed. runc's own view of a container frozen this way is checked
end to end by every migration (`runc checkpoint` of it, `runc resume` in a rollback)."""

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kit.cgroups import spinning
from skyferry.pipeline.runtimes import freezer
from skyferry.pipeline.runtimes.freezer import CGROUP

pytestmark = [pytest.mark.integration, pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]
V2 = (CGROUP / "cgroup.controllers").exists()


@pytest.fixture
def busy() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    with spinning("skyferry-freezer-test", ["freezer"]) as (name, proc):
        try:
            yield name.strip("/"), proc
        finally:
            freezer.thaw(name)  # a failed test may leave it frozen, and a frozen task cannot be reaped


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def runs(pid: int) -> bool:
    """Whether the process got CPU within about half a second."""
    before = cpu_ticks(pid)
    time.sleep(0.5)
    return cpu_ticks(pid) > before


def test_a_frozen_cgroup_gets_no_cpu_until_thawed(busy: tuple[str, subprocess.Popen[bytes]]) -> None:
    rel, proc = busy
    assert runs(proc.pid)  # the positive control: it spins
    freezer.freeze(f"/{rel}")
    if V2:
        assert "frozen 1" in (CGROUP / rel / "cgroup.events").read_text().splitlines()
    else:
        assert (CGROUP / "freezer" / rel / "freezer.state").read_text().strip() == "FROZEN"
    assert not runs(proc.pid)
    freezer.thaw(rel)
    assert runs(proc.pid)
