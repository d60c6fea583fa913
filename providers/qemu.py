"""Start and drive one QEMU VM from a golden image (providers/vmimage.py): the building block of `vm` hosts.

A VM gets a qcow2 overlay on the golden disk, a NoCloud seed (iso9660 labelled `cidata`), its serial
console in a file, a qemu-guest-agent socket (exec without network or keys) and one NIC on a tap device
that lives in the caller's network namespace, optionally on a bridge there. Every object it creates (the
work directory, the tap) is named with the caller's unique prefix; `stop()` kills only the QEMU pid it
started and removes those objects.

KVM is used only when `probe_kvm()` saw a kernel print on the serial console under it: nested KVM here
opens /dev/kvm fine and then hangs before the first line.
"""

import base64
import contextlib
import hashlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from .errors import ProviderError
from .vmimage import CACHE_ROOT, Image

log = logging.getLogger(__name__)

QEMU = "qemu-system-x86_64"
DEFAULT_WORKDIR = Path("/var/lib/skyferry/vm")
KVM_PROBE_CACHE = CACHE_ROOT / "kvm-probe.json"
KVM_PROBE_TIMEOUT = 20.0
IFNAMSIZ = 15
KERNEL_ARGS = "root=/dev/vda rw console=ttyS0 net.ifnames=0 panic=-1"

_kvm_answer: bool | None = None


# --- accelerator -----------------------------------------------------------------------------------


def probe_kvm(image: Image, timeout: float = KVM_PROBE_TIMEOUT, nice: int = 10) -> bool:
    """True if a KVM guest prints kernel output within `timeout`; cached per host boot (and in-process)."""
    global _kvm_answer
    if _kvm_answer is not None:
        return _kvm_answer
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    with contextlib.suppress(OSError, ValueError, KeyError):
        saved = json.loads(KVM_PROBE_CACHE.read_text())
        if saved["boot_id"] == boot_id:
            _kvm_answer = bool(saved["kvm"])
            return _kvm_answer
    _kvm_answer = os.access("/dev/kvm", os.R_OK | os.W_OK) and _kvm_boots(image, timeout, nice)
    KVM_PROBE_CACHE.parent.mkdir(parents=True, exist_ok=True)
    KVM_PROBE_CACHE.write_text(json.dumps({"boot_id": boot_id, "kvm": _kvm_answer}))
    log.info("kvm probe: %s", "KVM works" if _kvm_answer else "no kernel output under KVM, using TCG")
    return _kvm_answer


def _kvm_boots(image: Image, timeout: float, nice: int) -> bool:
    """Boot the image's kernel (no disk) under KVM and watch the serial console for the kernel banner."""
    with tempfile.TemporaryDirectory(prefix="skyferry-kvmprobe-") as tmp:
        console = Path(tmp) / "console.log"
        argv = [
            *_nice(nice), QEMU, "-accel", "kvm", "-cpu", "host", "-m", "256", "-nodefaults", "-no-user-config",
            "-display", "none", "-no-reboot", "-serial", f"file:{console}",
            "-kernel", str(image.kernel), "-append", "console=ttyS0 panic=-1",
        ]  # fmt: skip
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and proc.poll() is None:
                if console.exists() and b"Linux version" in console.read_bytes():
                    return True
                time.sleep(0.2)
            return console.exists() and b"Linux version" in console.read_bytes()
        finally:
            _kill(proc)


def accelerator(image: Image, nice: int = 10) -> str:
    return "kvm" if probe_kvm(image, nice=nice) else "tcg"


# --- guest agent -----------------------------------------------------------------------------------


