"""`skyferry doctor`: is this host able to run live migrations, and how?

Each check is two small functions: a probe that looks at the machine (runs a command, reads /proc,
creates a scratch namespace) and a pure decision that turns what the probe saw into a CheckResult.
Unit tests feed the decisions real outputs captured from real machines.
"""

import ctypes
import errno
import os
import re
import secrets
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from skyferry.pipeline.criu import version as criu_version
from skyferry.pipeline.criu.version import PRECOPY_ENV, PRECOPY_SOFT_DIRTY
from skyferry.pipeline.runtimes import engines
from skyferry.pipeline.runtimes.runc import Runc

PIPE_MAX_MIN = 4 * 1024 * 1024  # lazy pages splice up to 4 MiB per pipe
# CRIU dumps a container's conntrack entries and expectations with two netlink dumps that each walk every
# bucket of the host-wide table, inside the freeze: ~10 ms each at the 262144 buckets a > 4 GiB host gets.
CONNTRACK_BUCKETS_MAX = 32768
CONNTRACK_BUCKETS = Path("/proc/sys/net/netfilter/nf_conntrack_buckets")
CAP_SYS_RESOURCE = 24
TCP_REPAIR = 19  # linux/tcp.h; the socket module does not export it
CLONE_NEWNET = 0x40000000
BOOTSTRAP = "run `make host` (scripts/bootstrap-host.sh) as root"
UNCHECKED_FIX = "run `skyferry doctor` as root once CRIU 4.2 is installed (`make host`)"


class Status(StrEnum):
    PASS = "PASS"  # ready
    WARN = "WARN"  # works, but slower or with a feature off
    FAIL = "FAIL"  # migrations will fail until fixed


@dataclass(frozen=True)
class CheckResult:
    """One line of the report. `value` is the machine-readable finding (a version, a method name)."""

    name: str
    status: Status
    detail: str
    fix: str = ""
    value: str | None = None

    def as_dict(self) -> dict[str, str | None]:
        return asdict(self) | {"status": str(self.status)}


@dataclass(frozen=True)
class Output:
    """What a command printed (stdout and stderr together) and its exit code."""

    rc: int
    text: str

    @property
    def first_line(self) -> str:
        return next((line.strip() for line in self.text.splitlines() if line.strip()), "")


def run(argv: Sequence[str], timeout: float = 30) -> Output | None:
    """Run a command; None when the program is not installed."""
    if shutil.which(argv[0]) is None:
        return None
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Output(-1, str(exc))
    return Output(proc.returncode, (proc.stdout + proc.stderr).strip())


def _version(text: str) -> str | None:
    m = re.search(r"\bv?(\d+\.\d+(?:\.\d+)?(?:[-+~][\w.+~-]*)?)", text)
    return m.group(1) if m else None


# --- decisions: pure functions of what the probes saw ---


def root_result(euid: int) -> CheckResult:
    if euid == 0:
        return CheckResult("root", Status.PASS, "running as root")
    return CheckResult(
        "root",
        Status.FAIL,
        f"running as uid {euid}; CRIU, namespaces and TCP repair need root",
        "run as root",
    )


def criu_version_result(version_output: Output | None, binary: str = "criu") -> CheckResult:
    name = "criu version"
    if version_output is None:
        return CheckResult(name, Status.FAIL, "criu is not installed", BOOTSTRAP)
    version = criu_version.parse(version_output.text)
    if version is None:
        return CheckResult(name, Status.FAIL, f"cannot read the version of {binary}", BOOTSTRAP)
    if criu_version.too_old(version):
        detail = (
            f"CRIU {version} at {binary} is too old: kernels >= 6.16 need 4.2 "
            "(3.x fails on the [vvar_vclock] vDSO, 4.1 cannot dump inet sockets)"
        )
        return CheckResult(name, Status.FAIL, detail, BOOTSTRAP + " to build CRIU 4.2.1", version)
    return CheckResult(name, Status.PASS, f"CRIU {version} at {binary}", value=version)


def pycriu_result(pycriu_version: str | None, criu_version: str | None) -> CheckResult:
    name = "pycriu"
    if pycriu_version is None:
        return CheckResult(name, Status.FAIL, "pycriu is not importable", "run `make venv`")
    if criu_version and pycriu_version.split(".")[:2] != criu_version.split(".")[:2]:
        detail = f"pycriu {pycriu_version} does not match CRIU {criu_version}; RPC fields may differ"
        return CheckResult(name, Status.WARN, detail, "reinstall pycriu from the CRIU source tree: `make venv`")
    return CheckResult(name, Status.PASS, f"pycriu {pycriu_version}", value=pycriu_version)


