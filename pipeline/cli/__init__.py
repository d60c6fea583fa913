"""The `skyferry` command. Errors a user can act on print one line and a hint, never a traceback."""

import sys
from difflib import get_close_matches
from types import ModuleType
from typing import Any, NoReturn

import typer
from rich.markup import escape
from skyferry.netplane.errors import NetplaneError
from skyferry.pipeline.errors import SkyferryError
from skyferry.providers.errors import ProviderError

from . import output
from .app import app

# Command modules register themselves on `app` when imported; the order here is the order in --help.
from . import hosts, join, mesh, containers, migrate, provision, doctor, metrics, agent, demo, bench, runbooks  # noqa: F401  isort: skip

USER_ERRORS = (SkyferryError, NetplaneError, ProviderError)


def _click_exception_modules() -> list[ModuleType]:
    """Where the parser's exceptions live: typer >= 0.22 vendors click as `typer._click`, older typer
    raises plain click's. Asking typer which one it uses keeps this right for any installed version."""
    modules = [sys.modules[typer.BadParameter.__module__]]
    try:
        import click.exceptions
    except ImportError:
        return modules
    if click.exceptions not in modules:
        modules.append(click.exceptions)
    return modules


_MODULES = _click_exception_modules()
CLICK_ERRORS = tuple(m.ClickException for m in _MODULES)
USAGE_ERRORS = tuple(m.UsageError for m in _MODULES)
EXITS = tuple({typer.Exit, *(m.Exit for m in _MODULES if hasattr(m, "Exit"))})
ABORTS = tuple({typer.Abort, *(m.Abort for m in _MODULES if hasattr(m, "Abort"))})


def _fail(message: str, hint: str | None, code: int = 2) -> NoReturn:
    if "--json" in sys.argv:
        output.print_json({"error": message, "hint": hint})
    else:
        # soft_wrap: one line each, however narrow the terminal; escape: messages may hold brackets
        output.err_console.print(f"[bold red]error:[/bold red] {escape(message)}", highlight=False, soft_wrap=True)
        if hint:
            output.err_console.print(f"[dim]hint:[/dim] {escape(hint)}", highlight=False, soft_wrap=True)
    sys.exit(code)


def _suggestion(exc: Any) -> str | None:
    """Click's own candidates for a mistyped option, or the closest subcommand for a mistyped command."""
    possibilities = getattr(exc, "possibilities", None)
    if possibilities:
        return " or ".join(sorted(possibilities)[:3])
    ctx = getattr(exc, "ctx", None)
    message = getattr(exc, "message", "")
    if ctx is not None and message.startswith("No such command") and hasattr(ctx.command, "list_commands"):
        typed = message.split("'")[1] if "'" in message else ""
        close = get_close_matches(typed, ctx.command.list_commands(ctx), n=1)
        return close[0] if close else None
    return None


def _usage_error(exc: Any) -> NoReturn:
    ctx = getattr(exc, "ctx", None)
    if type(exc).__name__ == "NoArgsIsHelpError":  # a group given no subcommand: its help is the answer
        output.err_console.print(exc.format_message(), highlight=False, markup=False)  # empty when typer printed it
        sys.exit(2)
    message = exc.message if getattr(exc, "possibilities", None) else exc.format_message()
    suggestion = None if "did you mean" in message.lower() else _suggestion(exc)
    if suggestion:
        message = f"{message.rstrip('.')} (did you mean {suggestion}?)"
    usage = ctx.get_usage().replace("Usage:", "usage:", 1) if ctx is not None else None
    hint = f"{usage}  (see '{ctx.command_path} --help')" if ctx is not None else "see 'skyferry --help'"
    _fail(message, hint)


def main() -> None:
    command = typer.main.get_command(app)
    try:
        rc = command.main(prog_name="skyferry", standalone_mode=False)
        if isinstance(rc, int):
            sys.exit(rc)
    except USER_ERRORS as exc:
        _fail(str(exc), exc.hint)
    except EXITS as exc:
        sys.exit(exc.exit_code)
    except USAGE_ERRORS as exc:
        _usage_error(exc)
    except CLICK_ERRORS as exc:
        _fail(exc.format_message(), None, exc.exit_code)
    except ABORTS:
        output.err_console.print("aborted")
        sys.exit(130)
