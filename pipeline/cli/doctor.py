"""skyferry doctor: check this host for everything a live migration depends on."""

from typing import Any

import typer
from rich.markup import escape
from skyferry.pipeline.agent import doctor as checks

from . import output
from .app import app

_STYLE = {checks.Status.PASS: "green", checks.Status.WARN: "yellow", checks.Status.FAIL: "bold red"}


@app.command()
def doctor(
    host: str | None = typer.Option(None, "--host", help="Check a mesh host through its agent (local, VM or cloud)."),
    json_out: bool = typer.Option(False, "--json", help=output.JSON_OPTION_HELP),
) -> None:
    """Check this host: CRIU, TCP repair, lazy pages, soft-dirty, WireGuard, runtimes, namespaces.

    Each check prints [green]PASS[/green], [yellow]WARN[/yellow] (works, but slower or with a feature off) or [red]FAIL[/red] (migrations will fail), with a one-line fix.

    Exits 1 when anything FAILs, so scripts can gate on it. The last line says which pre-copy method migrations from this host use: CRIU's iterative pre-dump where the kernel has soft-dirty tracking, content-based pre-copy where it does not.

    Examples:

        skyferry doctor

        skyferry doctor --host vm-1

        skyferry doctor --json | jq -r '.checks[] | select(.status != "PASS") | .fix'
    """  # noqa: E501  (Typer keeps line breaks in rich help, so each paragraph is one line)
    report = _remote(host) if host else checks.report()
    if json_out:
        output.print_json(report)
    else:
        rows = report["checks"]
        width = max(len(r["name"]) for r in rows)
        for r in rows:
            status = f"[{_STYLE[checks.Status(r['status'])]}]{r['status']}[/]"
            line = f"{status}  {r['name']:<{width}}  {escape(r['detail'])}"
            output.console.print(line, highlight=False, soft_wrap=True)
            if r["fix"]:
                fix = f"      {'':<{width}}  [dim]fix:[/dim] {escape(r['fix'])}"
                output.console.print(fix, highlight=False, soft_wrap=True)
        output.console.print(
            f"\npre-copy method on {host or 'this host'}: [bold]{report['precopy_method'] or 'unknown'}[/bold]",
            highlight=False,
            soft_wrap=True,
        )
    raise typer.Exit(0 if report["ok"] else 1)


def _remote(host: str) -> dict[str, Any]:
    from skyferry.netplane.mesh import Mesh
    from skyferry.pipeline.controller import agentctl
    from skyferry.pipeline.controller.state import state_dir

    state = state_dir()
    return agentctl.client(state, Mesh.load(state), host).call("GET", "/v1/doctor")  # type: ignore[no-any-return]