def criu_check_result(output: Output | None) -> CheckResult:
    name = "criu check"
    if output is None:
        return CheckResult(name, Status.FAIL, "criu is not installed", BOOTSTRAP)
    if output.rc == 0:
        return CheckResult(name, Status.PASS, output.text.splitlines()[-1] if output.text else "passed")
    errors = [line for line in output.text.splitlines() if line.startswith("Error")]
    detail = (errors[0] if errors else output.first_line) or f"exit code {output.rc}"
    return CheckResult(name, Status.FAIL, detail, "see `criu check`; " + BOOTSTRAP + " for CRIU 4.2.1")


def tcp_repair_result(err: int | None) -> CheckResult:
    """`err` is the errno of setsockopt(TCP_REPAIR) in a scratch netns, None when it worked."""
    name = "tcp repair"
    if err is None:
        return CheckResult(name, Status.PASS, "TCP_REPAIR accepted in a scratch network namespace")
    if err == errno.EPERM:
        return CheckResult(name, Status.FAIL, "TCP_REPAIR needs CAP_NET_ADMIN", "run as root")
    if err == errno.ENOPROTOOPT:
        detail = "the kernel has no TCP repair mode: established connections cannot move"
        return CheckResult(name, Status.FAIL, detail, "use a kernel with CONFIG_CHECKPOINT_RESTORE=y")
    return CheckResult(name, Status.FAIL, f"TCP_REPAIR failed: {os.strerror(err)}", "run as root")


def unchecked(output: Output | None) -> str | None:
    """Why CRIU could not answer a feature question at all (not installed, not root, too old)."""
    if output is None:
        return "criu is not installed"
    if "CAP_SYS_ADMIN" in output.text or "kernel features detection" in output.text:
        return output.first_line.rstrip(":")
    return None


def lazy_pages_result(output: Output | None) -> CheckResult:
    """`output` is `criu check --feature uffd-noncoop`."""
    name = "lazy pages (userfaultfd)"
    if output is not None and output.rc == 0:
        return CheckResult(name, Status.PASS, "userfaultfd works: post-copy (lazy pages) is available")
    if why := unchecked(output):
        return CheckResult(name, Status.WARN, f"unknown, CRIU could not check: {why}", UNCHECKED_FIX)
    return CheckResult(
        name,
        Status.WARN,
        f"no post-copy, migrations copy all memory before the restore ({output.first_line})",
        "use a kernel with CONFIG_USERFAULTFD=y",
    )


def precopy_result(output: Output | None) -> CheckResult:
    """`output` is `criu check --feature mem_dirty_track`; it decides which pre-copy runs (pre-copy moves
    runc containers only, and runc can pre-dump; Podman and Docker move by stop-copy)."""
    name = "pre-copy (soft-dirty)"
    if why := unchecked(output):
        return CheckResult(name, Status.WARN, f"unknown, CRIU could not check: {why}", UNCHECKED_FIX)
    soft_dirty = output is not None and output.rc == 0
    method = criu_version.precopy_method(soft_dirty, Runc.pre_dumps)
    if soft_dirty:
        how = "CRIU's iterative pre-dump" if method == PRECOPY_SOFT_DIRTY else f"forced by ${PRECOPY_ENV}"
        return CheckResult(name, Status.PASS, f"soft-dirty tracking works; pre-copy: {method} ({how})", value=method)
    # CRIU says "Warn  (criu/cr-check.c:824): Dirty tracking is OFF. Memory snapshot will not work."
    why = re.sub(r"^\w+\s+\([^)]*\):\s*", "", output.first_line).split(".")[0] if output else ""
    return CheckResult(
        name,
        Status.WARN,
        f"no soft-dirty tracking ({why}); pre-copy: {method} (live memory hashed each round)",
        "for CRIU's iterative pre-dump use a kernel with CONFIG_MEM_SOFT_DIRTY=y (most x86_64 cloud kernels)",
        method,
    )


