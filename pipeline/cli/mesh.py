"""`skyferry mesh`: a mesh whose controller is this machine, and keeping every member's peers right."""

import secrets
from pathlib import Path

import typer

from . import output
from .app import app

mesh_app = typer.Typer(
    no_args_is_help=True,
    help=(
        "The WireGuard mesh itself, when hosts are machines made elsewhere.\n\n"
        "  skyferry mesh init --endpoint 203.0.113.7\n\n"
        "  skyferry hosts join web-1\n\n"
        "  skyferry mesh sync\n\n"
        "  skyferry mesh rotate"
    ),
)
app.add_typer(mesh_app, name="mesh")


@mesh_app.command("init")
def init(
    endpoint: str = typer.Option(..., "--endpoint", help="The address hosts reach this machine at."),
    name: str | None = typer.Option(None, "--name", help="Mesh id (default: sf + 4 random hex digits)."),
    cidr: str | None = typer.Option(None, "--cidr", help="Overlay range for host and container addresses."),
    port: int = typer.Option(51820, "--port", help="This machine's WireGuard UDP port."),
    interface: str = typer.Option("skyferry", "--interface", help="Name of the WireGuard interface to create."),
    json_out: bool = typer.Option(False, "--json", help=output.JSON_OPTION_HELP),
) -> None:
    """Make a mesh with only this machine in it, as its controller; hosts then come in with `hosts join`.

    Idempotent: run again with the same endpoint it finds the mesh and changes nothing.

    Example: skyferry mesh init --endpoint 203.0.113.7 --cidr 100.64.0.0/16
    """
    from skyferry.netplane import controller
    from skyferry.pipeline.controller.state import state_dir

    mesh, created = controller.init(state_dir(), name or "sf" + secrets.token_hex(2), endpoint, cidr, port, interface)
    ctl = mesh.controller
    info = {"mesh": mesh.name, "cidr": mesh.cidr, "controller": ctl.overlay_ip, "endpoint": ctl.endpoint,
            "interface": ctl.interface, "wireguard": mesh.backend, "created": created}  # fmt: skip
    if json_out:
        output.print_json(info)
    else:
        verb = "created" if created else "already here:"
        output.console.print(f"{verb} mesh {mesh.name} ({mesh.cidr}); controller {ctl.overlay_ip} at {ctl.endpoint}")
        output.console.print("next: skyferry hosts join NAME")


@mesh_app.command("sync")
def sync(json_out: bool = typer.Option(False, "--json", help=output.JSON_OPTION_HELP)) -> None:
    """Send every member its whole peer list and the certificate revocation list again (after a host was
    unreachable during a change).

    Safe to repeat. Example: skyferry mesh sync
    """
    from skyferry.netplane import routes
    from skyferry.netplane.mesh import Mesh
    from skyferry.pipeline.controller import agentctl, revoke
    from skyferry.pipeline.controller.state import state_dir

    state = state_dir()
    mesh = Mesh.load(state)
    routes.apply(mesh, agentctl.Pusher(state, mesh))
    revoke.push(state, mesh)
    members = [m.name for m in mesh.members]
    if json_out:
        output.print_json({"mesh": mesh.name, "synced": members})
    else:
        output.console.print(f"mesh {mesh.name}: peers sent to {', '.join(members)}")


@mesh_app.command("rotate")
def rotate(
    revoke_old: bool = typer.Option(
        False, "--revoke-old", help="Also revoke the certificates replaced (a key may have been stolen)."
    ),
    json_out: bool = typer.Option(False, "--json", help=output.JSON_OPTION_HELP),
) -> None:
    """Give every host and the controller a new TLS certificate, with nothing stopped or restarted.

    Each host's agent makes its new key itself and installs the certificate signed for it; it shows the
    new one from its next connection on. Certificates last 90 days: rotate well before (monthly).

    Example: skyferry mesh rotate --revoke-old
    """
    from skyferry.netplane.mesh import Mesh
    from skyferry.pipeline.controller import rotate as rotation
    from skyferry.pipeline.controller.state import state_dir
    from skyferry.pipeline.errors import SkyferryError

    state = state_dir()
    report = rotation.rotate(state, Mesh.load(state), revoke_old=revoke_old)
    if json_out:
        output.print_json(report)  # "failed" names who kept an old certificate; the exit code is then 2
        if report["failed"]:
            raise typer.Exit(2)
        return
    for name, r in report["renewed"].items():
        output.console.print(f"{name}: certificate {r['new']} until {r['not_after']} (was {r['old']})")
    if report.get("revoked"):
        output.console.print(f"revoked {len(report['revoked'])} replaced certificate(s)")
    if report["failed"]:
        name, error = next(iter(report["failed"].items()))
        raise SkyferryError(
            f"{len(report['failed'])} host(s) kept their old certificate: {name}: {error}",
            hint="run skyferry mesh rotate again once they answer (skyferry hosts ls)",
        )


