"""`skyferry evacuate | exit | rebalance`: the runbook commands. Safe to run unattended and to run again.

Each ends with a summary table (or --json), writes `<state>/reports/<run>/` (summary.json, report.html and,
per migration, a JSON report and a PNG plot), and exits 0 only if everything it set out to do is done:
1 if some container did not move (the others did), 2 for bad input. docs/runbooks.md has the playbook.
"""

import time
from pathlib import Path
from typing import Any

import typer
from skyferry.netplane.errors import NetplaneError
from skyferry.pipeline.controller.state import state_dir
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.runbooks import evacuate as evacuation
from skyferry.pipeline.runbooks import exitplan, testcutover
from skyferry.pipeline.runbooks import rebalance as balancing
from skyferry.pipeline.runbooks import report as runreport
from skyferry.providers.errors import ProviderError

from . import output
from .app import app

PANEL = "Runbooks"
USER_ERRORS = (SkyferryError, NetplaneError, ProviderError)


def _progress(enabled: bool) -> Any:
    """One stderr line per stage: readable in a terminal and in a pager's log alike."""

    def say(container: str, stage: str) -> None:
        if enabled:
            output.err_console.print(f"[dim]{container}:[/dim] {stage}", highlight=False)

    return say


def _finish(summary: dict[str, Any], json_out: bool, table: list[list[Any]], columns: list[str]) -> None:
    if json_out:
        output.print_json(summary)
    else:
        output.print_table(None, columns, table)
        if summary.get("report_dir"):
            output.console.print(f"report: {summary['report_dir']}", highlight=False)
        output.console.print("OK" if summary["ok"] else "NOT OK: see the table; run the same command again to retry")
    if not summary["ok"]:
        raise typer.Exit(1)