def pipe_max_size_result(value: int, cap_eff: int) -> CheckResult:
    """`value` is fs.pipe-max-size; `cap_eff` the effective capability mask (/proc/self/status)."""
    name = "fs.pipe-max-size"
    fix = f"sysctl -w fs.pipe-max-size={PIPE_MAX_MIN} (scripts/bootstrap-host.sh also persists it)"
    if value >= PIPE_MAX_MIN:
        return CheckResult(name, Status.PASS, f"{value} bytes, enough for lazy pages", value=str(value))
    if cap_eff >> CAP_SYS_RESOURCE & 1:
        detail = f"{value} bytes; enough only while CRIU keeps CAP_SYS_RESOURCE"
        return CheckResult(name, Status.WARN, detail, fix, str(value))
    detail = f"{value} bytes and no CAP_SYS_RESOURCE: lazy pages fail (`tee: Operation not permitted`)"
    return CheckResult(name, Status.FAIL, detail, fix, str(value))


def other_users_result(cap_eff: int) -> CheckResult:
    """CRIU reads every task's rlimits with prlimit(2); for another user's task (a container run with
    --user) that needs CAP_SYS_RESOURCE, so without it only root containers can be checkpointed."""
    name = "dump --user containers"
    if cap_eff >> CAP_SYS_RESOURCE & 1:
        return CheckResult(name, Status.PASS, "root has CAP_SYS_RESOURCE: CRIU can dump non-root tasks", value="yes")
    detail = "root lacks CAP_SYS_RESOURCE: a container run with --user cannot migrate from here (check refuses it)"
    fix = "run the agent with root's full capabilities (not inside a container that drops CAP_SYS_RESOURCE)"
    return CheckResult(name, Status.WARN, detail, fix, "no")


def wireguard_result(module: str, wireguard_go: Output | None, wg: Output | None) -> CheckResult:
    """`module` is "loaded", "loadable" or "missing"; the outputs are `wireguard-go --version` and
    `wg --version`."""
    name = "wireguard"
    if wg is None:
        return CheckResult(name, Status.FAIL, "the `wg` tool is missing", "apt-get install wireguard-tools")
    if module in ("loaded", "loadable"):
        return CheckResult(name, Status.PASS, f"kernel module ({module})", value="kernel")
    if wireguard_go is not None:
        version = _version(wireguard_go.text) or "unknown version"
        detail = f"wireguard-go {version}, no kernel module: the userspace overlay is CPU-bound (< 1 Gbit/s)"
        return CheckResult(
            name, Status.WARN, detail, "use a kernel with CONFIG_WIREGUARD for kernel speed", "wireguard-go"
        )
    return CheckResult(
        name,
        Status.FAIL,
        "no WireGuard backend: neither the kernel module nor wireguard-go",
        "apt-get install wireguard-go (or load the wireguard kernel module)",
        "none",
    )


def runc_result(output: Output | None) -> CheckResult:
    if output is None or output.rc != 0:
        return CheckResult("runc", Status.FAIL, "runc is not installed", "apt-get install runc")
    version = _version(output.first_line) or output.first_line
    return CheckResult("runc", Status.PASS, f"runc {version}", value=version)


def podman_result(output: Output | None) -> CheckResult:
    if output is None or output.rc != 0:
        detail = "not installed: Podman containers cannot be migrated from or to this host"
        return CheckResult("podman", Status.WARN, detail, "apt-get install podman")
    version = _version(output.first_line) or output.first_line
    return CheckResult("podman", Status.PASS, f"Podman {version}", value=version)


def docker_result(client: Output | None, daemon: Output | None) -> CheckResult:
    """`client` is `docker --version`, `daemon` is `dockerd --version`."""
    fix = "apt-get install docker.io"
    if daemon is None or daemon.rc != 0:
        cli = f"docker CLI {_version(client.first_line)} but no dockerd" if client else "not installed"
        return CheckResult("docker", Status.WARN, f"{cli}: Docker containers cannot run on this host", fix)
    version = _version(daemon.first_line) or daemon.first_line
    if client is None:
        return CheckResult("docker", Status.WARN, f"dockerd {version} but no docker CLI", fix, version)
    return CheckResult("docker", Status.PASS, f"Docker {version}", value=version)


def network_lock_result(nft_lock: Output | None, iptables: Output | None) -> CheckResult:
    """`nft_lock` is `criu check --feature network_lock_nftables`, `iptables` is `iptables --version`."""
    name = "network lock"
    if nft_lock is not None and nft_lock.rc == 0:
        also = f"; {iptables.first_line} also present" if iptables and iptables.rc == 0 else ""
        return CheckResult(name, Status.PASS, f"nftables (CRIU has libnftables){also}", value="nftables")
    if iptables is not None and iptables.rc == 0:
        return CheckResult(name, Status.PASS, f"iptables: {iptables.first_line}", value="iptables")
    return CheckResult(
        name,
        Status.FAIL,
        "neither CRIU's nftables lock nor iptables: TCP connections would see resets during a dump",
        "apt-get install iptables",
    )


