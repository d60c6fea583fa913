"""`skyferry agent`: the per-host daemon (the local provider starts one in each host namespace)."""

import logging
from pathlib import Path

import typer
from skyferry.pipeline import logfmt
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.hostapi.layout import AGENT_PORT

from .app import LOG_FORMAT_ENV, LogFormat, app


@app.command(rich_help_panel="Internals")
def agent(
    host: str = typer.Option(..., help="This host's name in the mesh."),
    mesh: str = typer.Option(..., help="The mesh's id (prefix of every kernel object it owns)."),
    state_root: Path = typer.Option(..., help="This host's own state root (TLS material in tls/)."),
    listen: str = typer.Option("", help="This host's overlay address; the agent binds nowhere else."),
    port: int = typer.Option(AGENT_PORT, help="TCP port."),
    mtu: int = typer.Option(1420, help="Overlay MTU, for container interfaces."),
    wg_interface: str = typer.Option("skyferry", help="This host's WireGuard interface (the agent sets its peers)."),
    log_format: LogFormat = typer.Option(
        LogFormat.text,
        "--log-format",
        envvar=LOG_FORMAT_ENV,
        help="text, or json: one object per line with host, migration, container and stage.",
    ),
    remove_containers: bool = typer.Option(
        False, "--remove-containers", help="Remove every container of this host, then exit (`hosts down`)."
    ),
) -> None:
    """Run the host agent: checkpoint, restore, image transfer and netns work for this host.

    It serves HTTPS with mutual TLS on LISTEN:PORT and accepts only certificates signed by the mesh CA.
    Normally started for you by `skyferry hosts up` (local) or a systemd unit (cloud hosts).
    """
    # Imported here: the agent's modules cost every other command about 0.2 s of start-up.
    from skyferry.pipeline.agent.host import HostConfig
    from skyferry.pipeline.agent.server import identity_for, remove_all, serve

    logfmt.configure(log_format.value, logging.INFO, host=host)
    cfg = HostConfig(name=host, mesh=mesh, state_root=state_root, overlay_ip=listen, mtu=mtu, wg_interface=wg_interface)
    if remove_containers:
        remove_all(cfg)
        return
    if not listen:
        raise SkyferryError("--listen is required to serve", hint="the host's overlay address")
    serve(cfg, identity_for(state_root), listen, port)
