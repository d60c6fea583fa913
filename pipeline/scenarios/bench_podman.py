"""The bench's baseline: what a user would pick instead of skyferry, Podman's own checkpoint and restore.

The same counter service with the same incompressible memory runs in Podman on local-1, with a client on
local-3 holding one connection, and moves to local-2 as Podman's documentation and FIELD-NOTES §4 have
it, by hand:

1. `podman container checkpoint --export ARCHIVE --tcp-established --file-locks` (zstd, the default; the
   container stops);
2. the archive goes over the overlay, the same emulated WAN skyferry's streams take, from a plain TCP
   sender in local-1's netns to a receiver in local-2's (no TLS: kinder to the baseline than scp);
3. the container's netns, keeping its name and address, is wired to local-2 instead (a user would create
   one of the same name there: `restore` has no network option), and `podman container restore --import
   ARCHIVE --tcp-established --file-locks` runs in local-2's own Podman store;
4. the address is routed to local-2, with skyferry's own route publish (a user would need something).

Each step is timed, and the client's largest gap is measured as for skyferry's runs. Each host's Podman
has its own store, runroot and runc root (docs/engines.md, "Isolation"); the container runs the host's
python3 from a read-only /usr, as skyferry's runc containers do. Everything it made is removed, whatever
happens.
"""

import contextlib
import hashlib
import json
import shutil
import subprocess
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from skyferry.netplane import attach, netns, routes
from skyferry.netplane.ipam import Ipam
from skyferry.netplane.mesh import Mesh
from skyferry.pipeline.controller import agentctl
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.proctree import tree_rss
from skyferry.pipeline.scenarios import demo as scenario
from skyferry.pipeline.scenarios import workload_counter

SOURCE, TARGET, CLIENTS = "local-1", "local-2", "local-3"
NAME = "podman-baseline"
ULIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096"]  # root lacks CAP_SYS_RESOURCE
TRANSFER_PORT = 5301
# A receiver and a sender as small as `nc`, with the host's python3 (nc's flags differ between builds).
RECEIVE = """import socket, sys
srv = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("listening", flush=True)
conn, _ = srv.accept()
with conn, open(sys.argv[3], "wb") as f:
    while chunk := conn.recv(1 << 20):
        f.write(chunk)
"""
SEND = """import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2]))) as s, open(sys.argv[3], "rb") as f:
    s.sendfile(f)
"""


@dataclass
class Config:
    memory_mib: int = 64
    dirty_mb_s: float = 0.0
    settle_s: float = 2.0
    after_requests: int = 10
    ready_timeout_s: float = 180.0


class Store:
    """One host's own Podman: root, runroot, tmpdir, runc root and cgroup parent of its own."""

    def __init__(self, home: Path, cgroup_parent: str) -> None:
        self.home = home
        self.run_dir = Path("/run/skyferry-bench") / hashlib.sha256(str(home).encode()).hexdigest()[:12]
        self.cgroup_parent = cgroup_parent

    def __call__(self, *args: str, what: str, timeout: float = 300) -> str:
        base = ["podman", "--root", str(self.home / "root"), "--runroot", str(self.run_dir), "--tmpdir",
                str(self.home / "tmp"), "--runtime", "runc", "--runtime-flag", f"root={self.run_dir / 'runc'}",
                "--cgroup-manager", "cgroupfs", "--events-backend", "file", "--storage-driver", "overlay"]  # fmt: skip
        proc = subprocess.run([*base, *args], capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, check=False)  # fmt: skip
        if proc.returncode != 0:
            lines = [ln for ln in proc.stderr.splitlines() if ln.strip()] or [f"exit status {proc.returncode}"]
            raise SkyferryError(f"podman {what} failed: {lines[-1].strip()[-300:]}")
        return proc.stdout

    def destroy(self) -> None:
        """Its containers, then its files; Podman leaves overlay and shm mounts below its root."""
        with contextlib.suppress(SkyferryError, subprocess.SubprocessError):
            self("rm", "-a", "-f", "-t", "0", what="rm")
        for path in (self.home, self.run_dir):
            _unmount_below(path)
            shutil.rmtree(path, ignore_errors=True)
        with contextlib.suppress(OSError):  # the last store's goes with it
            self.run_dir.parent.rmdir()


