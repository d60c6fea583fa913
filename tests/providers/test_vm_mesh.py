"""Migrations between machines with their own kernels: two VMs (Debian 12's 6.1, kernel WireGuard) that
joined through provision's token path, and a namespace host on this machine's kernel, on one emulated
WAN (the shared session of kit/vms.py). The client always runs on the namespace host, local-1.
"""

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kit.vms import Session, containers_on, counter_client, vm_integration
from skyferry.netplane.mesh import Mesh
from skyferry.pipeline.controller import agentctl, containers, migration
from skyferry.pipeline.controller.registry import Registry
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.scenarios import demo as scenario
from skyferry.providers import vm

pytestmark = vm_integration


@pytest.fixture
def controller(vms: Session, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """The session's state as this process's controller state; the test's own work dir."""
    monkeypatch.setenv("SKYFERRY_STATE", str(vms.state))
    yield tmp_path


def _facts(state: Path, host: str) -> dict[str, Any]:
    mesh = Mesh.load(state)
    return agentctl.client(state, mesh, host).call("GET", "/v1/facts")  # type: ignore[no-any-return]


def test_vms_joined_with_their_own_keys_over_kernel_wireguard(vms: Session, controller: Path) -> None:
    mesh = Mesh.load(vms.state)
    for name in ("vm-1", "vm-2"):
        member = mesh.host(name)
        assert member.provider == "vm" and member.netns is None
        facts = _facts(vms.state, name)
        assert facts["kernel"].startswith("6.1.") and facts["wireguard"] == "kernel", facts
        assert facts["features"]["mem_dirty_track"] is True  # soft-dirty, which this machine's kernel lacks
        # The host's private keys exist on the host only: not in its user-data, nor anywhere in the
        # controller's state (the VM's own disk image aside: that is the machine).
        key = vms.sh(name, "cat /var/lib/skyferry/host/wireguard/private.key").stdout.strip()
        tls = vms.sh(name, "grep -v -- ----- /var/lib/skyferry/host/tls/key.pem | tr -d '\\n'").stdout[48:88]
        assert len(key) == 44 and len(tls) == 40
        for path in (p for p in vms.state.rglob("*") if p.is_file() and p.name != "overlay.qcow2"):
            data = path.read_bytes()
            assert key.encode() not in data and tls.encode() not in data, f"{name}'s private key is in {path}"
        seed = Path(vm.record(vms.state, name).dir) / "seed.iso"  # type: ignore[union-attr]
        assert b"PRIVATE KEY" not in seed.read_bytes() and b"PrivateKey" not in seed.read_bytes()


def test_doctor_and_ls_say_what_each_vm_uses(vms: Session, controller: Path) -> None:
    done = vms.cli("doctor", "--host", "vm-1", "--json", timeout=900)  # through vm-1's own agent
    report = json.loads(done.stdout)
    assert done.returncode == (0 if report["ok"] else 1), done.stderr  # 1: a check FAILs (no Docker there)
    checks = {c["name"]: c for c in report["checks"]}
    assert report["precopy_method"] == "soft-dirty", report
    assert checks["criu check"]["status"] == "PASS" and checks["tcp repair"]["status"] == "PASS", checks
    # Debian mounts cgroup2 without favordynmods (test_doctor.py): the agent's unit added it at start.
    assert checks["cgroup moves"]["status"] == "PASS", checks["cgroup moves"]
    rows = {r["name"]: r for r in vms.json("hosts", "ls")["hosts"]}
    for name in ("vm-1", "vm-2"):
        assert rows[name]["wireguard"] == "kernel" and rows[name]["kernel"].startswith("6.1."), rows[name]
    assert rows["local-1"]["wireguard"] == Mesh.load(vms.state).backend


def test_live_migration_vm_to_vm_keeps_the_connection(vms: Session, controller: Path) -> None:
    """As a non-root user (--user 1000), under Docker's capabilities and seccomp profile: the VMs' root has
    CAP_SYS_RESOURCE, which CRIU needs to dump another user's task (docs/security.md, "Containers")."""
    assert agentctl.client(vms.state, Mesh.load(vms.state), "vm-1").call("GET", "/v1/facts")["dumps_other_users"]
    info = scenario.start_counter(vms.state, "vm-1", "vmcounter", controller, user=(1000, 1000))
    client = counter_client(vms.state, info["ip"], controller)
    try:
        client.wait_for(client.progress() + 5, timeout=60)
        report = migration.migrate(vms.state, "vmcounter", "vm-2", mode="precopy")  # auto would go by content
        client.wait_for(client.progress() + 5, timeout=60)
    finally:
        seen = client.stop()
    print(f"vm-1 -> vm-2: freeze {report['freeze_ms']} ms, stages {report['stages_s']}, client {seen}")
    assert report["state"] == "done" and report["source"] == "vm-1" and report["target"] == "vm-2"
    assert report["precopy_method"] == "soft-dirty"  # CRIU's own pre-dump: the VMs' kernel tracks dirty pages
    assert seen["survived"] and not seen["errors"], seen
    assert Registry(vms.state).get("vmcounter").host == "vm-2"
    assert [c["state"] for c in containers_on(vms.state, "vm-2", "vmcounter")] == ["running"]
    assert containers_on(vms.state, "vm-1", "vmcounter") == []
    # cgroup v2: the restored tasks are in runc's cgroup of vm-2, and no path named after vm-1 was made.
    pid, mesh = containers_on(vms.state, "vm-2", "vmcounter")[0]["pid"], Mesh.load(vms.state).name
    seen = vms.sh("vm-2", f"cat /proc/{pid}/cgroup; find /sys/fs/cgroup/skyferry/{mesh} -mindepth 1 -type d | sort")
    assert seen.returncode == 0, seen.stderr
    cgroup = f"/skyferry/{mesh}/vm-2/vmcounter"
    assert seen.stdout.split() == [f"0::{cgroup}", f"/sys/fs/cgroup/skyferry/{mesh}/vm-2", f"/sys/fs/cgroup{cgroup}"]
    containers.remove(vms.state, "vmcounter")


@pytest.mark.parametrize(("source", "target"), [("local-1", "vm-1"), ("vm-1", "local-1")])
def test_namespace_host_and_vm(vms: Session, controller: Path, source: str, target: str) -> None:
    """Across kernels (6.18 <-> 6.1) and CPUs (this machine's <-> TCG's): either the migration works with
    the connection kept, or the check refuses it before any freeze, with the container untouched."""
    name = f"x{source[0]}{target[0]}"
    info = scenario.start_counter(vms.state, source, name, controller)
    client = counter_client(vms.state, info["ip"], controller)
    try:
        client.wait_for(client.progress() + 3, timeout=60)
        try:
            report = migration.migrate(vms.state, name, target)
        except SkyferryError as exc:
            report = {"state": "refused", "error": str(exc)}
        client.wait_for(client.progress() + 3, timeout=60)
    finally:
        seen = client.stop()
    print(f"{source} -> {target}: {report.get('state')} {report.get('error') or report.get('freeze_ms')}")
    assert seen["survived"] and not seen["errors"], seen
    if report["state"] == "refused":
        assert "failed at check" in report["error"], report
        assert Registry(vms.state).get(name).host == source
        assert [c["state"] for c in containers_on(vms.state, source, name)] == ["running"]
    else:
        assert report["state"] == "done"
        assert Registry(vms.state).get(name).host == target
    assert len(containers_on(vms.state, source, name)) + len(containers_on(vms.state, target, name)) == 1
    containers.remove(vms.state, name)
