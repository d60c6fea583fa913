"""WireGuard through the `wg` tool: keys, the backend (kernel module or wireguard-go), peer updates."""

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from pyroute2 import IPRoute, NetlinkError

from . import netns
from .errors import NetplaneError

SOCKET_DIR = Path("/var/run/wireguard")
KERNEL = "kernel"
USERSPACE = "wireguard-go"
UDP_BUFFER = 7 << 20  # what wireguard-go sets on its own sockets since 2023 (socketBufferSize)
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33  # <asm-generic/socket.h>; root may exceed net.core.[rw]mem_max
SYS_PIDFD_GETFD = 438  # the same on x86_64 and arm64
# wireguard-go reads what the kernel sends from its TUN device's queue, 500 packets by default (~6 ms at
# 1 Gbit/s). Starved of CPU for longer, it dropped 5-14 % of a round's segments in an evacuation, and any
# of a container's packets alike: a client waited a retransmission timeout, 0.3-0.8 s. 2000 still
# overflowed (21,000 drops in two 8-container evacuations); 8000, about 11 MB, none (docs/netplane.md).
TUN_QUEUE = 8000
log = logging.getLogger("skyferry.netplane.wg")


def _run(argv: list[str], *, input: str | None = None) -> str:
    try:
        done = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise NetplaneError(f"{argv[0]} not found", hint="install wireguard-tools (make host)") from None
    if done.returncode != 0:
        raise NetplaneError(f"{' '.join(argv[:6])} failed: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def genkey(directory: Path) -> str:
    """Write a new private key to `directory`/private.key (0600) and return the public key."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    private = _run(["wg", "genkey"]).strip()
    key_file = directory / "private.key"
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(private + "\n")
    return _run(["wg", "pubkey"], input=private).strip()


def wireguard_go() -> str | None:
    """The wireguard-go binary ($SKYFERRY_WIREGUARD_GO overrides the name), if it is installed."""
    return shutil.which(os.environ.get("SKYFERRY_WIREGUARD_GO", "wireguard-go"))


def choose_backend(probe_netns: str | None) -> str:
    """The kernel module if a wireguard link can be made (probed inside `probe_netns`), else wireguard-go."""
    with IPRoute(netns=probe_netns) as ipr:
        try:
            ipr.link("add", ifname="wgprobe", kind="wireguard")
        except NetlinkError:
            pass
        else:
            ipr.link("del", index=ipr.link_lookup(ifname="wgprobe")[0])
            return KERNEL
    if wireguard_go():
        return USERSPACE
    raise NetplaneError(
        "no WireGuard backend: the kernel has no wireguard module and wireguard-go is not installed",
        hint="apt-get install wireguard-go wireguard-tools (or load the wireguard kernel module)",
    )


def start_interface(backend: str, ifname: str, netns_name: str | None, timeout: float = 10.0) -> int | None:
    """Create WireGuard interface `ifname` in `netns_name`; returns wireguard-go's pid (None for kernel)."""
    if len(ifname) > 15:
        raise NetplaneError(f"interface name {ifname} is longer than 15 characters")
    if backend == KERNEL:
        with IPRoute(netns=netns_name) as ipr:
            ipr.link("add", ifname=ifname, kind="wireguard")
        return None
    sock = SOCKET_DIR / f"{ifname}.sock"
    if sock.exists():
        raise NetplaneError(
            f"a wireguard-go control socket for {ifname} already exists ({sock})",
            hint="another mesh uses this interface name; pick another --name",
        )
    binary = wireguard_go()
    if binary is None:
        raise NetplaneError("wireguard-go is not installed", hint="apt-get install wireguard-go")
    # Foreground mode keeps wireguard-go as our own child, so `down` can kill exactly this pid.
    proc = subprocess.Popen(
        netns.command(netns_name, [binary, ifname]),
        env={**os.environ, "WG_PROCESS_FOREGROUND": "1", "LOG_LEVEL": "error"},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + timeout
    while not sock.exists() or not _has_link(netns_name, ifname):  # usable once both exist
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_process(proc.pid, ifname)
            raise NetplaneError(f"wireguard-go did not bring up {ifname} (exit code {proc.returncode})")
        time.sleep(0.005)
    with IPRoute(netns=netns_name) as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname=ifname)[0], txqlen=TUN_QUEUE)
    return proc.pid


def widen_buffers(pid: int) -> int:
    """Give wireguard-go `pid`'s UDP sockets (bound once its listen port is set) the buffers newer
    wireguard-go sets itself. Debian 12's 0.0.20220316 leaves them at net.core.rmem_default, 208 KiB,
    which a child netns cannot raise: a receiver on a busy host then dropped 12-27% of the datagrams
    (bench/README.md, "Where a byte goes"). Socket options belong to the socket, so they are set through
    a copy of its descriptor (pidfd_getfd). Returns how many sockets; a kernel that refuses is logged and
    leaves the link working, only slower."""
    inodes = set()
    for table in ("udp", "udp6"):
        with contextlib.suppress(OSError):
            inodes |= {line.split()[9] for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]}
    libc = ctypes.CDLL(None, use_errno=True)
    widened = 0
    pidfd = os.pidfd_open(pid)
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.removeprefix("socket:[").rstrip("]") not in inodes:
                continue
            copy = libc.syscall(SYS_PIDFD_GETFD, pidfd, int(fd), 0)
            if copy < 0:
                why = os.strerror(ctypes.get_errno())
                log.warning("cannot widen wireguard-go's UDP buffers (pid %d): %s", pid, why)
                return widened
            with socket.socket(fileno=copy) as sock:  # closes only our copy
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, UDP_BUFFER)
                sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, UDP_BUFFER)
            widened += 1
    finally:
        os.close(pidfd)
    return widened


def _has_link(netns_name: str | None, ifname: str) -> bool:
    with IPRoute(netns=netns_name) as ipr:
        return bool(ipr.link_lookup(ifname=ifname))


def process_matches(pid: int, marker: str) -> bool:
    """True if `pid` is alive and its command line mentions `marker` (guards against reused pids)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (FileNotFoundError, ProcessLookupError):
        return False
    return marker.encode() in cmdline


def stop_process(pid: int | None, marker: str, timeout: float = 5.0) -> bool:
    """SIGTERM then SIGKILL the process `pid` if it is still the one we started; True if it was running."""
    if pid is None or not process_matches(pid, marker):
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while process_matches(pid, marker):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
        _reap(pid)
        time.sleep(0.01)
    _reap(pid)
    return True


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def remove_socket(ifname: str) -> bool:
    sock = SOCKET_DIR / f"{ifname}.sock"
    if sock.exists():
        sock.unlink()
        return True
    return False


def wg(netns_name: str | None, *args: str) -> str:
    """Run `wg ARGS` as seen from `netns_name` (needed for kernel interfaces; harmless for wireguard-go)."""
    return _run(netns.command(netns_name, ["wg", *args]))


def backend_of(netns_name: str | None, ifname: str) -> str | None:
    """Which implementation runs `ifname`: the kernel's wireguard link, or wireguard-go's tun; None if absent."""
    with IPRoute(netns=netns_name) as ipr:
        links = ipr.get_links(ifname=ifname) if ipr.link_lookup(ifname=ifname) else []
    if not links:
        return None
    info = links[0].get_attr("IFLA_LINKINFO")
    return KERNEL if info is not None and info.get_attr("IFLA_INFO_KIND") == "wireguard" else USERSPACE
