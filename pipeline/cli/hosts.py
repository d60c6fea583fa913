"""`skyferry hosts`: bring local hosts up and down, list them, run commands on them."""

import os
from pathlib import Path
from typing import Any

import typer
from skyferry.netplane import netns
from skyferry.netplane.mesh import Mesh
from skyferry.netplane.wan import WanSpec
from skyferry.pipeline.controller.state import state_dir
from skyferry.pipeline.errors import SkyferryError
from skyferry.providers import inventory
from skyferry.providers.local import LocalProvider

from . import output
from .app import app

hosts_app = typer.Typer(
    no_args_is_help=True,
    help=(
        "Hosts of the mesh: local ones are network namespaces joined by WireGuard over an emulated WAN.\n\n"
        "  skyferry hosts up --local --count 3 --wan rate=1gbit,rtt=30ms\n\n"
        "  skyferry hosts ls\n\n"
        "  skyferry hosts exec local-1 -- ip -br addr\n\n"
        "  skyferry hosts down"
    ),
)
app.add_typer(hosts_app, name="hosts")


def _rows(mesh: Mesh) -> list[dict[str, Any]]:
    relay = mesh.wan.relay_address if mesh.wan else None
    return [
        {
            "name": m.name,
            "role": "controller" if m is mesh.controller else "host",
            "overlay_ip": m.overlay_ip,
            "endpoint": m.endpoint,
            "interface": m.interface,
            "netns": m.netns,
            "provider": m.provider,
            "up": bool(m.netns and netns.exists(m.netns)),
            "via_relay": bool(relay and m is not mesh.controller),
        }
        for m in mesh.members
    ] + _waiting(mesh)


def _waiting(mesh: Mesh) -> list[dict[str, Any]]:
    """Hosts Terraform made (`inventory import`) that have not joined yet: no members, no overlay address."""
    if mesh.state is None:
        return []
    return [
        {"name": n, "role": "waiting", "overlay_ip": None, "endpoint": r.endpoint, "interface": None, "netns": None,
         "provider": r.host.provider, "up": False, "via_relay": False}
        for n, r in inventory.recorded(mesh.state).items()
        if n not in mesh.hosts
    ]  # fmt: skip


def _summary(mesh: Mesh) -> dict[str, Any]:
    return {
        "mesh": mesh.name,
        "cidr": mesh.cidr,
        "mtu": mesh.mtu,
        "backend": mesh.backend,
        "wan": {"rate": mesh.wan.rate, "rtt": mesh.wan.rtt} if mesh.wan else None,
        "hosts": _rows(mesh),
    }


def _print(mesh: Mesh, title: str) -> None:
    wan = f", WAN rate={mesh.wan.rate or '-'} rtt={mesh.wan.rtt or '-'}" if mesh.wan else ""
    cols = ["name", "role", "overlay_ip", "endpoint", "interface", "netns", "up"]
    output.print_table(
        f"{title} {mesh.name} ({mesh.cidr}, {mesh.backend}, mtu {mesh.mtu}{wan})",
        cols,
        [[r[c] for c in cols] for r in _rows(mesh)],
    )


@hosts_app.command("up")
def up(
    local: bool = typer.Option(False, "--local", help="Create the hosts as network namespaces on this machine."),
    count: int = typer.Option(3, "--count", "-n", min=1, help="How many hosts (local-1 … local-N)."),
    wan: str | None = typer.Option(
        None, "--wan", help="Emulated WAN between hosts: rate (tbf) and/or round-trip time, e.g. rate=1gbit,rtt=30ms."
    ),
    cidr: str | None = typer.Option(None, "--cidr", help="Overlay range for host and container addresses."),
    name: str | None = typer.Option(None, "--name", help="Mesh id prefixing every namespace and interface."),
    json_out: bool = typer.Option(False, "--json", help=output.JSON_OPTION_HELP),
) -> None:
    """Create hosts joined into a WireGuard overlay, and start an agent on each.

    Idempotent: with the same arguments a second run finds the mesh and changes nothing; with
    different ones it says what conflicts. On failure everything created so far is removed.

    Examples:

      skyferry hosts up --local --count 3

      skyferry hosts up --local --count 3 --wan rate=1gbit,rtt=30ms --cidr 100.64.0.0/16 --name demo
    """
    if not local:
        raise SkyferryError(
            "only local hosts can be brought up here", hint="add --local, or use `skyferry provision` for clouds"
        )
    from skyferry.pipeline.controller import agentctl

    state = state_dir()
    provider = LocalProvider(state, cidr=cidr, wan_spec=WanSpec.parse(wan) if wan else None)
    mesh, created = provider.up(count, name)
    try:
        agentctl.start_agents(mesh, state)
    except BaseException:
        if created:  # leave no half-built mesh behind
            agentctl.stop_agents(mesh, state)
            provider.down()
        raise
    if json_out:
        output.print_json({**_summary(mesh), "created": created})
    else:
        _print(mesh, "created mesh" if created else "mesh already up:")


@hosts_app.command("ls")
def ls(json_out: bool = typer.Option(False, "--json", help=output.JSON_OPTION_HELP)) -> None:
    """List the mesh's members: the controller and every host, with overlay and underlay addresses, and
    the hosts Terraform made that have not joined yet (role `waiting`).

    Example: skyferry hosts ls --json
    """
    mesh = Mesh.load(state_dir())
    if json_out:
        output.print_json(_summary(mesh))
    else:
        _print(mesh, "mesh")


@hosts_app.command("exec", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def exec_(
    host: str = typer.Argument(..., help="Host name (local-1 …) or `controller`."),
    command: list[str] = typer.Argument(..., help="The command and its arguments, after `--`."),
) -> None:
    """Run a command inside a local host's network namespace (ip netns exec).

    Examples:

      skyferry hosts exec local-1 -- ip -br addr

      skyferry hosts exec local-3 -- iperf3 -c 100.64.0.2
    """
    member = Mesh.load(state_dir()).host(host)
    if member.netns is None:
        raise SkyferryError(f"{host} is not a local host", hint="reach cloud hosts with ssh")
    os.execvp("ip", ["ip", "netns", "exec", member.netns, *command])


@hosts_app.command("down")
def down(json_out: bool = typer.Option(False, "--json", help=output.JSON_OPTION_HELP)) -> None:
    """Stop the agents and remove every namespace, interface, process and state file the mesh created.

    Safe to run twice: with no mesh there is nothing to do.

    Example: skyferry hosts down
    """
    state = state_dir()
    removed: list[str] = []
    name = None
    if Mesh.exists(state):
        from skyferry.pipeline.controller import agentctl

        mesh = Mesh.load(state)
        name = mesh.name
        agentctl.stop_agents(mesh, state)
        removed = LocalProvider(Path(state)).down()
    if json_out:
        output.print_json({"mesh": name, "removed": removed})
    elif name:
        output.console.print(f"mesh {name} is down; removed {len(removed)} objects")
    else:
        output.console.print("no mesh here; nothing to do")
