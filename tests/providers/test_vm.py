"""The `vm` provider's building blocks against a real VM: golden image, QEMU, guest agent, NoCloud, tap.

One VM boots for the whole session (minutes under TCG) and every test here shares it. Its tap sits on a
bridge in a netns this module creates; all test traffic stays inside that netns.
"""

import dataclasses
import logging
import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from skyferry.providers import qemu, vmimage

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.timeout(2400),  # the session fixture (image build + TCG boot) runs inside the first test
]

HOST_ADDRESS = "192.0.2.1/24"  # TEST-NET-1, only ever inside the test's own netns
VM_ADDRESS = "192.0.2.10"
MARKER = "/var/lib/skyferry-test/marker"

log = logging.getLogger(__name__)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def _netns_exists(name: str) -> bool:
    return name in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()


def _tap_exists(netns: str, tap: str) -> bool:
    return subprocess.run(["ip", "-n", netns, "link", "show", tap], capture_output=True).returncode == 0


def _user_data(run: str) -> str:
    return f"""#cloud-config
write_files:
  - path: {MARKER}
    content: "{run}\\n"
"""


class Session:
    """The shared VM and what the tests need to know about it."""

    def __init__(self, run: str, netns: str, vm: qemu.Vm, ready_s: float) -> None:
        self.run, self.netns, self.vm, self.ready_s = run, netns, vm, ready_s

    def sh(self, script: str, timeout: float = 120) -> tuple[int, str, str]:
        return self.vm.exec(["sh", "-c", script], timeout=timeout)


@pytest.fixture(scope="session")
def vm_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Session]:
    run = "t" + secrets.token_hex(2)
    netns = f"{run}-vmnet"
    workdir = tmp_path_factory.mktemp("vm")
    started = time.monotonic()
    image = vmimage.ensure_image()
    log.info("image ready in %.1f s", time.monotonic() - started)
    golden_mtime = image.disk.stat().st_mtime_ns
    _ip("netns", "add", netns)
    vm: qemu.Vm | None = None
    try:
        _ip("-n", netns, "link", "add", "br0", "type", "bridge")
        _ip("-n", netns, "addr", "add", HOST_ADDRESS, "dev", "br0")
        _ip("-n", netns, "link", "set", "br0", "up")
        spec = qemu.VmSpec(
            prefix=run, name="vm0", image=image, memory_mib=1024, cpus=2, user_data=_user_data(run),
            netns=netns, bridge="br0", workdir=workdir, nice=10,
        )  # fmt: skip
        net = qemu.static_network_config(spec.mac_address, f"{VM_ADDRESS}/24")
        spec = dataclasses.replace(spec, network_config=net)
        vm = qemu.boot(spec)
        ready = vm.wait_ready(timeout=1500)
        yield Session(run, netns, vm, ready)
        assert image.disk.stat().st_mtime_ns == golden_mtime, "the golden image was written to"
    finally:
        leftovers: list[str] = []
        if vm:
            # The console stays in pytest's own temp dir (kept for the last 3 runs) for post-mortems.
            vm.stop(keep_console=workdir / f"{run}-console.log")
            leftovers += _leftovers(vm, netns)
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)
        if _netns_exists(netns):
            leftovers.append(f"netns {netns}")
        assert not leftovers, f"teardown left {leftovers}"


def _leftovers(vm: qemu.Vm, netns: str) -> list[str]:
    """What of this VM still exists after stop(): its QEMU process, its tap, its work directory."""
    found = []
    cmdline = Path(f"/proc/{vm.pid}/cmdline")
    if cmdline.exists() and vm.spec.prefix.encode() in cmdline.read_bytes():
        found.append(f"QEMU pid {vm.pid}")
    if _tap_exists(netns, vm.spec.tap):
        found.append(f"tap {vm.spec.tap}")
    if vm.spec.dir.exists():
        found.append(str(vm.spec.dir))
    return found


def test_guest_runs_debian_kernel(vm_session: Session) -> None:
    rc, out, _ = vm_session.vm.exec(["uname", "-r"])
    assert rc == 0
    assert out.startswith("6.1."), out
    print(f"accelerator={vm_session.vm.accelerator} ready after {vm_session.ready_s:.0f} s, kernel {out.strip()}")
    print(vm_session.sh("systemd-analyze; systemd-analyze blame | head -8")[1])  # boot-time facts for the log


def test_soft_dirty(vm_session: Session) -> None:
    rc, out, err = vm_session.sh("test -e /proc/self/clear_refs && grep -h '^CONFIG_MEM_SOFT_DIRTY=' /boot/config-*")
    assert rc == 0, err
    assert out.strip() == "CONFIG_MEM_SOFT_DIRTY=y"


def test_wireguard_module(vm_session: Session) -> None:
    rc, out, err = vm_session.sh("modprobe wireguard && ip link add wgtest type wireguard && ip -d link show wgtest")
    vm_session.sh("ip link del wgtest")
    assert rc == 0, err
    assert "wireguard" in out


def test_criu_check(vm_session: Session) -> None:
    rc, out, err = vm_session.vm.exec(["/usr/local/sbin/criu", "check"], timeout=120)
    assert rc == 0, f"criu check failed:\n{out}\n{err}"
    rc, out, err = vm_session.vm.exec(["/usr/local/sbin/criu", "check", "--feature", "mem_dirty_track"])
    assert rc == 0, f"no soft-dirty tracking for CRIU:\n{out}\n{err}"


def test_criu_check_all_features(vm_session: Session) -> None:
    """Not a gate: records which optional CRIU features this guest kernel lacks (see the test log)."""
    rc, out, err = vm_session.vm.exec(["/usr/local/sbin/criu", "check", "--all"], timeout=120)
    print(f"criu check --all: rc {rc}\n{out}{err}")


def test_exec_reports_exit_code_and_streams(vm_session: Session) -> None:
    rc, out, err = vm_session.sh("echo out; echo err >&2; exit 3")
    assert (rc, out, err) == (3, "out\n", "err\n")


def test_cloud_init_ran_user_data(vm_session: Session) -> None:
    rc, out, err = vm_session.vm.exec(["cat", MARKER])
    assert rc == 0, err
    assert out.strip() == vm_session.run
    rc, out, _ = vm_session.vm.exec(["hostname"])
    assert out.strip() == "vm0"


def test_peer_reaches_vm_over_tap(vm_session: Session) -> None:
    ping = ["ip", "netns", "exec", vm_session.netns, "ping", "-c", "3", "-W", "2", VM_ADDRESS]
    result = subprocess.run(ping, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert _tap_exists(vm_session.netns, vm_session.vm.spec.tap)
