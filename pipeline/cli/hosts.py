"""`skyferry hosts`: bring local and VM hosts up and down, list them, run commands on them."""

import logging
import os
import platform
import sys
from pathlib import Path
from typing import Any

import typer
from skyferry.netplane import netns
from skyferry.netplane.mesh import Mesh
from skyferry.netplane.wan import WanSpec
from skyferry.pipeline import logfmt
from skyferry.pipeline.controller.state import state_dir
from skyferry.pipeline.errors import SkyferryError
from skyferry.providers import inventory, vm
from skyferry.providers.local import LocalProvider

from . import output
from .app import app

hosts_app = typer.Typer(
    no_args_is_help=True,
    help=(
        "Hosts of the mesh: local ones are network namespaces joined by WireGuard over an emulated WAN.\n\n"
        "  skyferry hosts up --local --count 3 --wan rate=1gbit,rtt=30ms\n\n"
        "  skyferry hosts up --vm --count 2\n\n"
        "  skyferry hosts ls\n\n"
        "  skyferry hosts exec local-1 -- ip -br addr\n\n"
        "  skyferry hosts down"
    ),
)
app.add_typer(hosts_app, name="hosts")


def _rows(mesh: Mesh) -> list[dict[str, Any]]:
    """Every member, then every recorded VM not (yet) in the mesh; VMs carry their accelerator."""
    from skyferry.pipeline.controller import enrol

    relays = mesh.wan.relay_ports if mesh.wan and mesh.wan.relay_address else {}
    vms = {r.name: r for r in vm.records(mesh.state or state_dir())}
    joined = enrol.reported(mesh.state or state_dir())
    here = {"kernel": platform.release(), "wireguard": mesh.backend}  # members on this machine
    rows = []
    for m in mesh.members:
        rec = vms.pop(m.name, None)
        rows.append(
            {
                "name": m.name,
                "role": "controller" if m is mesh.controller else "host",
                "overlay_ip": m.overlay_ip,
                "endpoint": m.endpoint,
                "interface": m.interface,
                "netns": m.netns,
                "provider": m.provider,
                "up": rec.alive() if rec else bool(m.netns and netns.exists(m.netns)),
                "via_relay": any(m.name in pair.split(",") for pair in relays),
                **(joined.get(m.name) or (here if m.netns or m is mesh.controller else {})),
                **(_vm_fields(rec) if rec else {}),
            }
        )
    for rec in vms.values():  # booted, not joined (yet)
        rows.append(
            {
                "name": rec.name, "role": "host", "overlay_ip": None, "endpoint": f"{rec.address}:51820",
                "interface": None, "netns": None, "provider": "vm", "up": rec.alive(), "via_relay": False,
                **_vm_fields(rec),
            }
        )  # fmt: skip
    return rows + _waiting(mesh)


def _vm_fields(rec: vm.VmRecord) -> dict[str, Any]:
    return {
        "address": rec.address,
        "accelerator": rec.accelerator,
        "state": "running" if rec.alive() else "stopped",
        "pid": rec.pid,
        "console": str(rec.console),
    }


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
    cols = ["name", "role", "provider", "overlay_ip", "endpoint", "kernel", "wireguard", "accelerator", "up"]
    output.print_table(
        f"{title} {mesh.name} ({mesh.cidr}, {mesh.backend}, mtu {mesh.mtu}{wan})",
        cols,
        [[r.get(c) for c in cols] for r in _rows(mesh)],
    )


