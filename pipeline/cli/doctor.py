"""skyferry doctor: check this host for everything a live migration depends on."""

import typer
from rich.markup import escape
from skyferry.pipeline.agent import doctor as checks

from . import output
from .app import app

_STYLE = {checks.Status.PASS: "green", checks.Status.WARN: "yellow", checks.Status.FAIL: "bold red"}


@app.command()
def doctor(json_out: bool = typer.Option(False, "--json", help=output.JSON_OPTION_HELP)) -> None:
    """Check this host: CRIU, TCP repair, lazy pages, soft-dirty, WireGuard, runtimes, namespaces.

    Each check prints [green]PASS[/green], [yellow]WARN[/yellow] (works, but slower or with a feature off) or [red]FAIL[/red] (migrations will fail), with a one-line fix.

    Exits 1 when anything FAILs, so scripts can gate on it. The last line says which pre-copy method migrations from this host use: CRIU's iterative pre-dump where the kernel has soft-dirty tracking, content-based pre-copy where it does not.

    Examples:

        skyferry doctor

        skyferry doctor --json | jq -r '.checks[] | select(.status != "PASS") | .fix'
    """  # noqa: E501  (Typer keeps line breaks in rich help, so each paragraph is one line)
    results = checks.run_checks()
    precopy = next((r.value for r in results if r.name.startswith("pre-copy")), None)
    if json_out:
        report = {"ok": not checks.failed(results), "precopy_method": precopy}
        output.print_json(report | {"checks": [r.as_dict() for r in results]})
    else:
        width = max(len(r.name) for r in results)
        for r in results:
            status = f"[{_STYLE[r.status]}]{r.status}[/]"
            output.console.print(f"{status}  {r.name:<{width}}  {escape(r.detail)}", highlight=False, soft_wrap=True)
            if r.fix:
                output.console.print(
                    f"      {'':<{width}}  [dim]fix:[/dim] {escape(r.fix)}", highlight=False, soft_wrap=True
                )
        output.console.print(
            f"\npre-copy method on this host: [bold]{precopy or 'unknown'}[/bold]",
            highlight=False,
            soft_wrap=True,
        )
    raise typer.Exit(1 if checks.failed(results) else 0)
