"""The `vm` provider: QEMU VMs from the golden image (vmimage.py) on the local mesh's emulated WAN.

Each VM `<plan>-K` (plan "vm" by default: vm-1, vm-2, …) boots a qcow2 overlay of the golden image with a
NoCloud seed holding the caller's user-data, exactly what a cloud host gets. Its NIC is a tap on the
underlay bridge `br0` in the mesh's switch netns, with the static underlay address 198.18.0.(100+K)/24;
`Host.address` is that address, and WireGuard peers reach it at <address>:51820 (through the WAN relay
when the mesh has an rtt). QEMU runs under nice, with KVM only when `qemu.probe_kvm` proved it works.

Every VM is a row of `vm_hosts` in `<state>/skyferry.db` (this module's table), written before its QEMU
starts, so `destroy` removes exactly what was made, even after a crash: the recorded QEMU pid (its
cmdline checked first; QEMU also writes it to a pidfile in the VM's directory), the tap, the directory
(overlay, seed, console). Relays this provider started for VM pairs are rows of `vm_relays`.

The provider makes machines and puts them on the underlay; adding them to the mesh (keys, overlay
addresses) is the caller's (controller/provision.py), as for AWS and GCP.
"""

import builtins
import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from skyferry.netplane import netns, store, wan, wg
from skyferry.netplane.mesh import Mesh, Wan
from skyferry.netplane.wan import WanSpec

from . import qemu, vmimage
from .base import WIREGUARD_PORT, Host
from .errors import ProviderError
from .local import RELAY_BASE_PORT, SWITCH_ADDRESS, UNDERLAY
from .naming import UserData, missing_names, user_data_for

log = logging.getLogger(__name__)

DEFAULT_PLAN = "vm"
DEFAULT_MEMORY_MIB = 1024
DEFAULT_CPUS = 2
FIRST_ADDRESS = 100  # vm-K is 198.18.0.(100+K)
MAX_VMS = 150
NICE = 10
SIZE_RE = re.compile(r"(\d+)cpu-(\d+)(g|m)")
SIZE_HINT = "sizes are NcpuMg or NcpuMm, e.g. 2cpu-2g or 1cpu-512m (1-8 vCPUs, 256 MiB-16 GiB)"

SCHEMA = """
CREATE TABLE IF NOT EXISTS vm_hosts (
  name TEXT PRIMARY KEY, plan TEXT NOT NULL, mesh TEXT NOT NULL, address TEXT NOT NULL, mac TEXT NOT NULL,
  netns TEXT NOT NULL, tap TEXT NOT NULL, dir TEXT NOT NULL, memory_mib INTEGER NOT NULL, cpus INTEGER NOT NULL,
  accelerator TEXT, pid INTEGER, created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS vm_relays (
  pid INTEGER PRIMARY KEY, plan TEXT NOT NULL, netns TEXT NOT NULL, ports TEXT NOT NULL  -- JSON {pair: port}
);
"""
TABLES = ("vm_hosts", "vm_relays")


# --- sizes and names ---------------------------------------------------------------------------------


def parse_size(size: str | None) -> tuple[int, int]:
    """(vCPUs, MiB) from "2cpu-2g" / "1cpu-512m"; None is the default 2 vCPUs, 1 GiB."""
    if size is None:
        return DEFAULT_CPUS, DEFAULT_MEMORY_MIB
    m = SIZE_RE.fullmatch(size.strip().lower())
    if not m:
        raise ProviderError(f"unknown VM size {size!r}", hint=SIZE_HINT)
    cpus, memory = int(m[1]), int(m[2]) * (1024 if m[3] == "g" else 1)
    if not 1 <= cpus <= 8 or not 256 <= memory <= 16 * 1024:
        raise ProviderError(f"VM size {size!r} is out of range", hint=SIZE_HINT)
    return cpus, memory


def vm_name(plan: str, index: int) -> str:
    return f"{plan}-{index}"


def vm_index(plan: str, name: str) -> int | None:
    m = re.fullmatch(rf"{re.escape(plan)}-(\d+)", name)
    return int(m[1]) if m and int(m[1]) >= 1 else None


def missing_vms(plan: str, existing: builtins.list[str], count: int) -> builtins.list[str]:
    """Names to create so that `count` VMs exist, 1-based (vm-1 …), filling gaps left by earlier removals."""
    return missing_names(plan, existing, count, first=1)