def favordynmods_result(favored: bool | None) -> CheckResult:
    """runc's restore moves CRIU into the container's cgroup inside the freeze; unless a cgroup2 mount
    favors such moves (favordynmods), each waits out an RCU grace period (8-13 ms measured here)."""
    name = "cgroup moves"
    if favored:
        return CheckResult(name, Status.PASS, "cgroup2 is mounted with favordynmods: no RCU wait per move")
    detail = "no cgroup2 mount" if favored is None else "cgroup2 is mounted without favordynmods"
    fix = f"{BOOTSTRAP} (or: mount -o remount,<its options>,favordynmods /sys/fs/cgroup)"
    return CheckResult(name, Status.WARN, f"{detail}: each restore waits ~10 ms more in the freeze", fix)


def kdat_cache_result(rundir: str | None, fstype: str | None) -> CheckResult:
    """CRIU keeps its kernel-feature probe in its build-time run directory (`rundir`, found in the binary),
    and only when that is a tmpfs (`fstype`); elsewhere every dump and restore probes again."""
    name = "criu probe cache"
    if rundir is None:
        return CheckResult(name, Status.WARN, "CRIU's binary names no criu.kdat path (unknown build)", BOOTSTRAP)
    if fstype == "tmpfs":
        return CheckResult(name, Status.PASS, f"{rundir} is a tmpfs: CRIU reuses its kernel probe", value=rundir)
    what = "missing" if fstype is None else f"on {fstype}, not a tmpfs"
    detail = f"{rundir} is {what}: every CRIU run probes the kernel again, ~40 ms (more under load) in the freeze"
    return CheckResult(name, Status.WARN, detail, f"{BOOTSTRAP}: it mounts a tmpfs on /run/criu", rundir)


def conntrack_result(buckets: int | None) -> CheckResult:
    """`buckets` is net.netfilter.nf_conntrack_buckets (None: no conntrack loaded, nothing to walk)."""
    name = "conntrack table"
    if buckets is None:
        return CheckResult(name, Status.PASS, "conntrack not loaded: CRIU's dump walks no table")
    if buckets <= CONNTRACK_BUCKETS_MAX:
        return CheckResult(name, Status.PASS, f"{buckets} buckets: CRIU's walk of them is short", value=str(buckets))
    cost = 2 * 10 * buckets / 262144  # two walks, 10 ms each per 262144 buckets (docs/migration.md)
    detail = f"{buckets} buckets: CRIU walks them twice in every checkpoint, ~{cost:.0f} ms of the freeze"
    fix = f"sysctl -w net.netfilter.nf_conntrack_buckets={CONNTRACK_BUCKETS_MAX} ({BOOTSTRAP} persists it)"
    return CheckResult(name, Status.WARN, detail, fix, str(buckets))


def netns_result(error: str | None) -> CheckResult:
    if error is None:
        return CheckResult("network namespaces", Status.PASS, "created and deleted a scratch netns")
    return CheckResult("network namespaces", Status.FAIL, error, "run as root with iproute2 installed")


# --- probes: look at this machine ---


def probe_tcp_repair() -> int | None:
    """setsockopt(TCP_REPAIR) on a socket in a fresh, anonymous netns; the errno, or None on success.

    The netns belongs to a short-lived thread only, so nothing is left behind and the root namespace
    is never touched."""
    result: list[int | None] = []

    def work() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(CLONE_NEWNET) != 0:
            result.append(ctypes.get_errno())
            return
        try:
            with socket.socket() as sock:
                sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 1)
            result.append(None)
        except OSError as exc:
            result.append(exc.errno)

    thread = threading.Thread(target=work, name="doctor-tcp-repair")
    thread.start()
    thread.join()
    return result[0]


def probe_netns() -> str | None:
    """Create, use and delete a uniquely named netns; None when all worked, else what failed."""
    if shutil.which("ip") is None:
        return "the `ip` tool (iproute2) is missing"
    name = f"sfdoctor-{os.getpid()}-{secrets.token_hex(2)}"
    created = run(["ip", "netns", "add", name])
    if created is None or created.rc != 0:
        return f"ip netns add failed: {created.first_line if created else 'ip missing'}"
    try:
        lo = run(["ip", "-n", name, "link", "set", "lo", "up"])
        if lo is None or lo.rc != 0:
            return f"cannot configure a new netns: {lo.first_line if lo else 'ip missing'}"
    finally:
        deleted = run(["ip", "netns", "del", name])
    if deleted is None or deleted.rc != 0:
        return f"ip netns del {name} failed: {deleted.first_line if deleted else 'ip missing'}"
    return None


