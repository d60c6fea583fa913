"""Agent side of a test cutover: a clone of a running container, restored where nobody can reach it.

Source: `clone-checkpoint` pauses the container for the dump only (network locked meanwhile, as in a
real checkpoint), then unlocks and thaws it: it keeps running, with the same pid and connections.
`clone-transfer` streams the dump and rootfs to the target under the clone's name.

Target: `clone-prepare` makes the clone's own netns (`<mesh>-<host>-<name>.test`) holding the
container's /32 on its loopback, with no veth, no host route and nothing published: the clone's
restored TCP sockets cannot reach the real clients (their packets loop back and are dropped), and no
packet from the mesh reaches the clone.
`clone-restore` brings it up there; `clone-check` runs the health check inside the clone (or, with
"live": true, inside the real container, to verify a cutover): in its mount, net, pid, ipc and uts
namespaces, as nobody without capabilities (`inside`), never as root on the host; `clone-discard`
removes it all.
"""

import contextlib
import subprocess
import time
from collections.abc import Callable
from typing import Any

from pyroute2 import IPRoute
from skyferry.netplane import netns
from skyferry.pipeline.agent import netlock
from skyferry.pipeline.agent.host import Host
from skyferry.pipeline.agent.source import Lane
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.files import wire
from skyferry.pipeline.hostapi.spec import CLONE_SUFFIX, ContainerSpec, clone_name

CHECK_TIMEOUT_S = 30.0
CHECK_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
NOBODY = 65534  # who a health check runs as, inside the container
OPS = ("clone-prepare", "clone-checkpoint", "clone-transfer", "clone-restore", "clone-check", "clone-discard")


def dispatch(host: Host, mig: str, op: str, req: Any, lane: Callable[[str], Lane]) -> Any:
    """One clone operation (`req`: its bodies.STEPS model); the agent holds the lock of req.name around
    it. `lane(name)` is the channel to the target (req.target) for streams addressed to container `name`."""
    match op:
        case "clone-prepare":
            return prepare(host, mig, req.spec)
        case "clone-checkpoint":
            return checkpoint(host, mig, req.name)
        case "clone-transfer":
            return transfer(host, mig, req.name, lane(clone_name(req.name)))
        case "clone-restore":
            return restore(host, mig, req.name)
        case "clone-check":
            return check(host, req.name, req.cmd, req.live, req.timeout)
        case "clone-discard":
            return discard(host, mig, req.clone)
    raise SkyferryError(f"no clone operation {op!r}")


def checkpoint(host: Host, mig: str, name: str) -> dict[str, Any]:
    """Dump a running container and leave it running: paused (and silent) only while CRIU dumps."""
    runtime = host.rt(name)
    state = runtime.state(name) or {}
    if state.get("status") != "running" or netlock.is_locked(host.netns(name)):
        raise SkyferryError(
            f"container {name!r} on {host.cfg.name} is {state.get('status', 'gone')}"
            + (" and frozen for a migration" if netlock.is_locked(host.netns(name)) else ""),
            hint="a test cutover needs a running container that is not migrating",
        )
    images = host.mig_dir(mig) / "images"
    wire.wipe(images)
    t0 = time.monotonic()
    runtime.pause(name)
    try:
        netlock.lock(host.netns(name))
        try:
            runtime.checkpoint(name, images, host.mig_dir(mig) / "work")
        finally:
            netlock.unlock(host.netns(name))
    finally:
        runtime.resume(name)
    return {"pause_s": round(time.monotonic() - t0, 4), "pid": state.get("pid")}


def transfer(host: Host, mig: str, name: str, lane: Lane) -> dict[str, Any]:
    """Stream the clone's dump and the container's rootfs to the target, addressed to the clone's name."""
    images = host.mig_dir(mig) / "images"
    if not images.exists():
        raise SkyferryError(f"test {mig}: no clone checkpoint of {name!r} on {host.cfg.name}")
    stats = wire.StreamStats()
    t0 = time.monotonic()
    received = lane.upload("receive", wire.encode({"images": images, **host.rt(name).payload(name)}, stats))
    if received.get("sha256") != stats.sha256:
        raise SkyferryError(f"clone image stream for {name!r} arrived corrupted (digest mismatch)")
    wire.wipe(images)  # the source keeps nothing of the test
    return {"bytes_raw": stats.bytes_raw, "bytes_wire": stats.bytes_wire, "seconds": time.monotonic() - t0}


