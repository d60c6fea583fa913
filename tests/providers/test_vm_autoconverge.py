"""Auto-converge on cgroup v2, on the shared VM session (kit/vms.py): Debian 12's systemd runs the VMs on
the unified hierarchy, where the throttle writes `cpu.max` (this machine's hosts have v1 and
tests/pipeline/controller/test_autoconverge.py covers that), and their soft-dirty kernel makes the rounds
CRIU pre-dumps, which the throttle steps aside for (Throttle.relaxed).

A container that rewrites its memory faster than the emulated WAN carries it moves from vm-1 to vm-2 (a
sampler inside vm-1 watches its cpu.max all along), then fails to move back within its completion timeout
and stays on vm-2 (a sampler there). Outcomes only, never timings.
"""

import shlex
from collections.abc import Iterator
from typing import Any

import pytest
from kit.cpulimit import GuestSampler, in_order, throttled
from kit.vms import Session, containers_on, vm_integration
from skyferry.netplane.mesh import Mesh
from skyferry.pipeline.controller import containers, migration
from skyferry.pipeline.controller.journal import Journal
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.scenarios import demo as scenario

pytestmark = vm_integration
NAME = "acv2"
OWN = "max 100000"  # cpu.max of a container without a limit of its own: no quota, the 100 ms period


