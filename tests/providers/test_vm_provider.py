"""The `vm` provider: unit tests (sizes, names, store rows, what destroy may kill) and, against real VMs,
`hosts up --local` + `hosts up --vm` in one mesh, the underlay, the WAN relay, `hosts exec/ls/down`.

The integration tests share one session: a local mesh with one host and two VMs, booted once under
nice (TCG here). Everything carries the run's unique mesh id; `hosts down` runs even on failure.
"""

import subprocess
import sys
import time
from pathlib import Path

import pytest
from kit.vms import Session, vm_integration
from skyferry.providers import vm
from skyferry.providers.errors import ProviderError

SKYFERRY = str(Path(sys.executable).parent / "skyferry")


# --- units -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "want"),
    [(None, (2, 1024)), ("2cpu-2g", (2, 2048)), ("1cpu-512m", (1, 512)), (" 4CPU-1G ", (4, 1024))],
)
def test_size_parsing(size: str | None, want: tuple[int, int]) -> None:
    assert vm.parse_size(size) == want


@pytest.mark.parametrize("size", ["2cpu", "t3.medium", "0cpu-1g", "2cpu-128m", "9cpu-1g", "2cpu-17g", ""])
def test_bad_sizes_are_refused_with_a_hint(size: str) -> None:
    with pytest.raises(ProviderError) as err:
        vm.parse_size(size)
    assert err.value.hint and "2cpu-2g" in err.value.hint


def test_names_fill_gaps_and_addresses_follow_the_index() -> None:
    assert vm.missing_vms("vm", [], 2) == ["vm-1", "vm-2"]
    assert vm.missing_vms("vm", ["vm-2"], 3) == ["vm-1", "vm-3"]
    assert vm.missing_vms("vm", ["vm-1", "vm-2"], 2) == []
    assert vm.vm_index("vm", "vm-12") == 12
    assert vm.vm_index("vm", "vm-0") is None
    assert vm.vm_index("vm", "local-1") is None
    assert vm.underlay_address(1) == "198.18.0.101"
    with pytest.raises(ProviderError):
        vm.underlay_address(vm.MAX_VMS + 1)


def _record(tmp_path: Path, name: str, pid: int | None) -> vm.VmRecord:
    vm_dir = tmp_path / "vm" / f"x-{name}"
    vm_dir.mkdir(parents=True)
    (vm_dir / "overlay.qcow2").write_bytes(b"")
    return vm.VmRecord(
        name=name, plan="vm", mesh="x", address="198.18.0.101", mac="52:54:00:00:00:01", netns="nonexistent-ns",
        tap=f"x-{name}", dir=str(vm_dir), memory_mib=1024, cpus=2, accelerator="tcg", pid=pid, created=time.time(),
    )  # fmt: skip


def test_store_rows_and_destroy_kills_only_a_recorded_qemu(tmp_path: Path) -> None:
    """A recorded pid that is not this VM's QEMU (reused, or never QEMU) survives destroy; rows and dirs go."""
    state = tmp_path / "state"
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        rec = _record(state, "vm-1", bystander.pid)
        vm._save(state, rec)
        assert vm.records(state) == [rec]
        assert vm.record(state, "vm-1") == rec
        assert vm.VmProvider(state).plans() == ["vm"]
        assert not rec.alive()  # positive control below: the same check sees a process that is ours
        removed = vm.VmProvider(state).destroy("vm")
        assert bystander.poll() is None, "destroy killed a process that is not the VM's QEMU"
        assert not Path(rec.dir).exists() and not (state / "vm").exists()
        assert vm.records(state) == [] and vm.VmProvider(state).plans() == []
        assert f"dir {rec.dir}" in removed and not any("process" in r for r in removed)
    finally:
        bystander.kill()
        bystander.wait()