def underlay_address(index: int) -> str:
    if not 1 <= index <= MAX_VMS:
        raise ProviderError(f"VM index {index} has no underlay address", hint=f"at most {MAX_VMS} VMs per mesh")
    return str(UNDERLAY[FIRST_ADDRESS + index])


# --- the store ---------------------------------------------------------------------------------------


@dataclass
class VmRecord:
    """One VM as recorded: enough to find and remove everything it made without asking QEMU."""

    name: str
    plan: str
    mesh: str
    address: str
    mac: str
    netns: str
    tap: str
    dir: str
    memory_mib: int
    cpus: int
    accelerator: str | None
    pid: int | None
    created: float

    @property
    def console(self) -> Path:
        return Path(self.dir) / "console.log"

    @property
    def agent(self) -> qemu.GuestAgent:
        return qemu.GuestAgent(Path(self.dir) / "qga.sock")

    def alive(self) -> bool:
        return _is_our_qemu(self.pid, self.dir)

    def console_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.console.read_text(errors="replace").splitlines()[-lines:])
        return ""


@contextmanager
def _db(state: Path, write: bool = True) -> Iterator[sqlite3.Connection]:
    with closing(store.connect(state, SCHEMA)) as conn:
        if write:
            with store.immediate(conn):
                yield conn
        else:
            yield conn


def records(state: Path, plan: str | None = None) -> builtins.list[VmRecord]:
    """Every recorded VM (of `plan`), in creation order."""
    if not (Path(state) / store.FILE).exists():
        return []
    with _db(state, write=False) as conn:
        rows = conn.execute("SELECT * FROM vm_hosts ORDER BY created, name").fetchall()
    found = [VmRecord(**dict(r)) for r in rows]
    return [r for r in found if plan in (None, r.plan)]


def record(state: Path, name: str) -> VmRecord | None:
    return next((r for r in records(state) if r.name == name), None)


def _save(state: Path, rec: VmRecord) -> None:
    cols = list(asdict(rec))
    sql = (
        f"INSERT INTO vm_hosts ({','.join(cols)}) VALUES ({','.join('?' * len(cols))})"
        f" ON CONFLICT(name) DO UPDATE SET {', '.join(f'{c}=excluded.{c}' for c in cols[1:])}"
    )
    with _db(state) as conn:
        conn.execute(sql, tuple(asdict(rec).values()))


def _forget(state: Path, name: str) -> None:
    with _db(state) as conn:
        conn.execute("DELETE FROM vm_hosts WHERE name=?", (name,))


# --- processes ---------------------------------------------------------------------------------------


def _cmdline(pid: int) -> builtins.list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _is_our_qemu(pid: int | None, vm_dir: str) -> bool:
    """True only for a live QEMU whose command line names this VM's own directory."""
    if not pid:
        return False
    argv = _cmdline(pid)
    return bool(argv) and Path(argv[0]).name == qemu.QEMU and any(vm_dir in a for a in argv)


def _pidfile_pid(vm_dir: str) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int((Path(vm_dir) / "qemu.pid").read_text().strip())
    return None


def _terminate(pid: int, matches: Callable[[], bool], timeout: float = 10.0) -> bool:
    """SIGTERM, then SIGKILL, a process that `matches()` still identifies; True if one was stopped."""
    if not matches():
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while matches() and time.monotonic() < deadline:
        time.sleep(0.1)
    if matches():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        while matches() and time.monotonic() < deadline + 5:
            time.sleep(0.1)
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our child (same process as the boot)
    return True


def _check_tools() -> None:
    missing = [t for t in (qemu.QEMU, "qemu-img", "genisoimage", "mmdebstrap") if not shutil.which(t)]
    if missing:
        raise ProviderError(f"{', '.join(missing)} not found: VM hosts need QEMU and mmdebstrap", hint="make host")


# --- the provider ------------------------------------------------------------------------------------