@pytest.fixture(scope="module")
def churner(vms: Session, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The counter on vm-1 with 16 MiB it rewrites as fast as the guest can (TCG: far above the WAN)."""
    info = scenario.start_counter(vms.state, "vm-1", NAME, tmp_path_factory.mktemp("acv2"), memory_mib=16,
                                  dirty_mb_s=1000)  # fmt: skip
    try:
        yield info
    finally:
        containers.remove(vms.state, NAME)


def memory_bad(vms: Session, ip: str) -> int:
    return int(scenario.check_memory(Mesh.load(vms.state).host("local-1").netns or "", ip)["bad"])


def cgroup_of(vms: Session, host: str) -> str:
    """The container's cgroup on `host`, as the kernel names it for its init (v2: the `0::` line)."""
    (found,) = containers_on(vms.state, host, NAME)
    lines = vms.sh(host, f"cat /proc/{found['pid']}/cgroup").stdout.splitlines()
    assert lines and all(line.startswith("0::") for line in lines), lines  # the unified hierarchy only
    return lines[0].removeprefix("0::")


def cpu_max(vms: Session, host: str, cgroup: str) -> str:
    return str(vms.sh(host, f"cat {shlex.quote(f'/sys/fs/cgroup{cgroup}/cpu.max')}").stdout.strip())


def no_throttle_records(vms: Session, host: str) -> bool:
    root = Mesh.load(vms.state).host(host).state_root
    return vms.sh(host, f"ls {shlex.quote(root)}/throttles/*.json").returncode != 0


def test_a_churner_faster_than_the_wan_is_throttled_through_cpu_max_and_moves(vms: Session, churner: dict) -> None:
    assert vms.sh("vm-1", "stat -fc %T /sys/fs/cgroup").stdout.strip() == "cgroup2fs"
    mesh = Mesh.load(vms.state).name
    cgroup = cgroup_of(vms, "vm-1")
    assert cgroup == f"/skyferry/{mesh}/vm-1/{NAME}"  # Runc.cgroup(name): where the throttle writes
    assert cpu_max(vms, "vm-1", cgroup) == OWN
    assert memory_bad(vms, churner["ip"]) == 0  # built and churning
    sampler = GuestSampler(vms, "vm-1", f"/sys/fs/cgroup{cgroup}/cpu.max", f"{vms.run}-{NAME}")
    try:
        report = migration.migrate(vms.state, NAME, "vm-2", mode="precopy", completion_timeout=3600)
    finally:
        seen = sampler.stop()
    steps = report["throttle_steps"]
    print(f"vm-1 -> vm-2: stop {report['precopy_stop']}, steps {steps}, cpu.max seen {seen}")
    assert report["state"] == "done" and report["precopy_method"] == "soft-dirty", report
    assert steps and [s["percent"] for s in steps] == [20, 30, 40, 50, 60, 70, 80, 90, 99][: len(steps)], steps
    assert all(s["round"] >= 2 and s["dirty_bytes_s"] > 0 for s in steps), steps
    # Control: the sampler saw the throttle itself, not only the container's own "max": the report's steps,
    # in order (each holds for a round's transfer at least; three runs saw every one), and nothing else.
    assert seen[0] == OWN and seen[-1] == OWN, seen  # the last: lifted before the checkpoint's pause
    taken = throttled([f"{s['quota_us']} {s['period_us']}" for s in steps], OWN)
    assert throttled(seen, OWN) != [] and in_order(throttled(seen, OWN), taken), (seen, taken)
    # The target's copy runs under the container's own limit, in its own host's cgroup, memory intact.
    moved = cgroup_of(vms, "vm-2")
    assert moved == f"/skyferry/{mesh}/vm-2/{NAME}" and cpu_max(vms, "vm-2", moved) == OWN
    assert vms.sh("vm-2", f"test -e /sys/fs/cgroup/skyferry/{mesh}/vm-1").returncode != 0  # CRIU's, removed
    assert containers_on(vms.state, "vm-1", NAME) == [] and no_throttle_records(vms, "vm-1")
    assert memory_bad(vms, churner["ip"]) == 0


def test_b_a_completion_timeout_rolls_back_with_the_throttle_lifted(vms: Session, churner: dict) -> None:
    """vm-2 -> vm-1 with --on-timeout abort: the rounds run throttled until the timeout (25 s: the
    container is far below one GiB), then the rollback leaves it on vm-2 under its own cpu.max."""
    cgroup = cgroup_of(vms, "vm-2")
    assert cpu_max(vms, "vm-2", cgroup) == OWN
    sampler = GuestSampler(vms, "vm-2", f"/sys/fs/cgroup{cgroup}/cpu.max", f"{vms.run}-{NAME}")
    try:
        with pytest.raises(SkyferryError, match=f"did not complete within .*Rolled back: {NAME} runs on vm-2"):
            migration.migrate(vms.state, NAME, "vm-1", mode="precopy", completion_timeout=25, on_timeout="abort")
    finally:
        seen = sampler.stop()
    print(f"vm-2 -> vm-1 aborted: cpu.max seen {seen}")
    assert Journal(vms.state).all()[-1].state == "rolled-back"
    assert throttled(seen, OWN) != [], seen  # control: the rounds did throttle it
    assert seen[-1] == OWN and cpu_max(vms, "vm-2", cgroup) == OWN  # and it is not any more
    (here,) = containers_on(vms.state, "vm-2", NAME)
    assert here["state"] == "running" and not here["frozen_for_migration"], here
    assert containers_on(vms.state, "vm-1", NAME) == [] and no_throttle_records(vms, "vm-2")
    assert memory_bad(vms, churner["ip"]) == 0


def test_c_the_sampler_sees_what_is_written(vms: Session, churner: dict) -> None:
    """The sampler's own positive control, independent of the migration: a value written to cpu.max by
    hand shows in what it saw, and writing the original back ends the container's limit as it was."""
    cgroup = cgroup_of(vms, "vm-2")
    path = f"/sys/fs/cgroup{cgroup}/cpu.max"
    sampler = GuestSampler(vms, "vm-2", path, f"{vms.run}-{NAME}-c")
    try:
        assert vms.sh("vm-2", f"echo '50000 100000' > {path}; sleep 1; echo '{OWN}' > {path}; sleep 1").returncode == 0
    finally:
        seen = sampler.stop()
    assert throttled(seen, OWN) == ["50000 100000"] and seen[-1] == OWN, seen