class GuestAgent:
    """A minimal qemu-guest-agent client: one JSON object per line over QEMU's unix socket."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def call(self, command: str, arguments: dict[str, Any] | None = None, timeout: float = 10.0) -> Any:
        """Run one command on a fresh connection, synchronised first so no stale reply is mistaken."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(self.path))
            reader = sock.makefile("rb")
            sync_id = secrets.randbelow(2**31)
            # 0xFF makes the agent drop any half-read input left by an earlier, abandoned client.
            sock.sendall(b"\xff" + _request("guest-sync-delimited", {"id": sync_id}))
            while self._reply(reader).get("return") != sync_id:
                pass
            sock.sendall(_request(command, arguments))
            reply = self._reply(reader)
        if "error" in reply:
            raise ProviderError(f"guest agent {command}: {reply['error'].get('desc', reply['error'])}")
        return reply.get("return")

    @staticmethod
    def _reply(reader: Any) -> dict[str, Any]:
        while True:
            line = reader.readline()
            if not line:
                raise ConnectionError("guest agent closed the connection")
            line = line.lstrip(b"\xff").strip()  # guest-sync-delimited prefixes its reply with 0xFF
            if line:
                with contextlib.suppress(ValueError):
                    return json.loads(line)

    def ping(self, timeout: float = 3.0) -> bool:
        try:
            self.call("guest-ping", timeout=timeout)
            return True
        except (OSError, ConnectionError):
            return False

    def exec(self, argv: list[str], timeout: float = 60.0) -> tuple[int, str, str]:
        """Run argv in the guest; returns (rc, stdout, stderr). rc is 128+N when killed by signal N."""
        # `timeout` in the guest, because the agent cannot kill a process it started.
        guarded = ["timeout", "-k", "5", str(max(1, int(timeout))), *argv]
        args = {"path": guarded[0], "arg": guarded[1:], "capture-output": True}
        pid = self.call("guest-exec", args)["pid"]
        deadline = time.monotonic() + timeout + 15
        delay = 0.05
        while time.monotonic() < deadline:
            status = self.call("guest-exec-status", {"pid": pid})
            if status.get("exited"):
                rc = status["exitcode"] if "exitcode" in status else 128 + status.get("signal", 0)
                return rc, _b64(status.get("out-data")), _b64(status.get("err-data"))
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
        raise ProviderError(f"guest command {argv!r} did not finish within {timeout:.0f} s")


def _request(command: str, arguments: dict[str, Any] | None) -> bytes:
    msg: dict[str, Any] = {"execute": command}
    if arguments is not None:
        msg["arguments"] = arguments
    return json.dumps(msg).encode() + b"\n"


def _b64(data: str | None) -> str:
    return base64.b64decode(data).decode(errors="replace") if data else ""


# --- the VM ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VmSpec:
    """What to boot. `prefix` is unique per caller (e.g. "t" + 4 hex) and names every object created."""

    prefix: str
    name: str
    image: Image
    memory_mib: int = 1024
    cpus: int = 1
    user_data: str = "#cloud-config\n{}\n"
    network_config: str | None = None  # NoCloud `network-config` (v2); None lets cloud-init fall back
    netns: str | None = None  # where the tap lives; None is this process's netns
    bridge: str | None = None  # a bridge in `netns` to put the tap on
    mac: str | None = None  # None: derived from prefix and name
    workdir: Path = DEFAULT_WORKDIR
    accel: str | None = None  # "kvm" or "tcg"; None probes
    nice: int = 0  # > 0 leaves CPU to other work on small hosts
    extra_args: tuple[str, ...] = field(default_factory=tuple)

    @property
    def tap(self) -> str:
        return f"{self.prefix}-{self.name}"

    @property
    def dir(self) -> Path:
        return self.workdir / f"{self.prefix}-{self.name}"

    @property
    def mac_address(self) -> str:
        if self.mac:
            return self.mac
        digest = hashlib.sha256(f"{self.prefix}/{self.name}".encode()).digest()
        return "52:54:00:" + ":".join(f"{b:02x}" for b in digest[:3])  # 52:54:00 is QEMU's local OUI


