"""`skyferry doctor`: the decisions fed with outputs captured from real machines, then the whole command
run on this machine and compared with what the kernel itself says."""

import errno
import gzip
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from skyferry.pipeline.agent import doctor
from skyferry.pipeline.agent.doctor import Output, Status
from skyferry.pipeline.criu.version import PRECOPY_CONTENT, PRECOPY_SOFT_DIRTY
from skyferry.pipeline.runtimes import engines

# Not imported from conftest.py: with several conftest.py files that module name is ambiguous.
NEEDS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

SKYFERRY = str(Path(sys.executable).with_name("skyferry"))
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]

# Captured on this machine (Debian 12, kernel 6.18): CRIU 4.2.1 from scripts/bootstrap-host.sh, and
# Debian 12's own criu 3.17.1 (`apt-get download criu`), which cannot run on this kernel.
CRIU_421_VERSION = "Version: 4.2.1"
CRIU_317_VERSION = "Version: 3.17.1"
CRIU_317_CHECK = """\
Error (criu/vdso.c:381): vdso: Unexpected rt vDSO area bounds
Error (criu/vdso.c:613): vdso: Failed to fill self vdso symtable
Error (criu/kerndat.c:1615): kerndat_vdso_fill_symtable failed when initializing kerndat.
Error (criu/crtools.c:260): Could not initialize kernel features detection."""
CRIU_AS_NOBODY = """\
CRIU needs to have the CAP_SYS_ADMIN or the CAP_CHECKPOINT_RESTORE capability:
setcap cap_checkpoint_restore+eip criu"""
SOFT_DIRTY_OFF = "Warn  (criu/cr-check.c:824): Dirty tracking is OFF. Memory snapshot will not work."
UFFD_ON = "uffd-noncoop is supported"
NFT_LOCK_ON = "network_lock_nftables is supported"
RUNC = "runc version 1.1.5+ds1\ncommit: 1.1.5+ds1-1+deb12u1\nspec: 1.0.2-dev\ngo: go1.19.8\nlibseccomp: 2.5.4"
WIREGUARD_GO = "wireguard-go v0.0.20220316\n\nUserspace WireGuard daemon for linux-amd64."
WG = "wireguard-tools v1.0.20210914 - https://git.zx2c4.com/wireguard-tools/"
IPTABLES = "iptables v1.8.9 (nf_tables)"
DOCKER_CLIENT = "Docker version 28.2.2, build e6534b4"
# /proc/self/status CapEff of root here (no CAP_SYS_RESOURCE, bit 24) and of a full root.
CAPS_HERE = 0x000001FFFEFFFFFF
CAPS_FULL = 0x000001FFFFFFFFFF
PIPE_MAX_DEBIAN_DEFAULT = 1048576


def test_criu_version_needs_4_2() -> None:
    ok = doctor.criu_version_result(Output(0, CRIU_421_VERSION), "/usr/local/sbin/criu")
    assert (ok.status, ok.value) == (Status.PASS, "4.2.1")
    old = doctor.criu_version_result(Output(0, CRIU_317_VERSION), "/usr/sbin/criu")
    assert (old.status, old.value) == (Status.FAIL, "3.17.1")
    assert "make host" in old.fix
    assert doctor.criu_version_result(None).status is Status.FAIL
    assert doctor.criu_version_result(Output(0, "criu: unknown option")).status is Status.FAIL


def test_criu_check_reports_the_first_error() -> None:
    assert doctor.criu_check_result(Output(0, "Looks good.")).status is Status.PASS
    old = doctor.criu_check_result(Output(1, CRIU_317_CHECK))
    assert old.status is Status.FAIL
    assert "Unexpected rt vDSO area bounds" in old.detail
    assert doctor.criu_check_result(Output(1, CRIU_AS_NOBODY)).status is Status.FAIL


def test_precopy_method_follows_soft_dirty() -> None:
    here = doctor.precopy_result(Output(1, SOFT_DIRTY_OFF))
    assert (here.status, here.value) == (Status.WARN, PRECOPY_CONTENT)
    assert "Dirty tracking is OFF" in here.detail and PRECOPY_CONTENT in here.detail
    assert "CONFIG_MEM_SOFT_DIRTY" in here.fix
    # `criu check --feature X` prints "X is supported" when it is, as for uffd-noncoop above.
    cloud = doctor.precopy_result(Output(0, "mem_dirty_track is supported"))
    assert (cloud.status, cloud.value) == (Status.PASS, PRECOPY_SOFT_DIRTY)
    # When CRIU cannot look, doctor must not claim a method.
    for unknown in (Output(1, CRIU_AS_NOBODY), Output(1, CRIU_317_CHECK), None):
        result = doctor.precopy_result(unknown)
        assert (result.status, result.value) == (Status.WARN, None)
        assert "could not check" in result.detail


def test_lazy_pages() -> None:
    assert doctor.lazy_pages_result(Output(0, UFFD_ON)).status is Status.PASS
    unknown = doctor.lazy_pages_result(Output(1, CRIU_AS_NOBODY))
    assert unknown.status is Status.WARN and "could not check" in unknown.detail