@app.command(rich_help_panel=PANEL)
def evacuate(
    host: str = typer.Option(..., "--host", help="The host to empty."),
    to: list[str] = typer.Option([], "--to", help="Target host, repeatable (default: every other mesh host)."),
    to_provider: str | None = typer.Option(None, "--to-provider", help="Targets: every mesh host of this provider."),
    parallel: int = typer.Option(1, "--parallel", "-p", min=1, max=16, help="Migrations at once, at most."),
    bandwidth: str | None = typer.Option(
        None,
        "--bandwidth",
        help="The source's uplink, e.g. 1gbit (default: the mesh's WAN rate, if emulated): no more migrations "
        "stream their memory at once than it holds at the fastest stream's rate.",
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show the placement; move nothing."),
    json_out: bool = typer.Option(False, "--json", help=output.JSON_OPTION_HELP),
) -> None:
    """Move every container off HOST, live, onto targets with room (free memory and CPU, measured).

    Order: label priority (higher first), then size (larger first). Each container migrates or rolls back on its own; one failure never stops the rest. Exit 1 names the ones that stayed.

    Running it again continues where it stopped: moved containers are done, and half-done migrations are finished from the journal first. Playbook: docs/runbooks.md.

    Examples:

        skyferry evacuate --host local-1 --dry-run

        skyferry evacuate --host local-1 --to local-2 --to local-3 --parallel 2 --json
    """  # noqa: E501  (Typer keeps line breaks in rich help, so each paragraph is one line)
    summary = evacuation.evacuate(
        state_dir(), host, to or None, to_provider, parallel, dry_run, _progress(not json_out), bandwidth
    )  # fmt: skip
    if (bw := summary.get("bandwidth")) and bw["link_bps"] and not json_out:
        rates = ", ".join(f"{k}: {v / 1e6:.0f}" for k, v in bw["link_bps"].items())
        uplink = f"; uplink {bw['budget_bps'] / 1e6:.0f} Mbit/s" if bw["budget_bps"] else ""
        output.err_console.print(f"streams at once: {bw['cap']} (of --parallel {bw['parallel']}); Mbit/s by streams "
                                 f"at once: {rates}{uplink}", highlight=False)  # fmt: skip
    if dry_run:
        plan = summary["plan"]
        rows = [[m["container"], host, m["target"], m["priority"], f"{m['memory'] >> 20} MiB", "planned"]
                for m in plan["moves"]]  # fmt: skip
        rows += [[u["container"], host, "-", "-", f"{u['memory'] >> 20} MiB", u["error"]] for u in plan["unplaced"]]
        _finish(summary, json_out, rows, ["CONTAINER", "FROM", "TO", "PRIORITY", "MEMORY", "PLAN"])
        return
    _finish(summary, json_out, evacuation.rows(summary["results"]), evacuation.COLUMNS)


@app.command("exit", rich_help_panel=PANEL)
def exit_(
    plan: Path = typer.Option(..., "--plan", help="PLAN.yaml: sources, target, waves, what to do afterwards."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate the plan and show each wave's placement."),
    json_out: bool = typer.Option(False, "--json", help=output.JSON_OPTION_HELP),
) -> None:
    """A cloud exit in waves: provision, test-cut, cut over, verify, decommission. Resumable.

    Every mistake in the plan is reported with its field (waves[1].containers[0]: …) before anything moves. The plan format is in docs/runbooks.md.

    Progress is recorded per plan name: after a crash, run the same command again; finished waves are skipped, never repeated.

    Examples:

        skyferry exit --plan leave-cloud-a.yaml --dry-run

        skyferry exit --plan leave-cloud-a.yaml --json
    """  # noqa: E501  (Typer keeps line breaks in rich help, so each paragraph is one line)
    say = _progress(not json_out)
    summary = exitplan.run(state_dir(), plan, dry_run, lambda stage: say("exit", stage))
    _finish(summary, json_out, exitplan.rows(summary), ["STEP", "STATUS", "DETAIL"])


@app.command(rich_help_panel=PANEL)
def rebalance(
    policy: Path | None = typer.Option(None, "--policy", help="YAML thresholds (docs/runbooks.md); defaults 85%/70%."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show the moves; make none."),
    watch: bool = typer.Option(False, "--watch", help="Re-evaluate every policy interval until stopped."),
    rounds: int = typer.Option(0, "--rounds", min=0, help="With --watch: stop after N evaluations (0: never)."),
    json_out: bool = typer.Option(False, "--json", help=output.JSON_OPTION_HELP),
) -> None:
    """Move containers off hosts above the CPU or memory high-water mark onto hosts below the low one.

    Moves the fewest containers needed, and nothing when the cluster is balanced. Hysteresis (high and low marks, and a cooldown per container) keeps anything from ping-ponging. Policy fields: docs/runbooks.md.

    Examples:

        skyferry rebalance --dry-run

        skyferry rebalance --policy balance.yaml --watch      # as a service: Ctrl-C or SIGTERM stops it
    """  # noqa: E501  (Typer keeps line breaks in rich help, so each paragraph is one line)
    rules = balancing.load_policy(policy)
    say = _progress(not json_out)
    done = 0
    while True:
        done += 1
        try:
            summary = balancing.rebalance(state_dir(), rules, dry_run, say)
        except USER_ERRORS as exc:
            if not watch or (rounds and done >= rounds):
                raise
            # Trigger mode outlives a host that is briefly unreachable: say so, try again next interval.
            output.err_console.print(f"[bold red]error:[/bold red] {exc} (retrying in {rules.interval:g} s)")
            time.sleep(rules.interval)
            continue
        table = [[m["container"], m["source"], m["target"], f"{m['memory'] >> 20} MiB",
                  _state(summary, m["container"], dry_run)] for m in summary["moves"]]  # fmt: skip
        table += [[f"({h} stays over)", h, "-", "-", "stuck"] for h in summary["stuck"]]
        if not table:
            table = [["(balanced: nothing to move)", "", "", "", ""]]
        if not watch or (rounds and done >= rounds):
            _finish(summary, json_out, table, ["CONTAINER", "FROM", "TO", "MEMORY", "STATE"])
            return
        output.print_json(summary) if json_out else output.print_table(
            None, ["CONTAINER", "FROM", "TO", "MEMORY", "STATE"], table
        )  # fmt: skip
        time.sleep(rules.interval)


def _state(summary: dict[str, Any], name: str, dry_run: bool) -> str:
    if dry_run:
        return "planned"
    for r in summary["results"]:
        if r["container"] == name:
            return r["state"] + (f": {r['error']}" if r.get("error") else "")
    return "-"


def test_cutover(name: str, to: str, test: bool, check: str | None, json_out: bool) -> None:
    """`skyferry migrate NAME --to HOST --test [--check CMD]` (registered in cli/migrate.py)."""
    if not test:
        raise SkyferryError(
            "--check only applies to a test cutover", hint=f"skyferry migrate {name} --to {to} --test --check …"
        )
    say = _progress(not json_out)
    state = state_dir()
    report = testcutover.run(state, name, to, check, progress=lambda stage: say(name, stage))
    report["report_dir"] = str(runreport.write(state, report["id"], report, [], [testcutover.section(report)]))
    if json_out:
        output.print_json(report)
    else:
        output.print_table(None, ["", ""], testcutover.rows(report))
        output.console.print(f"report: {report['report_dir']}", highlight=False)
    if not report["passed"]:
        raise typer.Exit(1)