def static_network_config(mac: str, address: str, gateway: str | None = None) -> str:
    """A NoCloud v2 network-config giving the NIC with `mac` the address `address` ("a.b.c.d/len")."""
    eth: dict[str, Any] = {"match": {"macaddress": mac}, "set-name": "eth0", "addresses": [address]}
    if gateway:
        eth["routes"] = [{"to": "0.0.0.0/0", "via": gateway}]
    return json.dumps({"version": 2, "ethernets": {"eth0": eth}}, indent=2) + "\n"  # JSON is valid YAML


@dataclass
class Vm:
    spec: VmSpec
    proc: subprocess.Popen[bytes]
    accelerator: str
    console: Path
    agent: GuestAgent
    started: float

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def exec(self, argv: list[str], timeout: float = 60.0) -> tuple[int, str, str]:
        return self.agent.exec(argv, timeout)

    def console_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.console.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def wait_ready(self, timeout: float = 900.0) -> float:
        """Wait until the guest agent answers and cloud-init has finished; returns seconds since boot."""
        deadline = time.monotonic() + timeout
        while not self.agent.ping():
            self._check_running()
            if time.monotonic() > deadline:
                raise ProviderError(
                    f"VM {self.spec.name}: guest agent silent after {timeout:.0f} s",
                    hint=f"serial console {self.console}:\n{self.console_tail()}",
                )
            time.sleep(2)
        log.info("vm %s: guest agent up after %.0f s", self.spec.name, time.monotonic() - self.started)
        remaining = max(10.0, deadline - time.monotonic())
        rc, out, err = self.exec(["cloud-init", "status", "--wait", "--long"], timeout=remaining)
        if rc != 0:
            raise ProviderError(f"VM {self.spec.name}: cloud-init did not finish cleanly (rc {rc}): {out} {err}")
        ready = time.monotonic() - self.started
        log.info("vm %s: ready (cloud-init done) after %.0f s", self.spec.name, ready)
        return ready

    def _check_running(self) -> None:
        if not self.alive():
            raise ProviderError(
                f"VM {self.spec.name}: QEMU exited with {self.proc.returncode}",
                hint=(self.spec.dir / "qemu.log").read_text(errors="replace")[-2000:] + self.console_tail(),
            )

    def stop(self, keep_console: Path | None = None) -> None:
        """Kill our QEMU, then remove the tap and the work directory (overlay, seed, sockets)."""
        _kill(self.proc)
        if keep_console and self.console.exists():
            shutil.copyfile(self.console, keep_console)
        _remove_tap(self.spec)
        shutil.rmtree(self.spec.dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def boot(spec: VmSpec) -> Vm:
    """Create the overlay, seed and tap, and start QEMU. Returns at once; call `wait_ready()` next."""
    if len(spec.tap) > IFNAMSIZ:  # truncating could make two VMs' taps collide
        raise ProviderError(f"tap name {spec.tap!r} is longer than {IFNAMSIZ}", hint="use a shorter prefix or name")
    if spec.dir.exists():
        raise ProviderError(f"{spec.dir} exists", hint="prefixes must be unique; stop the VM that uses it first")
    accel = spec.accel or accelerator(spec.image, spec.nice)
    spec.dir.mkdir(parents=True, mode=0o700)
    try:
        overlay = _make_overlay(spec)
        seed = _make_seed(spec)
        _add_tap(spec)
        proc = _start_qemu(spec, accel, overlay, seed)
    except BaseException:
        _remove_tap(spec)
        shutil.rmtree(spec.dir, ignore_errors=True)
        raise
    log.info("vm %s: QEMU pid %d (%s)", spec.name, proc.pid, accel)
    return Vm(spec, proc, accel, spec.dir / "console.log", GuestAgent(spec.dir / "qga.sock"), time.monotonic())


def _make_overlay(spec: VmSpec) -> Path:
    overlay = spec.dir / "overlay.qcow2"
    _run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(spec.image.disk), str(overlay)])
    return overlay