def test_pipe_max_size() -> None:
    assert doctor.pipe_max_size_result(4194304, CAPS_HERE).status is Status.PASS
    low = doctor.pipe_max_size_result(PIPE_MAX_DEBIAN_DEFAULT, CAPS_HERE)
    assert low.status is Status.FAIL and "fs.pipe-max-size=4194304" in low.fix
    # With CAP_SYS_RESOURCE, CRIU may exceed the limit: it works, but only while the capability holds.
    assert doctor.pipe_max_size_result(PIPE_MAX_DEBIAN_DEFAULT, CAPS_FULL).status is Status.WARN


def test_dumping_non_root_containers_needs_cap_sys_resource() -> None:
    here = doctor.other_users_result(CAPS_HERE)  # this machine's root: no CAP_SYS_RESOURCE
    assert here.status is Status.WARN and here.value == "no" and "--user" in here.detail and here.fix
    assert doctor.other_users_result(CAPS_FULL).status is Status.PASS


def test_tcp_repair_errors() -> None:
    assert doctor.tcp_repair_result(None).status is Status.PASS
    for err in (errno.EPERM, errno.ENOPROTOOPT, errno.EINVAL):
        assert doctor.tcp_repair_result(err).status is Status.FAIL


def test_wireguard_backend() -> None:
    here = doctor.wireguard_result("missing", Output(0, WIREGUARD_GO), Output(0, WG))
    assert (here.status, here.value) == (Status.WARN, "wireguard-go")
    assert "0.0.20220316" in here.detail
    for module in ("loaded", "loadable"):
        kernel = doctor.wireguard_result(module, Output(0, WIREGUARD_GO), Output(0, WG))
        assert (kernel.status, kernel.value) == (Status.PASS, "kernel")
    assert doctor.wireguard_result("missing", None, Output(0, WG)).value == "none"
    assert doctor.wireguard_result("missing", None, Output(0, WG)).status is Status.FAIL
    assert doctor.wireguard_result("loaded", None, None).status is Status.FAIL  # no `wg` tool


def test_runtimes() -> None:
    runc = doctor.runc_result(Output(0, RUNC))
    assert (runc.status, runc.value) == (Status.PASS, "1.1.5+ds1")
    assert doctor.runc_result(None).status is Status.FAIL
    assert doctor.podman_result(None).status is Status.WARN
    # Neither is installed here; these follow the first lines Debian 12's podman and dockerd print.
    podman = doctor.podman_result(Output(0, "podman version 4.3.1"))
    assert (podman.status, podman.value) == (Status.PASS, "4.3.1")
    client_only = doctor.docker_result(Output(0, DOCKER_CLIENT), None)
    assert client_only.status is Status.WARN and "28.2.2" in client_only.detail
    daemon = doctor.docker_result(Output(0, DOCKER_CLIENT), Output(0, "Docker version 20.10.24+dfsg1, build 297e128"))
    assert (daemon.status, daemon.value) == (Status.PASS, "20.10.24+dfsg1")


def test_network_lock() -> None:
    nft = doctor.network_lock_result(Output(0, NFT_LOCK_ON), Output(0, IPTABLES))
    assert (nft.status, nft.value) == (Status.PASS, "nftables")
    ipt = doctor.network_lock_result(Output(1, CRIU_AS_NOBODY), Output(0, IPTABLES))
    assert (ipt.status, ipt.value) == (Status.PASS, "iptables")
    assert doctor.network_lock_result(Output(1, CRIU_317_CHECK), None).status is Status.FAIL


def test_cgroup_moves(tmp_path: Path) -> None:
    mounts = tmp_path / "mounts"
    debian = "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nodev,noexec,relatime,nsdelegate,memory_recursiveprot 0 0\n"
    mounts.write_text("proc /proc proc rw,relatime 0 0\n" + debian)  # Debian 12's default: no favordynmods
    assert doctor.probe_cgroup_favordynmods(mounts) is False
    assert doctor.favordynmods_result(False).status is Status.WARN and doctor.favordynmods_result(False).fix
    mounts.write_text(debian.replace("memory_recursiveprot", "memory_recursiveprot,favordynmods"))
    assert doctor.probe_cgroup_favordynmods(mounts) is True
    assert doctor.favordynmods_result(True).status is Status.PASS
    mounts.write_text("proc /proc proc rw,relatime 0 0\n")
    assert doctor.probe_cgroup_favordynmods(mounts) is None
    assert doctor.favordynmods_result(None).status is Status.WARN


def test_criu_probe_cache() -> None:
    ours = doctor.kdat_cache_result("/run/criu", "tmpfs")
    assert (ours.status, ours.value) == (Status.PASS, "/run/criu")
    here_before = doctor.kdat_cache_result("/run", "ext4")  # the default RUNDIR on this VM
    assert here_before.status is Status.WARN and "not a tmpfs" in here_before.detail and here_before.fix
    assert doctor.kdat_cache_result("/run/criu", None).status is Status.WARN  # after a reboot, unmounted
    assert doctor.kdat_cache_result(None, None).status is Status.WARN


