"""Auto-converge's CPU throttle (pipeline/runtimes/throttle.py) on a real cgroup of this machine (v1 or v2),
holding a real busy process: each step writes a tighter limit, and lifting writes the original back byte
for byte, also from a new store (an agent that restarted). Waits are "eventually", never timings."""

import functools
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from kit import wait
from kit.cgroups import spinning
from skyferry.pipeline.runtimes import throttle
from skyferry.pipeline.runtimes.throttle import CpuFiles, Throttle, Throttles

pytestmark = [pytest.mark.integration, pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]
eventually = functools.partial(wait.eventually, timeout=60.0)  # a generous deadline, not a measurement
CG = throttle.CGROUP
V2 = "cpu" in (CG / "cgroup.controllers").read_text().split() if (CG / "cgroup.controllers").exists() else False


@dataclass
class Busy:
    """A process spinning in a cgroup of its own, and that cgroup's CPU limit before the test."""

    name: str  # the cgroup's path, as the kernel names it
    proc: subprocess.Popen[bytes]
    files: CpuFiles
    before: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        self.before = self.limit()

    def limit(self) -> dict[str, str]:
        return self.files.originals()


@pytest.fixture
def busy() -> Iterator[Busy]:
    if V2 and "cpu" not in (CG / "cgroup.subtree_control").read_text().split():
        (CG / "cgroup.subtree_control").write_text("+cpu")
    with spinning("skyferry-throttle-test", ["cpu", "cpuacct"]) as (name, proc):
        yield Busy(name, proc, CpuFiles.of(name))


@pytest.fixture
def store(tmp_path: Path) -> Throttles:
    return Throttles(tmp_path)


def test_the_kernel_names_the_cgroup_the_throttle_writes(busy: Busy) -> None:
    assert throttle.of_pid(busy.proc.pid) == busy.name
    assert busy.files.limit.exists()


def test_steps_tighten_the_limit_and_lifting_restores_it_exactly(busy: Busy, store: Throttles) -> None:
    files = busy.files
    t = Throttle.start(store, "m1", "web", busy.name)
    eventually("the process has used some CPU", lambda: files.usage_s() - t.used0 > 0.05)
    assert store.get("m1") is None  # nothing written before the first step
    steps = [t.step() for _ in range(10)]
    assert [s["percent"] for s in steps] == [20, 30, 40, 50, 60, 70, 80, 90, 99, 99]  # QEMU's steps, then the cap
    assert t.capped
    shares = [s["quota_us"] / s["period_us"] for s in steps]
    assert shares == sorted(shares, reverse=True) and shares[0] < steps[0]["base_cpus"]
    assert files.quota_us() == steps[-1]["quota_us"] and files.period_us() == steps[-1]["period_us"]
    assert store.get("m1") is not None and store.get("m1").original == busy.before  # type: ignore[union-attr]
    assert store.lift("m1") and busy.limit() == busy.before
    assert not store.lift("m1") and busy.limit() == busy.before  # idempotent


def test_a_restarted_agent_lifts_what_an_earlier_one_left(busy: Busy, tmp_path: Path) -> None:
    t = Throttle.start(Throttles(tmp_path), "m1", "web", busy.name)
    t.step()
    t.step()
    assert busy.limit() != busy.before  # control: it is throttled
    assert Throttles(tmp_path).lift_all() == ["web"]  # a new agent, the same state root
    assert busy.limit() == busy.before and Throttles(tmp_path).all() == []
