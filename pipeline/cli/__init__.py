"""The `skyferry` command. Errors a user can act on print one line and a hint, never a traceback."""

import sys

import click
import typer
from skyferry.netplane.errors import NetplaneError
from skyferry.pipeline.errors import SkyferryError
from skyferry.providers.errors import ProviderError

from . import output
from .app import app

# Command modules register themselves on `app` when imported; the order here is the order in --help.
from . import hosts, containers, migrate, provision, doctor, agent, demo, bench, runbooks  # noqa: F401  isort: skip

USER_ERRORS = (SkyferryError, NetplaneError, ProviderError)


def main() -> None:
    command = typer.main.get_command(app)
    try:
        rc = command.main(prog_name="skyferry", standalone_mode=False)
        if isinstance(rc, int):
            sys.exit(rc)
    except USER_ERRORS as exc:
        if "--json" in sys.argv:
            output.print_json({"error": str(exc), "hint": exc.hint})
        else:
            output.err_console.print(f"[bold red]error:[/bold red] {exc}", highlight=False)
            if exc.hint:
                output.err_console.print(f"[dim]hint:[/dim] {exc.hint}", highlight=False)
        sys.exit(2)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        output.err_console.print("aborted")
        sys.exit(130)
