"""`skyferry bench`: every migration mode against stop-copy on local hosts; table, JSON and PNG."""

import sys
from pathlib import Path

import typer
from skyferry.pipeline import bench as runner

from . import output
from .app import app


@app.command(rich_help_panel="Getting started")
def bench(
    quick: bool = typer.Option(False, "--quick", help="64 MiB and 256 MiB workloads only (a few minutes)."),
    out: Path = typer.Option(Path("bench/out"), "--out", help="Folder for bench.json and bench.png."),
    wan: str = typer.Option(runner.WAN, "--wan", help="Emulated WAN between the hosts."),
    json_out: bool = typer.Option(False, "--json", help=output.JSON_OPTION_HELP),
) -> None:
    """Measure live migration in every mode against stop-copy, on 3 local hosts with an emulated WAN.

    Workloads: a TCP counter service holding 256 MiB and 1 GiB of realistic memory (--quick: 64 MiB and
    256 MiB), each dirtying 20 MB/s, with a client on local-3 holding one connection through each run.
    Each workload is migrated between local-1 and local-2 once per mode (stop-copy first, after one
    unmeasured warm-up migration), and iperf3 measures the same overlay path both ways.

    Per run: the freeze, the client's largest gap, the total time, the bytes on the wire (and each one's
    ratio to the stop-copy run of the same workload in this bench), pre-copy rounds and why they stopped,
    bytes on the wire ÷ RSS, and the memory stream's rate against iperf3's. A failed run is reported and
    the others go on; the hosts are always torn down. Takes 10-20 minutes on 2 cores (--quick: 2-4).

    Examples:

      skyferry bench --quick

      skyferry bench --out bench/out --json > bench.json
    """
    cfg = runner.Config(workloads=runner.QUICK if quick else runner.FULL, wan=wan or None)
    show = not json_out and sys.stderr.isatty()
    modes = ", ".join(cfg.mode_order())
    if show:
        output.err_console.print(f"[bold cyan]>[/bold cyan] modes: {modes}", highlight=False)

    def progress(text: str) -> None:
        if show:
            output.err_console.print(f"[bold cyan]>[/bold cyan] {text}", highlight=False)

    result = runner.run(cfg, progress)
    paths = runner.write(result, out)
    result["files"] = {k: str(v) for k, v in paths.items()}
    if json_out:
        output.print_json(result)
    else:
        perf = "; ".join(f"{k} {v['mbit_s']:.0f} Mbit/s" for k, v in result["iperf3"].items()) or "not measured"
        output.print_table(
            f"skyferry bench: WAN {cfg.wan or 'none'}; (xN: ratio to the same workload's stop-copy)",
            runner.COLUMNS,
            runner.rows(result),
        )
        output.print_table("Targets (issue 5)", ["", "stop-copy", "best mode", "goal"], runner.targets(result))
        output.console.print(f"iperf3 over the overlay, 8 MiB window: {perf}", highlight=False)
        output.console.print(f"machine: {runner.machine_line(result['machine'])}", highlight=False)
        for err in result["errors"]:
            output.console.print(f"[bold red]error:[/bold red] {err}", highlight=False)
        output.console.print(f"wrote {paths['json']} and {paths['png']} in {result['seconds']:.0f} s", highlight=False)
    if result["errors"] or not result["runs"] or not all(r["ok"] for r in result["runs"]):
        raise typer.Exit(1)