def probe_wireguard_module() -> str:
    if Path("/sys/module/wireguard").exists():  # loaded, or built into the kernel
        return "loaded"
    dry_run = run(["modprobe", "--dry-run", "--quiet", "wireguard"])
    return "loadable" if dry_run is not None and dry_run.rc == 0 else "missing"


def probe_cap_eff() -> int:
    status = Path("/proc/self/status").read_text()
    m = re.search(r"^CapEff:\s*([0-9a-f]+)", status, re.M)
    return int(m.group(1), 16) if m else 0


def probe_kdat_cache(criu: str) -> tuple[str | None, str | None]:
    """CRIU's run directory, compiled into its binary as `<RUNDIR>/criu.kdat` (criu/kerndat.c), and the
    type of the file system there (None: missing)."""
    path = shutil.which(criu)
    if path is None:
        return None, None
    m = re.search(rb"([\x21-\x7e]*)/criu\.kdat\x00", Path(path).read_bytes())
    if m is None:
        return None, None
    rundir = m.group(1).decode()
    return rundir, engines.fstype(Path(rundir)) if os.path.isdir(rundir) else None


def probe_cgroup_favordynmods(mounts: Path = Path("/proc/mounts")) -> bool | None:
    """Whether a cgroup2 file system here is mounted with favordynmods (None: no cgroup2 mount)."""
    options = [f[3].split(",") for f in (line.split() for line in mounts.read_text().splitlines()) if f[2] == "cgroup2"]
    return any("favordynmods" in o for o in options) if options else None


def probe_conntrack_buckets() -> int | None:
    try:
        return int(CONNTRACK_BUCKETS.read_text())
    except FileNotFoundError:
        return None


def probe_pycriu_version() -> str | None:
    try:
        from pycriu.version import __version__
    except ImportError:
        return None
    return str(__version__)


def run_checks() -> list[CheckResult]:
    """Every check, in report order."""
    criu = criu_version.binary()
    version = criu_version_result(run([criu, "--version"]), criu)

    def feature(name: str) -> Output | None:
        return run([criu, "check", "--feature", name])

    def wireguard() -> CheckResult:
        return wireguard_result(probe_wireguard_module(), run(["wireguard-go", "--version"]), run(["wg", "--version"]))

    checks: list[Callable[[], CheckResult]] = [
        lambda: root_result(os.geteuid()),
        lambda: version,
        lambda: pycriu_result(probe_pycriu_version(), version.value),
        lambda: criu_check_result(run([criu, "check"])),
        lambda: tcp_repair_result(probe_tcp_repair()),
        lambda: lazy_pages_result(feature("uffd-noncoop")),
        lambda: precopy_result(feature("mem_dirty_track")),
        lambda: pipe_max_size_result(int(Path("/proc/sys/fs/pipe-max-size").read_text()), probe_cap_eff()),
        lambda: other_users_result(probe_cap_eff()),
        lambda: wireguard_result(
            probe_wireguard_module(), run(["wireguard-go", "--version"]), run(["wg", "--version"])
        ),
        lambda: runc_result(run(["runc", "--version"])),
        lambda: podman_result(run(["podman", "--version"])),
        lambda: docker_result(run(["docker", "--version"]), run(["dockerd", "--version"])),
        lambda: kdat_cache_result(*probe_kdat_cache(criu)),
        lambda: favordynmods_result(probe_cgroup_favordynmods()),
        lambda: conntrack_result(probe_conntrack_buckets()),
        lambda: network_lock_result(feature("network_lock_nftables"), run(["iptables", "--version"])),
        lambda: netns_result(probe_netns()),
    ]
    return [check() for check in checks]


def failed(results: Sequence[CheckResult]) -> bool:
    return any(r.status is Status.FAIL for r in results)


def report() -> dict[str, Any]:
    """Every check of this host, as `skyferry doctor --json` prints it (and GET /v1/doctor answers)."""
    results = run_checks()
    precopy = next((r.value for r in results if r.name.startswith("pre-copy")), None)
    return {"ok": not failed(results), "precopy_method": precopy, "checks": [r.as_dict() for r in results]}