@hosts_app.command("up")
def up(
    local: bool = typer.Option(False, "--local", help="Create the hosts as network namespaces on this machine."),
    vm_hosts: bool = typer.Option(
        False, "--vm", help="Boot the hosts as QEMU VMs (vm-1 …) on the local mesh's underlay and WAN."
    ),
    count: int = typer.Option(3, "--count", "-n", min=1, help="How many hosts (local-1 … or vm-1 …)."),
    size: str | None = typer.Option(None, "--size", help="VM size, NcpuMg (default 2cpu-1g); --vm only."),
    timeout: float = typer.Option(1800, "--timeout", help="Seconds to wait for VMs to boot; --vm only."),
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

      skyferry hosts up --vm --count 2 --size 2cpu-2g      (on an empty state: first a controller-only mesh)
    """
    if local == vm_hosts:
        raise SkyferryError("say which hosts to bring up: --local or --vm", hint="use `skyferry provision` for clouds")
    if vm_hosts:
        _up_vms(count, size, wan, cidr, name, timeout, json_out)
        return
    if size is not None:
        raise SkyferryError("--size is for VM hosts", hint="local hosts share this machine's CPUs and memory")
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


def _up_vms(
    count: int, size: str | None, wan: str | None, cidr: str | None, name: str | None, timeout: float, json_out: bool
) -> None:
    """`hosts up --vm`: a controller-only local mesh first if there is none, then the VMs through the same
    provisioning path as AWS and GCP (controller/provision.py)."""
    from skyferry.pipeline.controller import provision as provisioning

    progress_on_stderr()
    state = state_dir()
    vm.parse_size(size)  # a bad size fails before anything is made
    wan_spec = WanSpec.parse(wan) if wan else None
    made_mesh = False
    if Mesh.exists(state):
        mesh = Mesh.load(state)
        have = (mesh.wan.rate, mesh.wan.rtt) if mesh.wan else (None, None)
        want = (wan_spec.rate_text, wan_spec.rtt_text) if wan_spec else have
        if have != want or (name and name != mesh.name) or cidr:
            raise SkyferryError(
                f"mesh {mesh.name} is already up; VMs join it as it is (WAN rate={have[0]} rtt={have[1]})",
                hint="leave out --wan/--name/--cidr, or skyferry hosts down first",
            )
    else:
        logging.getLogger("skyferry.providers").info("no mesh yet: creating a controller-only local mesh")
        mesh, made_mesh = LocalProvider(state, cidr=cidr, wan_spec=wan_spec).up(0, name)
    before = {r.name for r in vm.records(state)}
    try:
        result = provisioning.provision(state, "vm", count, size=size, timeout=timeout)
    except BaseException:
        if made_mesh:  # leave nothing behind that this call made
            _down_all(state)
        raise
    created = [h["name"] for h in result["hosts"] if h["name"] not in before]
    mesh = Mesh.load(state)
    if json_out:
        output.print_json({**_summary(mesh), "vms": result["hosts"], "created": created, "mesh_created": made_mesh})
    else:
        _print(mesh, f"VMs {', '.join(created) or 'already up'} in mesh")


def progress_on_stderr() -> None:
    """Long waits (image build, boot) log progress lines; show them on stderr, outside --json's stdout
    (with --log-format json they are JSON lines there already)."""
    if logfmt.active == "json":
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("> %(message)s"))
    logger = logging.getLogger("skyferry.providers")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


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
    """Run a command inside a local host's network namespace (ip netns exec), or in a VM through its guest
    agent (exit code, stdout and stderr passed through).

    Examples:

      skyferry hosts exec local-1 -- ip -br addr

      skyferry hosts exec local-3 -- iperf3 -c 100.64.0.2

      skyferry hosts exec vm-1 -- cloud-init status --long
    """
    state = state_dir()
    if vm.record(state, host):
        rc, out, err = vm.VmProvider(state).exec(host, command)
        sys.stdout.write(out)
        sys.stderr.write(err)
        raise typer.Exit(rc)
    member = Mesh.load(state).host(host)
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
    name = Mesh.load(state).name if Mesh.exists(state) else None
    removed = _down_all(state)
    if json_out:
        output.print_json({"mesh": name, "removed": removed})
    elif name or removed:
        output.console.print(f"mesh {name} is down; removed {len(removed)} objects")
    else:
        output.console.print("no mesh here; nothing to do")


def _down_all(state: Path) -> list[str]:
    from skyferry.pipeline.controller import provision

    return provision.teardown(state)