def run(state: Path, mesh: Mesh, workdir: Path, cfg: Config) -> dict[str, Any]:
    """One baseline move, local-1 -> local-2; never raises: {"ok": False, "error"} says what failed."""
    out: dict[str, Any] = {"memory_mib": cfg.memory_mib, "ok": False, "error": None, "seconds": {}}
    home = state / "podman-baseline"
    cgroup = f"/skyferry-bench-{mesh.name}/podman"
    stores = {h: Store(home / h, cgroup) for h in (SOURCE, TARGET)}
    ns = f"{mesh.name}-pbase"
    ipam = Ipam(state)
    ip = ipam.allocate(f"bench:{NAME}")
    push = agentctl.Pusher(state, mesh)
    client: scenario.CounterClient | None = None
    try:
        image = _image(workdir)
        for store in stores.values():
            store("import", str(image), f"localhost/{NAME}:bench", what="import")
        attach.attach(ns, ip, host_netns=mesh.host(SOURCE).netns, mtu=mesh.mtu)
        routes.publish(mesh, ip, SOURCE, push)
        stores[SOURCE](
            "run", "-d", "--name", NAME, "--network", f"ns:{netns.path(ns)}", "--cgroup-parent", cgroup,
            "--pull", "never", *ULIMITS, "-v", "/usr:/usr:ro", f"localhost/{NAME}:bench",
            "python3", "/app/counter.py", "serve", str(scenario.PORT), "--memory-mib", str(cfg.memory_mib),
            "--dirty-mb-s", str(cfg.dirty_mb_s), "--incompressible", what="run",
        )  # fmt: skip
        _wait_touched(stores[SOURCE], cfg.memory_mib << 20, cfg.ready_timeout_s)
        client = scenario.CounterClient(mesh.hosts[CLIENTS].netns or "", ip, workdir).start()
        time.sleep(cfg.settle_s)
        out["seconds"] = _move(state, mesh, stores, ns, ip, push, workdir)
        out["total_ms"] = round(sum(out["seconds"].values()) * 1000, 1)
        client.wait_for(client.progress() + cfg.after_requests, timeout=60)
        out["ok"] = True
    except Exception as exc:
        out["error"] = str(exc) or type(exc).__name__
    finally:
        seen = client.stop() if client else {}
        for store in stores.values():
            store.destroy()
        for host in (SOURCE, TARGET):  # wired to one of them, whichever step it got to
            with contextlib.suppress(Exception):
                attach.detach(ns, host_netns=mesh.host(host).netns)
        with contextlib.suppress(Exception):
            routes.withdraw(mesh, ip, push)
        ipam.release(ip)
        _rmdir_cgroups(cgroup)
    out["client_gap_ms"] = seen.get("max_gap_ms")
    out["connection_survived"] = bool(seen.get("survived"))
    if out["ok"] and not out["connection_survived"]:
        out["ok"] = False
        out["error"] = f"the client's connection did not survive: {seen.get('errors')}"
    return out


