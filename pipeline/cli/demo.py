"""`skyferry demo`: three local hosts, a live TCP service moved between two simulated clouds."""

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import typer
from skyferry.netplane.mesh import Mesh
from skyferry.pipeline.controller import agentctl, migration, provision
from skyferry.pipeline.controller.state import state_dir
from skyferry.pipeline.scenarios import demo as scenario

from . import output
from .app import app
from .hosts import progress_on_stderr
from .migrate import _print_report


def _say(quiet: bool, text: str) -> None:
    if not quiet:
        output.err_console.print(f"[bold cyan]>[/bold cyan] {text}", highlight=False)


@app.command(rich_help_panel="Getting started")
def demo(
    keep: bool = typer.Option(False, "--keep", help="Leave the hosts and the container running to explore."),
    wan: str = typer.Option("rate=1gbit,rtt=30ms", "--wan", help="Emulated WAN between the hosts."),
    vm: bool = typer.Option(
        False, "--vm", help="Move the service between two QEMU VMs with their own kernels (minutes under TCG)."
    ),
    json_out: bool = typer.Option(False, "--json", help=output.JSON_OPTION_HELP),
) -> None:
    """Bring up 3 local hosts on an emulated WAN, run a TCP counter service on local-1, keep a client on
    local-3 talking to it every 50 ms, migrate the service to local-2, and report what the client saw.

    Everything runs in network namespaces on this machine and is torn down at the end (unless --keep;
    then `skyferry demo --keep` prints how to point the CLI at it, and a later `skyferry demo` replaces it).

    With --vm the service moves from vm-1 to vm-2, two VMs booted from a Debian 12 image (built on first
    use, which takes minutes) that join the mesh as a cloud host would; the client runs on local-1.
    """
    state = state_dir() / ("demo-vm" if vm else "demo")
    state.mkdir(mode=0o700, exist_ok=True)
    os.environ["SKYFERRY_STATE"] = str(state)  # the agents and any `skyferry` run from here use the demo's state
    quiet = json_out
    removed = scenario.mesh_down(state)
    if removed:
        _say(quiet, f"removed an earlier demo ({len(removed)} objects)")
    try:
        with tempfile.TemporaryDirectory(prefix="skyferry-demo-") as tmp:
            result = _run(state, Path(tmp), vm, wan, quiet)
    finally:
        if not keep:
            scenario.mesh_down(state)
    if json_out:
        output.print_json(result)
    else:
        _print_report(result["migration"])
        seen = result["client"]
        verdict = "yes, nothing lost or repeated" if seen["survived"] else f"NO: {seen['errors']}"
        output.console.print(
            f"client on {'local-1' if vm else 'local-3'}: {seen['requests']} requests on one connection, largest gap "
            f"{seen['max_gap_ms']} ms (freeze {result['migration']['freeze_ms']} ms); connection survived: {verdict}",
            highlight=False,
        )
        if keep:
            output.console.print(f"still running. Explore with: export SKYFERRY_STATE={state}; skyferry ps")
    if not result["client"]["survived"]:
        raise typer.Exit(1)


def _run(state: Path, workdir: Path, vm: bool, wan: str, quiet: bool) -> dict[str, Any]:
    """The demo itself: hosts, the counter and its client, one migration; what the client saw."""
    source, target, client_host = ("vm-1", "vm-2", "local-1") if vm else ("local-1", "local-2", "local-3")
    t0 = time.monotonic()
    if vm:
        _say(quiet, f"bringing up local-1 with WAN {wan}, then vm-1 and vm-2 (they boot and join)")
        scenario.mesh_up(state, 1, wan)
        progress_on_stderr()
        provision.provision(state, "vm", 2, timeout=3600, join_timeout=3600)
    else:
        _say(quiet, f"bringing up local-1, local-2, local-3 with WAN {wan}")
        scenario.mesh_up(state, 3, wan)
    mesh = Mesh.load(state)
    _say(quiet, f"mesh {mesh.name} up with agents in {time.monotonic() - t0:.1f} s")
    info = scenario.start_counter(state, source, "counter", workdir)
    _say(quiet, f"counter service running on {source} at {info['ip']}:{scenario.PORT}")
    client_netns = mesh.hosts[client_host].netns
    assert client_netns is not None
    client = scenario.CounterClient(client_netns, info["ip"], workdir).start()
    try:
        _say(quiet, f"client on {client_host} holds one connection and sends a request every 50 ms")
        time.sleep(1.0)
        _say(quiet, f"migrating counter: {source} -> {target}")
        facts = {h: agentctl.client(state, mesh, h).call("GET", "/v1/facts") for h in (source, target)}
        report = migration.migrate(state, "counter", target)
        time.sleep(1.5)
    finally:
        seen = client.stop()
    result = {"migration": report, "client": seen}
    if vm:
        result |= {
            "source_kernel": facts[source]["kernel"], "target_kernel": facts[target]["kernel"],
            "wireguard": facts[target]["wireguard"], "precopy_method": report.get("precopy_method"),
        }  # fmt: skip
    return result
