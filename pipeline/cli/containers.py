"""`skyferry run | ps | logs | rm`: containers on mesh hosts, each with a stable overlay /32."""

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import typer
from skyferry.netplane import routes
from skyferry.netplane.ipam import Ipam
from skyferry.netplane.mesh import Mesh
from skyferry.pipeline import agentctl
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.registry import Registry
from skyferry.pipeline.runc import ContainerSpec
from skyferry.pipeline.state import state_dir

from . import output
from .app import app

PANEL = "Containers"


@app.command(rich_help_panel=PANEL, context_settings={"allow_interspersed_args": False})
def run(
    host: str = typer.Option(..., "--host", help="Mesh host to run on, e.g. local-1."),
    name: str = typer.Option(..., "--name", help="Container name, unique in the mesh."),
    command: list[str] = typer.Argument(..., help="The command to run, after `--`."),
    rootfs: Path | None = typer.Option(None, help="A directory to copy as the container's rootfs."),
    image: Path | None = typer.Option(None, help="An OCI-layout or `docker save` tarball to unpack as rootfs."),
    env: list[str] = typer.Option([], "--env", "-e", help="KEY=VALUE, repeatable."),
    json_out: bool = typer.Option(False, "--json", help=output.JSON_OPTION_HELP),
) -> None:
    """Start a runc container on HOST with its own netns and overlay IP.

    With neither --rootfs nor --image the container sees the host's /usr and /etc read-only, so host
    programs such as python3 work inside. Stdio goes to a log (`skyferry logs NAME`).

    Example: skyferry run --host local-1 --name web -- python3 -m http.server 8080
    """
    if rootfs and image:
        raise SkyferryError("give --rootfs or --image, not both")
    if rootfs and not rootfs.is_dir():
        raise SkyferryError(f"--rootfs {rootfs} is not a directory")
    if image and not image.is_file():
        raise SkyferryError(f"--image {image} is not a file")
    environment = dict(_kv(e) for e in env)
    state = state_dir()
    mesh = Mesh.load(state)
    mesh.host(host)
    registry = Registry(state)
    existing = registry.find(name)
    if existing and existing.host != host:
        raise SkyferryError(
            f"container {name!r} already exists on {existing.host}",
            hint=f"skyferry rm {name}, or pick another name",
        )
    ipam = Ipam(state)
    owner = f"container:{name}"
    ip = ipam.lookup(owner) or ipam.allocate(owner)
    spec = ContainerSpec(
        name=name,
        args=list(command),
        ip=ip,
        env=environment,
        rootfs=str(rootfs.resolve()) if rootfs else None,
        image=str(image.resolve()) if image else None,
    )
    try:
        info = agentctl.client(state, mesh, host).call("POST", "/v1/containers", spec.to_dict())
        routes.publish(mesh, ip, host)
    except Exception:
        if not existing:
            ipam.release(ip)
        raise
    registry.add(spec, host)
    if json_out:
        output.print_json(info)
    else:
        output.console.print(f"{name} running on {host} at {ip} (pid {info.get('pid')})")


def _kv(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise SkyferryError(f"--env {text!r} is not KEY=VALUE")
    return key, value


def _live_rows(state: Path, mesh: Mesh) -> list[dict[str, Any]]:
    """The registry joined with each host agent's live view; an unreachable host shows as such."""
    registry = Registry(state)
    entries = registry.all()

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
        live = view.get(e.name, {}) if isinstance(view, dict) else {}
        state_txt = live.get("state", "missing") if isinstance(view, dict) else "unknown (host unreachable)"
        if live.get("frozen_for_migration"):
            state_txt = "frozen (migrating)"
        rows.append(
            {
                "name": e.name,
                "host": e.host,
                "ip": e.ip,
                "state": state_txt,
                "pid": live.get("pid"),
                "runtime": "runc",
                "command": " ".join(e.spec.args),
            }
        )
    return rows


@app.command(rich_help_panel=PANEL)
def ps(json_out: bool = typer.Option(False, "--json", help=output.JSON_OPTION_HELP)) -> None:
    """List containers: name, host, overlay IP, state and PID (asks each host's agent)."""
    state = state_dir()
    rows = _live_rows(state, Mesh.load(state))
    if json_out:
        output.print_json(rows)
        return
    output.print_table(
        None,
        ["NAME", "HOST", "IP", "STATE", "PID", "COMMAND"],
        [[r["name"], r["host"], r["ip"], r["state"], r["pid"], r["command"]] for r in rows],
    )


@app.command(rich_help_panel=PANEL)
def logs(name: str = typer.Argument(..., help="Container name.")) -> None:
    """Print a container's stdout and stderr (from wherever it runs now)."""
    state = state_dir()
    entry = Registry(state).get(name)
    data = agentctl.client(state, Mesh.load(state), entry.host).call("GET", f"/v1/containers/{name}/logs")
    sys.stdout.buffer.write(data if isinstance(data, bytes) else str(data).encode())


@app.command(rich_help_panel=PANEL)
def rm(
    name: str = typer.Argument(..., help="Container name."),
    json_out: bool = typer.Option(False, "--json", help=output.JSON_OPTION_HELP),
) -> None:
    """Stop and remove a container, and release its overlay IP. Safe to run twice."""
    state = state_dir()
    registry = Registry(state)
    entry = registry.find(name)
    if entry is None:
        if json_out:
            output.print_json({"removed": None})
        else:
            output.console.print(f"{name}: no such container (nothing to do)")
        return
    mesh = Mesh.load(state)
    agentctl.client(state, mesh, entry.host).call("DELETE", f"/v1/containers/{name}")
    routes.withdraw(mesh, entry.ip)
    Ipam(state).release(entry.ip)
    registry.remove(name)
    if json_out:
        output.print_json({"removed": name})
    else:
        output.console.print(f"removed {name}")
