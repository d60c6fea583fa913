"""Containers on mesh hosts, as the controller sees them: run, list, logs, remove."""

import base64
import logging
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from skyferry.netplane import routes
from skyferry.netplane.ipam import Ipam
from skyferry.netplane.mesh import Mesh, MeshHost
from skyferry.pipeline.controller import agentctl
from skyferry.pipeline.controller.registry import Registry
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.hostapi.execute import ExecRequest, ExecResult
from skyferry.pipeline.hostapi.spec import HOST_DIRS, IMPORTS, NAME, ContainerSpec

log = logging.getLogger(__name__)

RUNTIMES = ("runc", "podman", "docker")


def split_name(text: str) -> tuple[str | None, str]:
    """`podman:web` -> ("podman", "web"); a bare name names no engine."""
    engine, sep, name = text.partition(":")
    if not sep:
        return None, text
    if engine not in RUNTIMES:
        raise SkyferryError(f"unknown runtime {engine!r} in {text!r}", hint=f"runtimes: {', '.join(RUNTIMES)}")
    return engine, name


def resolve(state: Path, text: str) -> str:
    """The container name in `text` (NAME or ENGINE:NAME), checked against the engine it runs in."""
    engine, name = split_name(text)
    entry = Registry(state).get(name)
    if engine is not None and entry.spec.runtime != engine:
        raise SkyferryError(
            f"container {name!r} runs in {entry.spec.runtime}, not {engine}", hint=f"{entry.spec.runtime}:{name}"
        )
    return name


