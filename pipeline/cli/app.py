"""The root Typer app; each command module in this package registers itself on it."""

import logging
import os
from enum import StrEnum

import typer
from skyferry.pipeline import logfmt

LOG_FORMAT_ENV = "SKYFERRY_LOG_FORMAT"


class LogFormat(StrEnum):
    """`--log-format` (pipeline/logfmt.py)."""

    text = "text"
    json = "json"


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
    log_format: LogFormat | None = typer.Option(
        None,
        "--log-format",
        envvar=LOG_FORMAT_ENV,
        help="text, or json: one object per line (with migration, container, stage) on stderr, from the info "
        "level on; agents this command starts log the same way.",
    ),
) -> None:
    """Live-migrate running containers between hosts and clouds."""
    if log_format is not None:
        os.environ[LOG_FORMAT_ENV] = log_format.value  # the local agents `hosts up` starts inherit it
        logfmt.configure(log_format.value, logging.INFO if log_format == LogFormat.json else logging.WARNING)