def _make_seed(spec: VmSpec) -> Path:
    """The NoCloud seed: an iso9660 volume labelled `cidata` holding user-data, meta-data, network-config."""
    files = spec.dir / "seed"
    files.mkdir()
    (files / "user-data").write_text(spec.user_data)
    (files / "meta-data").write_text(f"instance-id: {spec.prefix}-{spec.name}\nlocal-hostname: {spec.name}\n")
    if spec.network_config is not None:
        (files / "network-config").write_text(spec.network_config)
    seed = spec.dir / "seed.iso"
    _run(["genisoimage", "-quiet", "-output", str(seed), "-volid", "cidata", "-joliet", "-rock", str(files)])
    shutil.rmtree(files)
    return seed


def _ip(spec: VmSpec) -> list[str]:
    return ["ip", "-n", spec.netns] if spec.netns else ["ip"]


def _add_tap(spec: VmSpec) -> None:
    # A persistent tap made here, in the caller's netns; QEMU (started in that netns) attaches to it by name.
    _run([*_ip(spec), "tuntap", "add", "dev", spec.tap, "mode", "tap"])
    if spec.bridge:
        _run([*_ip(spec), "link", "set", spec.tap, "master", spec.bridge])
    _run([*_ip(spec), "link", "set", spec.tap, "up"])


def _remove_tap(spec: VmSpec) -> None:
    subprocess.run([*_ip(spec), "link", "del", spec.tap], capture_output=True, check=False)


def qemu_argv(spec: VmSpec, accel: str, overlay: Path, seed: Path) -> list[str]:
    cpu = "host" if accel == "kvm" else "max"
    return [
        QEMU, "-name", f"{spec.prefix}-{spec.name}",
        "-machine", "q35", "-accel", accel, "-cpu", cpu, "-m", str(spec.memory_mib), "-smp", str(spec.cpus),
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-kernel", str(spec.image.kernel), "-initrd", str(spec.image.initrd), "-append", KERNEL_ARGS,
        # cache=unsafe: the overlay is thrown away with the VM, so host flushes buy nothing.
        "-drive", f"file={overlay},if=virtio,format=qcow2,cache=unsafe,discard=unmap",
        "-drive", f"file={seed},if=virtio,format=raw,readonly=on",
        "-serial", f"file:{spec.dir / 'console.log'}",
        "-chardev", f"socket,id=qga0,path={spec.dir / 'qga.sock'},server=on,wait=off",
        "-device", "virtio-serial-pci", "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
        "-netdev", f"tap,id=net0,ifname={spec.tap},script=no,downscript=no",
        "-device", f"virtio-net-pci,netdev=net0,mac={spec.mac_address}",
        "-device", "virtio-rng-pci",  # entropy early in boot, under TCG too
        *spec.extra_args,
    ]  # fmt: skip


def _start_qemu(spec: VmSpec, accel: str, overlay: Path, seed: Path) -> subprocess.Popen[bytes]:
    # `nice` and `ip netns exec` both exec, so the pid we hold ends up being QEMU's own.
    netns = ["ip", "netns", "exec", spec.netns] if spec.netns else []
    argv = [*_nice(spec.nice), *netns, *qemu_argv(spec, accel, overlay, seed)]
    with (spec.dir / "qemu.log").open("wb") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
    time.sleep(0.5)
    if proc.poll() is not None:
        raise ProviderError(
            f"QEMU for {spec.name} exited at once ({proc.returncode})",
            hint=(spec.dir / "qemu.log").read_text(errors="replace")[-2000:],
        )
    return proc


def _nice(level: int) -> list[str]:
    return ["nice", "-n", str(level)] if level > 0 else []


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """Terminate a process we started (by its Popen, never by name) and reap it."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def _run(argv: list[str]) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise ProviderError(f"{' '.join(argv[:3])} failed: {result.stderr.strip() or result.stdout.strip()}")