def run(
    state: Path, host: str, name: str, args: list[str], *, rootfs: Path | None = None,
    image: Path | None = None, env: dict[str, str] | None = None, runtime: str | None = None,
    labels: dict[str, str] | None = None, volumes: list[str] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Start `args` in a new container on `host` with its own overlay /32; idempotent per (name, host).

    `runtime` is runc (default), podman or docker; it may also prefix the name: `podman:web`.
    """
    prefixed, name = split_name(name)
    if prefixed and runtime and prefixed != runtime:
        raise SkyferryError(f"--runtime {runtime} contradicts the name {prefixed}:{name}")
    runtime = prefixed or runtime or "runc"
    if runtime not in RUNTIMES:
        raise SkyferryError(f"unknown runtime {runtime!r}", hint=f"runtimes: {', '.join(RUNTIMES)}")
    if runtime != "runc" and not image:
        raise SkyferryError(f"a {runtime} container needs --image", hint="a rootfs tarball or a `docker save` archive")
    if not NAME.fullmatch(name):
        raise SkyferryError(
            f"bad container name {name!r}",
            hint="use 1-40 of a-z, 0-9, '-' and '_', starting with a letter or digit (it names kernel objects)",
        )
    if not args:
        raise SkyferryError("no command given", hint="skyferry run --host H --name N -- CMD ARGS…")
    if rootfs and image:
        raise SkyferryError("give --rootfs or --image, not both")
    if rootfs and not rootfs.is_dir():
        raise SkyferryError(f"--rootfs {rootfs} is not a directory")
    if image and not image.is_file():
        raise SkyferryError(f"--image {image} is not a file")
    mesh = Mesh.load(state)
    mesh.host(host)
    registry = Registry(state)
    existing = registry.find(name)
    if existing and existing.host != host:
        raise SkyferryError(
            f"container {name!r} already exists on {existing.host}", hint=f"skyferry rm {name}, or pick another name"
        )
    ipam = Ipam(state)
    owner = f"container:{name}"
    ip = ipam.lookup(owner) or ipam.allocate(owner)
    staged = _stage(mesh.host(host), name, rootfs or image)
    spec = ContainerSpec(
        name=name, args=list(args), ip=ip, env=dict(env or {}),
        rootfs=staged if rootfs else None, image=staged if image else None,
        runtime=runtime,
        labels=dict(labels or {}),
        volumes=_volumes(volumes or [], runtime),
    )  # fmt: skip
    try:
        info = agentctl.client(state, mesh, host).call("POST", "/v1/containers", spec.to_dict())
        _tolerate_stale(lambda: routes.publish(mesh, ip, host, agentctl.Pusher(state, mesh)), host)
    except Exception:
        if not existing:
            ipam.release(ip)
        raise
    finally:
        if staged and mesh.host(host).netns is not None:
            shutil.rmtree(Path(staged).parent, ignore_errors=True)  # the agent has copied or loaded it
    registry.add(spec, host)
    return info


def _stage(member: MeshHost, name: str, source: Path | None) -> str | None:
    """Where the agent of `member` reads a rootfs or image: its imports directory, the only place it
    reads them from (docs/security.md). A local host's is on this machine, so it is copied there; a
    joined machine's must already hold the path given (under <its state root>/imports/)."""
    if source is None:
        return None
    if member.netns is None:
        return str(source.resolve())
    dest = Path(member.state_root) / IMPORTS / name / source.name
    shutil.rmtree(dest.parent, ignore_errors=True)
    dest.parent.mkdir(parents=True, mode=0o700)
    if source.is_dir():
        shutil.copytree(source, dest, symlinks=True)
    else:
        shutil.copyfile(source, dest)
    return str(dest)


def _volumes(paths: list[str], runtime: str) -> list[str]:
    """Volume mount points: absolute, distinct, and not over the system dirs a default rootfs shares."""
    if paths and runtime != "runc":
        raise SkyferryError(f"--volume is supported for runc containers, not {runtime}")
    for path in paths:
        clean = "/" + "/".join(p for p in path.split("/") if p)
        if not path.startswith("/") or ".." in path.split("/") or clean == "/" or clean in HOST_DIRS:
            raise SkyferryError(f"bad volume path {path!r}", hint="an absolute path such as /data, not / or /usr")
    if len(set(paths)) != len(paths):
        raise SkyferryError("the same volume path was given twice")
    return list(paths)


def live(state: Path) -> list[dict[str, Any]]:
    """The registry joined with each host agent's live view; an unreachable host shows as such."""
    mesh = Mesh.load(state)
    entries = Registry(state).all()

    def host_view(host: str) -> dict[str, dict[str, Any]] | str:
        try:
            return {c["name"]: c for c in agentctl.client(state, mesh, host).call("GET", "/v1/containers")}
        except SkyferryError as exc:
            return f"unreachable: {exc}"

    hosts = sorted({e.host for e in entries})
    with ThreadPoolExecutor(max_workers=max(1, len(hosts))) as pool:
        views = dict(zip(hosts, pool.map(host_view, hosts), strict=True))
    rows = []
    for e in entries:
        view = views[e.host]
        current = view.get(e.name, {}) if isinstance(view, dict) else {}
        status = current.get("state", "missing") if isinstance(view, dict) else "unknown (host unreachable)"
        if current.get("frozen_for_migration"):
            status = "frozen (migrating)"
        rows.append({"name": e.name, "host": e.host, "ip": e.ip, "state": status, "pid": current.get("pid"),
                     "runtime": e.spec.runtime, "command": " ".join(e.spec.args)})  # fmt: skip
    return rows


def logs(state: Path, name: str) -> bytes:
    entry = Registry(state).get(name)
    data = agentctl.client(state, Mesh.load(state), entry.host).call("GET", f"/v1/containers/{name}/logs")
    return data if isinstance(data, bytes) else str(data).encode()


def exec_(state: Path, name: str, args: list[str], stdin: bytes = b"", timeout: float = 60.0) -> ExecResult:
    """Run `args` inside container `name` (or `runtime:name`), wherever it runs now; its exit code and output."""
    name = resolve(state, name)
    entry = Registry(state).get(name)
    req = ExecRequest(args=args, stdin=base64.b64encode(stdin).decode(), timeout=timeout)
    client = agentctl.client(state, Mesh.load(state), entry.host)
    return ExecResult.model_validate(client.call("POST", f"/v1/containers/{name}/exec", req.model_dump()))


def remove(state: Path, name: str) -> bool:
    """Stop and remove `name` and release its IP; False if there was no such container."""
    registry = Registry(state)
    entry = registry.find(name)
    if entry is None:
        return False
    mesh = Mesh.load(state)
    agentctl.client(state, mesh, entry.host).call("DELETE", f"/v1/containers/{name}")
    _tolerate_stale(lambda: routes.withdraw(mesh, entry.ip, agentctl.Pusher(state, mesh)), entry.host)
    Ipam(state).release(entry.ip)
    registry.remove(name)
    return True


def _tolerate_stale(change: Callable[[], None], host: str) -> None:
    """A route change that missed only members other than the container's own host (a host that is down)
    is recorded and took effect everywhere else: warn, and let `mesh sync` repair those members."""
    try:
        change()
    except routes.PushFailed as exc:
        if host in exc.members:
            raise
        log.warning("%s (run skyferry mesh sync once they are back)", exc)