def test_conntrack_table() -> None:
    assert doctor.conntrack_result(None).status is Status.PASS  # no conntrack: no table to walk
    assert doctor.conntrack_result(32768).status is Status.PASS
    default = doctor.conntrack_result(262144)  # what a host with more than 4 GiB gets
    assert default.status is Status.WARN and "~20 ms of the freeze" in default.detail, default
    assert "nf_conntrack_buckets=32768" in (default.fix or "")


def test_root_and_netns() -> None:
    assert doctor.root_result(0).status is Status.PASS
    assert doctor.root_result(65534).status is Status.FAIL
    assert doctor.netns_result(None).status is Status.PASS
    assert doctor.netns_result("ip netns add failed: Operation not permitted").status is Status.FAIL


# --- on this machine ---


def kernel_config() -> str:
    try:
        return gzip.decompress(Path("/proc/config.gz").read_bytes()).decode()
    except OSError:
        pytest.skip("no /proc/config.gz to compare against")


@pytest.mark.integration
@NEEDS_ROOT
def test_doctor_tells_the_truth_about_this_machine() -> None:
    proc = subprocess.run([SKYFERRY, "doctor", "--json"], capture_output=True, text=True, timeout=120)
    report = json.loads(proc.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    assert proc.returncode == (1 if any(c["status"] == "FAIL" for c in checks.values()) else 0)
    assert report["ok"] == (proc.returncode == 0)

    config = kernel_config()
    soft_dirty = re.search(r"^CONFIG_MEM_SOFT_DIRTY=y$", config, re.M) is not None
    assert report["precopy_method"] == (PRECOPY_SOFT_DIRTY if soft_dirty else PRECOPY_CONTENT)
    assert checks["pre-copy (soft-dirty)"]["value"] == report["precopy_method"]

    uffd = re.search(r"^CONFIG_USERFAULTFD=y$", config, re.M) is not None
    assert (checks["lazy pages (userfaultfd)"]["status"] == "PASS") == uffd

    wg_in_kernel = re.search(r"^CONFIG_WIREGUARD=[ym]$", config, re.M) is not None
    if not wg_in_kernel and Path("/usr/bin/wireguard-go").exists():
        assert checks["wireguard"]["value"] == "wireguard-go"

    assert checks["fs.pipe-max-size"]["value"] == Path("/proc/sys/fs/pipe-max-size").read_text().strip()
    # The bootstrapped host keeps CRIU's conntrack walk short (this machine's default is 262144 buckets).
    buckets = doctor.CONNTRACK_BUCKETS.read_text().strip()
    assert (checks["conntrack table"]["status"], checks["conntrack table"]["value"]) == ("PASS", buckets)
    version = subprocess.run(["criu", "--version"], capture_output=True, text=True).stdout
    assert f"Version: {checks['criu version']['value']}" in version
    assert all(c["fix"] for c in checks.values() if c["status"] != "PASS")


@pytest.mark.integration
@NEEDS_ROOT
def test_probes_on_this_machine() -> None:
    # A socket in a fresh netns accepts TCP_REPAIR as root ...
    assert doctor.probe_tcp_repair() is None
    # ... and not as nobody, who cannot even make the netns.
    probe = "from skyferry.pipeline.agent.doctor import probe_tcp_repair; print(probe_tcp_repair())"
    nobody = subprocess.run([*NOBODY, sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert doctor.tcp_repair_result(int(nobody.stdout)).status is Status.FAIL

    assert doctor.probe_netns() is None
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert f"sfdoctor-{os.getpid()}-" not in names  # the scratch netns is gone


@pytest.mark.integration
@NEEDS_ROOT
def test_criu_probe_cache_on_this_machine(tmp_path: Path) -> None:
    """The bootstrapped CRIU names /run/criu, a tmpfs; a build that names another directory is read as
    such (the positive control: the path comes from the binary, not from an assumption)."""
    assert doctor.probe_kdat_cache("/usr/local/sbin/criu") == ("/run/criu", "tmpfs")
    other = tmp_path / "criu"
    other.write_bytes(b"\x7fELF\x00Loaded kdat cache from %s\x00" + str(tmp_path).encode() + b"/criu.kdat\x00\x00")
    other.chmod(0o755)
    assert doctor.probe_kdat_cache(str(other)) == (str(tmp_path), engines.fstype(tmp_path))
    assert doctor.probe_kdat_cache(str(tmp_path / "nothing")) == (None, None)


@pytest.mark.integration
@NEEDS_ROOT
def test_doctor_as_nobody_fails_on_root() -> None:
    proc = subprocess.run([*NOBODY, SKYFERRY, "doctor", "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    checks = {c["name"]: c for c in json.loads(proc.stdout)["checks"]}
    assert checks["root"]["status"] == "FAIL"
    assert checks["network namespaces"]["status"] == "FAIL"
    assert checks["pre-copy (soft-dirty)"]["value"] is None  # unknown, not a guess
