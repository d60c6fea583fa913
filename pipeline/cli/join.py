"""`skyferry hosts join` (on the controller) and `skyferry join` (on the machine that joins)."""

import typer

from . import output
from .app import app
from .hosts import hosts_app


@hosts_app.command("join")
def hosts_join(
    name: str = typer.Argument(..., help="The new host's name in the mesh (lowercase letters, digits, '-')."),
    ttl: float = typer.Option(1800, "--ttl", help="Seconds the token stays valid."),
    timeout: float = typer.Option(1800, "--timeout", help="Seconds to wait for the host to join and its agent."),
    provider: str = typer.Option("manual", "--provider", help="What made the machine, for `hosts ls`."),
    json_out: bool = typer.Option(False, "--json", help=output.JSON_OPTION_HELP),
) -> None:
    """Admit a machine made elsewhere: print a one-time join command, then wait until the host is in.

    The command carries a token that works once and expires, and the pin of the mesh CA. On the new
    machine, `skyferry join` makes the host's WireGuard and TLS keys there; only public halves and a
    signing request come back. The controller serves joins on its endpoint address, TCP 7421.

    Example: skyferry hosts join web-1 --ttl 900
    """
    from skyferry.pipeline.controller import enrol
    from skyferry.pipeline.controller.state import state_dir

    def announce(info: dict[str, str]) -> None:
        if json_out:
            output.print_json({"event": "token", **info})
        else:
            output.err_console.print(f"on {name}, as root, run:\n\n  {info['command']}\n")
            output.err_console.print(f"waiting for {name} to join (token valid {ttl:.0f} s) …")

    result = enrol.admit(state_dir(), name, provider, ttl, timeout, announce)
    if json_out:
        output.print_json({"event": "joined", **result})
    else:
        output.console.print(f"{name} joined as {result['overlay_ip']} ({result['endpoint']}); its agent answers")


@app.command("join", rich_help_panel="Internals")
def join(
    url: str = typer.Argument(..., help="The controller's enrolment URL, https://ADDRESS:7421."),
    name: str = typer.Option(..., "--name", help="This host's name, as the token was made for."),
    token: str = typer.Option(..., "--token", help="The one-time token from `skyferry hosts join`."),
    ca_pin: str = typer.Option(..., "--ca-pin", help="sha256:… of the mesh CA; the controller must match it."),
    endpoint: str | None = typer.Option(
        None, "--endpoint", help="ADDRESS:PORT where other members reach this host's WireGuard (default: as seen)."
    ),
    start: bool = typer.Option(True, "--start/--no-start", help="Start WireGuard and the agent through systemd."),
    json_out: bool = typer.Option(False, "--json", help=output.JSON_OPTION_HELP),
) -> None:
    """Make this machine a host of a mesh (run on the host, as root, the command `hosts join` printed).

    Writes /etc/wireguard/skyferry.conf and skyferry-agent.service and starts both. The WireGuard key and
    the TLS key are made here and never leave this machine.
    """
    from skyferry.pipeline.agent.join import join as do_join

    result = do_join(url.rstrip("/"), token, ca_pin, name, endpoint, start)
    if json_out:
        output.print_json(result)
    else:
        output.console.print(
            f"joined mesh {result['mesh']} as {name} ({result['overlay_ip']}, WireGuard {result['wireguard']})"
        )