def test_our_qemu_is_recognised_by_its_directory(tmp_path: Path) -> None:
    """The positive control of the test above: a process named like QEMU with the VM's dir in its argv."""
    vm_dir = str(tmp_path / "vmdir")
    # exec -a gives argv[0] QEMU's name; python ignores the extra argument, the VM's directory.
    code = "import time; time.sleep(60)"
    proc = subprocess.Popen(["bash", "-c", f'exec -a {vm.qemu.QEMU} {sys.executable} -c "{code}" "{vm_dir}"'])
    try:
        time.sleep(0.2)
        assert vm._is_our_qemu(proc.pid, vm_dir)
        assert not vm._is_our_qemu(proc.pid, str(tmp_path / "other"))
        assert vm._terminate(proc.pid, lambda: vm._is_our_qemu(proc.pid, vm_dir))
        assert proc.wait(timeout=5) is not None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _running(pid: int | None) -> bool:
    """Alive and not a zombie: a QEMU whose `hosts up` has exited is reaped by init, in its own time."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


# --- real VMs --------------------------------------------------------------------------------------


@pytest.mark.usefixtures("vms")
class TestVmHosts:
    pytestmark = vm_integration

    def test_up_reports_progress_and_the_vms(self, vms: Session) -> None:
        result = vms.up_result  # type: ignore[attr-defined]
        print(f"hosts up --vm --count 2: {vms.boot_s:.0f} s")  # type: ignore[attr-defined]
        assert sorted(result["created"]) == ["vm-1", "vm-2"]
        assert not result["mesh_created"]  # the local mesh was there first
        assert "> vm-1: booting" in vms.up_stderr  # type: ignore[attr-defined]
        assert "guest agent answers" in vms.up_stderr  # type: ignore[attr-defined]
        addresses = {h["name"]: h["address"] for h in result["vms"]}
        assert addresses == {"vm-1": "198.18.0.101", "vm-2": "198.18.0.102"}

    def test_ls_lists_vms_with_provider_and_accelerator(self, vms: Session) -> None:
        rows = {r["name"]: r for r in vms.json("hosts", "ls")["hosts"]}
        assert rows["local-1"]["provider"] == "local"
        for name, address in (("vm-1", "198.18.0.101"), ("vm-2", "198.18.0.102")):
            row = rows[name]
            assert row["provider"] == "vm" and row["accelerator"] in ("tcg", "kvm")
            assert row["address"] == address and row["endpoint"] == f"{address}:51820"
            assert row["state"] == "running" and row["up"] is True
            assert row["overlay_ip"]  # joined into the mesh by provision, like a cloud host
            assert row["via_relay"]

    def test_cloud_init_reached_its_end_with_the_hostname(self, vms: Session) -> None:
        provider = vm.VmProvider(vms.state)
        started = time.monotonic()
        for name in ("vm-1", "vm-2"):
            rc, out = provider.cloud_init_status(name, timeout=1500)
            print(f"{name}: cloud-init ended (rc {rc}) {time.monotonic() - started:.0f} s after the test began")
            assert rc == 0 and "status: done" in out, out  # installed the wheel and joined, offline
            assert vms.sh(name, "hostname").stdout.strip() == name
            assert vms.sh(name, "cat /etc/skyferry/golden-image").stdout.strip()

    def test_underlay_reaches_controller_and_local_host(self, vms: Session) -> None:
        for name, address in (("vm-1", "198.18.0.101"), ("vm-2", "198.18.0.102")):
            addr = vms.sh(name, "ip -4 -br addr show eth0")
            assert f"{address}/24" in addr.stdout, addr
            for target in ("198.18.0.2", "198.18.0.11"):  # the controller netns and local-1
                ping = vms.sh(name, f"ping -c 2 -W 5 {target}")
                assert ping.returncode == 0, ping.stdout + ping.stderr

    def test_exec_passes_exit_code_and_output(self, vms: Session) -> None:
        done = vms.sh("vm-1", "echo out; echo err >&2; exit 3")
        assert (done.returncode, done.stdout, done.stderr) == (3, "out\n", "err\n")
        python = vms.cli("hosts", "exec", "vm-1", "--", "/opt/skyferry/bin/python", "-c", "import pycriu, pydantic")
        assert python.returncode == 0, python.stderr

    def test_rerun_creates_nothing(self, vms: Session) -> None:
        pids = {r.name: r.pid for r in vm.records(vms.state)}
        again = vms.json("hosts", "up", "--vm", "--count", "2")
        assert again["created"] == [] and not again["mesh_created"]
        assert {r.name: r.pid for r in vm.records(vms.state)} == pids

    def test_errors_are_one_line_with_a_hint(self, vms: Session) -> None:
        unknown = vms.cli("hosts", "exec", "vm-9", "--", "true")
        assert unknown.returncode == 2 and "vm-9" in unknown.stderr and "Traceback" not in unknown.stderr
        bad = vms.cli("hosts", "up", "--vm", "--count", "2", "--size", "huge")
        assert bad.returncode == 2 and "2cpu-2g" in bad.stderr and "Traceback" not in bad.stderr