def prepare(host: Host, mig: str, spec: ContainerSpec) -> dict[str, Any]:
    """The clone's isolated netns (the /32 on its loopback, no other link) and an empty bundle; idempotent."""
    if not spec.name.endswith(CLONE_SUFFIX):
        raise SkyferryError(f"{spec.name!r} is not a clone name")
    if _exists(host, spec.name):
        raise SkyferryError(f"a clone {spec.name!r} already exists on {host.cfg.name}", hint="discard it first")
    name = host.netns(spec.name)
    netns.create(name)
    with IPRoute(netns=name) as ipr:
        idx = ipr.link_lookup(ifname="lo")[0]
        if spec.ip not in {a.get("IFA_ADDRESS") for a in ipr.get_addr(index=idx, family=2)}:
            ipr.addr("add", index=idx, address=spec.ip, prefixlen=32)
        ipr.link("set", index=idx, state="up")
        # CRIU reconnects restored TCP sockets, which needs a route to each peer. This one loops back
        # into the same netns, where a packet for someone else's address is dropped (no forwarding).
        ipr.route("replace", dst="0.0.0.0/0", oif=idx)
    host.engine(spec).prepare(spec, host.netns_path(spec.name))
    host.mig_dir(mig).mkdir(parents=True, exist_ok=True)
    return {"netns": name}


def restore(host: Host, mig: str, clone: str) -> dict[str, Any]:
    """Restore the clone in its netns; nothing else (no unlock, no route: there is nothing to open)."""
    runtime = host.rt(clone)
    if (runtime.state(clone) or {}).get("status") == "running":
        return {"restore_s": 0.0}  # already restored: idempotent
    t0 = time.monotonic()
    for attempt in (1, 2):  # CRIU may hit "Can't fork for PID: File exists" right after a failed try
        try:
            runtime.restore(clone, host.mig_dir(mig) / "images", host.mig_dir(mig) / f"work{attempt}")
            break
        except SkyferryError:
            if attempt == 2 or runtime.state(clone) is not None:
                raise
            time.sleep(0.2)
    return {"restore_s": round(time.monotonic() - t0, 4)}


def check(host: Host, name: str, cmd: str | None, live: bool, timeout: float | None) -> dict[str, Any]:
    """Is it running, and does `cmd` (run inside it, $SKYFERRY_IP set) exit 0?"""
    runtime = host.rt(name)
    state = runtime.state(name) or {}
    result: dict[str, Any] = {"running": state.get("status") == "running", "pid": state.get("pid"), "cmd": cmd}
    if not cmd or not result["running"]:
        result["ok"] = result["running"]
        return result
    env = {"PATH": CHECK_PATH, "HOME": "/", "SKYFERRY_IP": runtime.spec(name).ip,
           "SKYFERRY_CONTAINER": name.removesuffix(CLONE_SUFFIX)}  # fmt: skip
    t0 = time.monotonic()
    try:
        proc = subprocess.run(
            inside(int(state["pid"]), ["/bin/sh", "-c", cmd]),
            capture_output=True, text=True, timeout=timeout or CHECK_TIMEOUT_S, env=env,
            stdin=subprocess.DEVNULL, check=False,
        )  # fmt: skip
        rc, out = proc.returncode, (proc.stdout + proc.stderr)[-2000:]
    except subprocess.TimeoutExpired:
        rc, out = 124, f"timed out after {timeout or CHECK_TIMEOUT_S} s"
    result.update(rc=rc, output=out.strip(), seconds=round(time.monotonic() - t0, 3), ok=rc == 0, live=live)
    return result


def inside(pid: int, argv: list[str]) -> list[str]:
    """`argv` run in the namespaces of the container whose init is `pid` (mount, with its root and working
    directory, net, pid, ipc, uts), as nobody, with no capabilities and no way to gain any (no_new_privs:
    a setuid binary in the container does not help). The check sees what the container sees and less:
    never the host's files, processes or root."""
    return [
        "setpriv", "--no-new-privs",
        "nsenter", f"--target={pid}", "--mount", "--net", "--pid", "--ipc", "--uts", "--root", "--wd",
        f"--setuid={NOBODY}", f"--setgid={NOBODY}", "--", *argv,
    ]  # fmt: skip


def discard(host: Host, mig: str, clone: str | None) -> dict[str, Any]:
    """Remove the clone (container, bundle, netns) and the test's images; safe to repeat, on either side."""
    if clone is not None:
        if not clone.endswith(CLONE_SUFFIX):
            raise SkyferryError(f"{clone!r} is not a clone name; refusing to remove it")
        for runtime in host.runtimes.values():
            if runtime.owns(clone):
                runtime.remove(clone)
        with contextlib.suppress(Exception):
            netns.remove(host.netns(clone))
    # The target's session for the clone's streams goes too; CRIU's logs stay, for a failed test.
    session = host.targets.get(mig)
    if session is not None:
        session.close()
    host.wipe(mig)
    return {"clean": clone is None or not (_exists(host, clone) or netns.exists(host.netns(clone)))}


def _exists(host: Host, name: str) -> bool:
    return any(runtime.owns(name) for runtime in host.runtimes.values())