class VmProvider:
    """VM hosts on this machine, on the underlay of the local mesh in `state` (`hosts up --vm`)."""

    name = "vm"

    def __init__(
        self,
        state: Path,
        nice: int = NICE,
        progress: Callable[[str], None] | None = None,
        recipe: vmimage.Recipe | None = None,
    ) -> None:
        self.state = Path(state)
        self.nice = nice
        self.progress = progress or log.info
        self.recipe = recipe

    # --- Provider protocol -------------------------------------------------------------------------

    def provision(
        self,
        plan: str,
        count: int,
        size: str | None = None,
        region: str | None = None,
        image: str | None = None,
        user_data: UserData = None,
    ) -> builtins.list[Host]:
        """Ensure VMs plan-1 … plan-count exist; boots the missing ones and returns them all (not yet ready).

        `region` and `image` are not taken: a VM runs here, from the golden image of this checkout.
        """
        plan = plan or DEFAULT_PLAN
        if region or image:
            raise ProviderError("the vm provider takes no region or image", hint="VMs boot the cached golden image")
        cpus, memory = parse_size(size)
        if not 1 <= count <= MAX_VMS:
            raise ProviderError(f"--count must be between 1 and {MAX_VMS}, not {count}")
        mesh = self._mesh()
        assert mesh.local is not None
        have = [r.name for r in records(self.state, plan)]
        new = missing_vms(plan, have, count)
        if new:
            _check_tools()
            self.progress(f"golden image: looking for {vmimage.CACHE_ROOT} entry (a first build takes minutes)")
            started = time.monotonic()
            img = vmimage.ensure_image(self.recipe)
            self.progress(f"golden image ready in {time.monotonic() - started:.0f} s: {img.dir}")
            accel = qemu.accelerator(img, nice=self.nice)
            self.progress(f"accelerator: {accel}" + ("" if accel == "kvm" else " (KVM did not boot a kernel here)"))
            relay = self._add_relay_pairs(mesh, plan, new)
            try:
                for name in new:
                    self._boot(mesh, plan, name, img, accel, cpus, memory, user_data_for(user_data, name))
            except BaseException:  # remove what this call made; earlier runs' VMs stay
                for rec in records(self.state, plan):
                    if rec.name in new:
                        self._remove(rec)
                if relay:
                    self._remove_relay(relay)
                raise
        return self.list(plan)

    def list(self, plan: str | None = None) -> builtins.list[Host]:
        return [self._host(r) for r in records(self.state, plan)]

    def wait_ready(self, hosts: builtins.list[Host], timeout: float = 900.0) -> builtins.list[Host]:
        """Wait until each VM's QEMU runs and its guest agent answers (the guest's systemd is up).

        cloud-init may still be running the user-data then; `cloud_init_status` waits for its end.
        """
        deadline = time.monotonic() + timeout
        started = time.monotonic()
        pending = [h.name for h in hosts]
        last_note = 0.0
        while pending:
            for name in list(pending):
                rec = self._record(name)
                if not rec.alive():
                    raise ProviderError(
                        f"VM {name}: QEMU is not running",
                        hint=f"console {rec.console}:\n{rec.console_tail()}\n{_qemu_log(rec)}",
                    )
                if rec.agent.ping(timeout=2.0):
                    pending.remove(name)
                    self.progress(f"{name}: guest agent answers after {time.monotonic() - started:.0f} s")
            if not pending:
                break
            if time.monotonic() > deadline:
                rec = self._record(pending[0])
                raise ProviderError(
                    f"VM {pending[0]}: guest agent silent after {timeout:.0f} s",
                    hint=f"console {rec.console}:\n{rec.console_tail()}",
                )
            if time.monotonic() - last_note > 30:
                last_note = time.monotonic()
                self.progress(f"waiting for {', '.join(pending)} to boot ({time.monotonic() - started:.0f} s)")
            time.sleep(2)
        names = {h.name for h in hosts}
        return [h for h in self.list() if h.name in names]

    def destroy(self, plan: str) -> builtins.list[str]:
        """Kill the plan's recorded QEMUs and relays, remove their taps and directories and forget them."""
        removed: builtins.list[str] = []
        for rec in records(self.state, plan):
            removed += self._remove(rec)
        with _db(self.state, write=False) as conn:
            relays = conn.execute("SELECT * FROM vm_relays WHERE plan=?", (plan,)).fetchall()
        for row in relays:
            removed += self._remove_relay(row["pid"])
        return removed

    def open_wireguard_port(self, plan: str, port: int = WIREGUARD_PORT) -> None:
        """Nothing to open: the VMs sit on the underlay bridge, with no firewall in between."""

    # --- beyond the protocol -----------------------------------------------------------------------

    def plans(self) -> builtins.list[str]:
        """Every plan with a recorded VM or relay (for `hosts down`)."""
        if not (self.state / store.FILE).exists():
            return []
        with _db(self.state, write=False) as conn:
            rows = conn.execute("SELECT plan FROM vm_hosts UNION SELECT plan FROM vm_relays").fetchall()
        return sorted(r["plan"] for r in rows)

    def exec(self, name: str, argv: builtins.list[str], timeout: float = 300.0) -> tuple[int, str, str]:
        """Run argv in VM `name` through qemu-guest-agent: (exit code, stdout, stderr)."""
        rec = self._record(name)
        if not rec.alive():
            raise ProviderError(f"VM {name} is not running", hint="skyferry hosts down, then up again")
        return rec.agent.exec(argv, timeout=timeout)

    def cloud_init_status(self, name: str, timeout: float = 900.0) -> tuple[int, str]:
        """Wait for cloud-init's end in VM `name`: (rc of `cloud-init status --wait --long`, its output).

        rc 0 is "done"; 1 is an error in the user-data's own steps, which is the user-data's business.
        """
        rc, out, err = self.exec(name, ["cloud-init", "status", "--wait", "--long"], timeout=timeout)
        return rc, out + err

    # --- internals ---------------------------------------------------------------------------------

    def _mesh(self) -> Mesh:
        if not Mesh.exists(self.state):
            raise ProviderError(
                f"no mesh in {self.state}: VMs join the local mesh's underlay",
                hint="skyferry hosts up --vm creates one; or run skyferry hosts up --local first",
            )
        mesh = Mesh.load(self.state)
        if mesh.local is None or not netns.exists(mesh.local.switch_netns):
            raise ProviderError(
                f"mesh {mesh.name} has no local underlay on this machine", hint="skyferry hosts down, then up again"
            )
        return mesh

    def _record(self, name: str) -> VmRecord:
        rec = record(self.state, name)
        if rec is None:
            known = ", ".join(r.name for r in records(self.state)) or "none"
            raise ProviderError(f"unknown VM {name!r}", hint=f"VMs here: {known}")
        return rec

    def _boot(
        self, mesh: Mesh, plan: str, name: str, img: vmimage.Image, accel: str, cpus: int, memory: int,
        user_data: str | None,
    ) -> None:  # fmt: skip
        assert mesh.local is not None
        index = vm_index(plan, name)
        assert index is not None
        address = underlay_address(index)
        spec = qemu.VmSpec(
            prefix=mesh.name, name=name, image=img, memory_mib=memory, cpus=cpus,
            user_data=user_data or "#cloud-config\n{}\n",
            netns=mesh.local.switch_netns, bridge="br0", workdir=self.state / "vm", accel=accel, nice=self.nice,
        )  # fmt: skip
        spec = dataclasses.replace(
            spec,
            network_config=qemu.static_network_config(spec.mac_address, f"{address}/{UNDERLAY.prefixlen}"),
            extra_args=("-pidfile", str(spec.dir / "qemu.pid")),  # found by `destroy` even if we crash next
        )
        rec = VmRecord(
            name=name, plan=plan, mesh=mesh.name, address=address, mac=spec.mac_address,
            netns=mesh.local.switch_netns, tap=spec.tap, dir=str(spec.dir), memory_mib=memory, cpus=cpus,
            accelerator=accel, pid=None, created=time.time(),
        )  # fmt: skip
        _save(self.state, rec)  # before anything exists: `destroy` can always find what follows
        self.progress(f"{name}: booting ({cpus} vCPU, {memory} MiB, {accel}) at {address} on {spec.tap}")
        vm = qemu.boot(spec)
        rec.pid = vm.pid
        _save(self.state, rec)
        if mesh.wan and mesh.wan.rate:
            rate = WanSpec.parse(f"rate={mesh.wan.rate}").rate
            assert rate is not None
            wan.shape(mesh.local.switch_netns, spec.tap, rate)  # the VM's download; its upload is its own

    def _remove(self, rec: VmRecord) -> builtins.list[str]:
        removed = []
        pids = {p for p in (rec.pid, _pidfile_pid(rec.dir)) if p}
        for pid in pids:
            if _terminate(pid, lambda pid=pid: _is_our_qemu(pid, rec.dir)):  # type: ignore[misc]
                removed.append(f"process {pid} (QEMU {rec.name})")
        if netns.exists(rec.netns) and _run_ok(["ip", "-n", rec.netns, "link", "del", rec.tap]):
            removed.append(f"tap {rec.tap}")
        if Path(rec.dir).exists():
            shutil.rmtree(rec.dir)
            removed.append(f"dir {rec.dir}")
        parent = Path(rec.dir).parent
        if parent.exists() and not any(parent.iterdir()):
            parent.rmdir()
        _forget(self.state, rec.name)
        removed.append(f"VM {rec.name}")
        return removed

    def _add_relay_pairs(self, mesh: Mesh, plan: str, new: builtins.list[str]) -> int | None:
        """Relay ports for each new VM with every member and every other VM, in one new relay process.

        Running relays are left alone (a relay's pairs are fixed when it starts), so every existing pair,
        the local hosts' included, keeps its port and its datagrams in flight.
        """
        if not (mesh.wan and mesh.wan.rtt):
            return None
        assert mesh.local is not None
        rtt = WanSpec.parse(f"rtt={mesh.wan.rtt}").rtt
        assert rtt is not None
        endpoints = {m.name: m.endpoint for m in mesh.members}
        endpoints.update({r.name: f"{r.address}:{WIREGUARD_PORT}" for r in records(self.state)})
        for name in new:
            index = vm_index(plan, name)
            assert index is not None
            endpoints[name] = f"{underlay_address(index)}:{WIREGUARD_PORT}"
        taken = set(mesh.wan.relay_ports.values())
        port = max(taken | {RELAY_BASE_PORT - 1}) + 1
        ports: dict[str, int] = {}
        for name in new:
            for other in endpoints:
                pair = Wan.pair(name, other)
                if other == name or pair in mesh.wan.relay_ports or pair in ports:
                    continue
                ports[pair] = port
                port += 1
        if not ports:
            return None
        pairs = {p: tuple(endpoints[n] for n in pair.split(",")) for pair, p in ports.items()}
        pid = wan.start_relay(mesh.name, mesh.local.switch_netns, pairs, SWITCH_ADDRESS, rtt / 2)  # type: ignore[arg-type]
        with _db(self.state) as conn:
            conn.execute(
                "INSERT INTO vm_relays (pid, plan, netns, ports) VALUES (?,?,?,?)",
                (pid, plan, mesh.local.switch_netns, json.dumps(ports)),
            )
        mesh.wan.relay_ports.update(ports)
        mesh.wan.relay_address = SWITCH_ADDRESS
        mesh.persist()
        self.progress(f"WAN relay {pid}: {len(ports)} new pair(s), rtt {mesh.wan.rtt}")
        return pid

    def _remove_relay(self, pid: int) -> builtins.list[str]:
        """Stop one of our relays and take its ports out of the mesh (they route nowhere now)."""
        with _db(self.state, write=False) as conn:
            row = conn.execute("SELECT ports FROM vm_relays WHERE pid=?", (pid,)).fetchone()
        removed = [f"process {pid} (WAN relay)"] if wg.stop_process(pid, wan.RELAY_MARKER) else []
        if row and Mesh.exists(self.state):
            mesh = Mesh.load(self.state)
            if mesh.wan:
                for pair, port in json.loads(row["ports"]).items():
                    if mesh.wan.relay_ports.get(pair) == port:
                        del mesh.wan.relay_ports[pair]
                mesh.persist()
        with _db(self.state) as conn:
            conn.execute("DELETE FROM vm_relays WHERE pid=?", (pid,))
        return removed

    def _host(self, rec: VmRecord) -> Host:
        return Host(
            name=rec.name,
            provider=self.name,
            plan=rec.plan,
            id=f"{rec.mesh}-{rec.name}",
            address=rec.address,
            private_address=rec.address,
            state="running" if rec.alive() else "terminated",
            region="local",
            size=f"{rec.cpus}cpu-{rec.memory_mib}m",
            tags={
                "accelerator": rec.accelerator or "",
                "tap": rec.tap,
                "netns": rec.netns,
                "console": str(rec.console),
            },
        )


def _qemu_log(rec: VmRecord) -> str:
    with contextlib.suppress(OSError):
        return (Path(rec.dir) / "qemu.log").read_text(errors="replace")[-2000:]
    return ""


def _run_ok(argv: builtins.list[str]) -> bool:
    return subprocess.run(argv, capture_output=True, check=False).returncode == 0