def _move(
    state: Path, mesh: Mesh, stores: dict[str, Store], ns: str, ip: str, push: agentctl.Pusher, workdir: Path
) -> dict[str, float]:
    """The timed part: checkpoint, transfer, restore, route; seconds of each."""
    archive, received = workdir / "podman-export.tar.zst", workdir / "podman-import.tar.zst"
    t = [time.monotonic()]
    stores[SOURCE]("container", "checkpoint", "--export", str(archive), "--tcp-established", "--file-locks", NAME,
                   what="checkpoint")  # fmt: skip
    t.append(time.monotonic())
    _send(mesh, archive, received)
    t.append(time.monotonic())
    # The same netns name on the target, as FIELD-NOTES' recipe has it: its veth now ends on local-2.
    subprocess.run(["ip", "-n", mesh.host(SOURCE).netns or "", "link", "del", attach.host_ifname(ns)], check=True)
    attach.attach(ns, ip, host_netns=mesh.host(TARGET).netns, route=False, mtu=mesh.mtu)
    stores[TARGET]("container", "restore", "--import", str(received), "--tcp-established", "--file-locks",
                   what="restore")  # fmt: skip
    t.append(time.monotonic())
    attach.set_route(ns, ip, True, host_netns=mesh.host(TARGET).netns)
    routes.publish(mesh, ip, TARGET, push)
    t.append(time.monotonic())
    steps = ("checkpoint", "transfer", "restore", "route")
    return {k: round(t[i + 1] - t[i], 3) for i, k in enumerate(steps)}


def _send(mesh: Mesh, src: Path, dst: Path) -> None:
    """`src` from local-1's netns to local-2's over the overlay, into `dst`."""
    to = mesh.host(TARGET).overlay_ip
    receiver = subprocess.Popen(
        netns.command(mesh.host(TARGET).netns, [scenario.PYTHON, "-c", RECEIVE, to, str(TRANSFER_PORT), str(dst)]),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        if receiver.stdout is None or receiver.stdout.readline().strip() != "listening":
            raise SkyferryError("the baseline's receiver did not start")
        subprocess.run(netns.command(mesh.host(SOURCE).netns, [scenario.PYTHON, "-c", SEND, to, str(TRANSFER_PORT),
                                                               str(src)]), check=True, timeout=600)  # fmt: skip
        receiver.wait(timeout=60)
    finally:
        if receiver.poll() is None:
            receiver.kill()
        receiver.wait()
    if dst.stat().st_size != src.stat().st_size:
        raise SkyferryError(f"the baseline's transfer lost bytes: {dst.stat().st_size} of {src.stat().st_size}")


def _image(workdir: Path) -> Path:
    """A rootfs tarball with only the counter and the links a merged-/usr system needs to find the host's
    python3 under the read-only /usr the container gets."""
    path = workdir / "podman-baseline-rootfs.tar"
    with tarfile.open(path, "w") as tar:
        tar.add(workload_counter.__file__, arcname="app/counter.py")
        for link in ("bin", "lib", "lib64", "sbin"):
            info = tarfile.TarInfo(link)
            info.type, info.linkname = tarfile.SYMTYPE, f"usr/{link}"
            tar.addfile(info)
        for d in ("usr", "tmp", "dev", "proc", "sys", "etc"):
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if d == "tmp" else 0o755
            tar.addfile(info)
    return path


def _wait_touched(store: Store, size: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = json.loads(store("container", "inspect", NAME, what="inspect"))[0]
        pid = info["State"].get("Pid") or 0
        if pid and tree_rss(pid) >= size:
            return
        time.sleep(1.0)
    raise SkyferryError(f"the baseline's workload did not reach {size >> 20} MiB resident in {timeout:.0f} s")


def _rmdir_cgroups(parent: str) -> None:
    """The cgroup parent Podman made under each controller hierarchy (cgroup v2: one), deepest first."""
    root = Path("/sys/fs/cgroup")
    v2 = (root / "cgroup.controllers").exists()  # on v1 it is in every hierarchy, not at the root
    tops = [h / parent.strip("/").split("/")[0] for h in ([root] if v2 else [*root.iterdir()])]
    for d in sorted((p for t in tops for p in [t, *t.rglob("*")] if p.is_dir()), key=lambda p: -len(p.parts)):
        with contextlib.suppress(OSError):
            d.rmdir()


def _unmount_below(path: Path) -> None:
    """Everything mounted at or below `path`, deepest first (as runtimes/engines.unmount_below, which the
    controller side may not import)."""
    root = str(path.resolve())
    with open("/proc/self/mountinfo") as f:
        points = {p for line in f if (p := line.split()[4].replace("\\040", " ")) == root or p.startswith(root + "/")}
    for point in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)
