"""The root Typer app; each command module in this package registers itself on it."""

import typer

app = typer.Typer(
    name="skyferry",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    help=(
        "Live-migrate running containers between hosts and clouds.\n\n"
        "Start with [bold]skyferry doctor[/bold], then [bold]skyferry hosts up --local --count 3[/bold], "
        "[bold]skyferry run[/bold] and [bold]skyferry migrate[/bold]. [bold]skyferry demo[/bold] does all of it."
    ),
)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"skyferry {version('skyferry')}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Live-migrate running containers between hosts and clouds."""