@mesh_app.command("issue-monitor-cert")
def issue_monitor_cert(
    out: Path = typer.Option(Path("skyferry-monitor"), "--out", help="Directory for ca.pem, cert.pem, key.pem."),
    name: str = typer.Option("prometheus", "--name", help="The monitor's name in its certificate."),
    revoke_old: bool = typer.Option(
        False, "--revoke-old", help="Revoke this monitor's earlier certificates everywhere, and issue a new one."
    ),
    json_out: bool = typer.Option(False, "--json", help=output.JSON_OPTION_HELP),
) -> None:
    """Issue a certificate that may read every agent's metrics (GET /v1/metrics) and nothing else: the
    client certificate for Prometheus (docs/observability.md). It lasts 90 days; run this again monthly
    (it renews once a third is left), or with --revoke-old when its key may have leaked.

    Example: skyferry mesh issue-monitor-cert --out /etc/prometheus/skyferry
    """
    from skyferry.netplane.mesh import Mesh
    from skyferry.pipeline.controller import agentctl, revoke
    from skyferry.pipeline.controller.state import state_dir

    state = state_dir()
    mesh = Mesh.load(state)
    revoked: dict[str, list[str]] = {"revoked": [], "not_told": []}
    if revoke_old:
        revoked = revoke.monitor(state, mesh, name)
        (out / "cert.pem").unlink(missing_ok=True)  # so that a new one is issued
    ident = agentctl.issue_monitor(state, mesh, name, out)
    files = {"ca_file": str(ident.ca), "cert_file": str(ident.cert), "key_file": str(ident.key)}
    if json_out:
        output.print_json({"name": name, "role": "monitor", **files, **revoked})
        return
    if revoked["revoked"]:
        output.console.print(f"revoked {len(revoked['revoked'])} earlier certificate(s) of {name}")
    output.console.print(f"monitor certificate for {name} in {out}/ (key 0600): give Prometheus these files")
    for key, path in files.items():
        output.console.print(f"  {key}: {path}")


@mesh_app.command("serve")
def serve(
    timeout: float = typer.Option(0, "--timeout", help="Stop after this many seconds (0: until Ctrl-C)."),
) -> None:
    """Serve joins (TCP 7421 on the controller's endpoint address) for hosts that hold tokens.

    `hosts join` and `provision` serve while they wait; this is for hosts made by Terraform
    (`inventory tfvars`) or provisioned with --join-timeout 0. Prints each host that joins; Ctrl-C stops.

    Example: skyferry mesh serve --timeout 3600
    """
    import time

    from skyferry.pipeline.controller import enrol
    from skyferry.pipeline.controller.state import state_dir

    with enrol.serving(state_dir()) as enrolment:
        output.err_console.print("serving joins; Ctrl-C to stop")
        deadline = time.monotonic() + timeout if timeout else None
        seen: set[str] = set()
        try:
            while deadline is None or time.monotonic() < deadline:
                time.sleep(1)
                for name in sorted(set(enrolment.joined) - seen):
                    seen.add(name)  # first: a Ctrl-C right after the line must still count it
                    output.console.print(f"{name} joined as {enrolment.joined[name].overlay_ip}")
        except KeyboardInterrupt:  # the way to stop it: no traceback
            pass
    output.err_console.print(f"stopped serving joins; {len(seen)} host(s) joined")
