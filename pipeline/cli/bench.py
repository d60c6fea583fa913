"""`skyferry bench`: every migration mode against stop-copy on local hosts; table, JSON and PNG."""

import signal
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table
from skyferry.pipeline.scenarios import bench as runner
from skyferry.pipeline.scenarios import bench_evacuate, benchreport, evacreport

from . import output
from .app import app


@app.command(rich_help_panel="Getting started")
def bench(
    quick: bool = typer.Option(False, "--quick", help="64 MiB and 256 MiB workloads only (a few minutes)."),
    out: Path = typer.Option(Path("bench/out"), "--out", help="Folder for bench.json, bench.md, bench.png."),
    wan: str = typer.Option(runner.WAN, "--wan", help="Emulated WAN between the hosts."),
    json_out: bool = typer.Option(False, "--json", help=output.JSON_OPTION_HELP),
    evacuate: bool = typer.Option(
        False,
        "--evacuate",
        help="Instead: evacuate 1, 4 and 8 containers against the iperf3 bound, and the "
        "Podman checkpoint/restore baseline (--quick: 1 and 4 containers of 32 MiB).",
    ),
    parallel: int = typer.Option(4, "--parallel", help="--evacuate: migrations at once (at most the count)."),
) -> None:
    """Measure live migration in every mode against stop-copy, on 3 local hosts with an emulated WAN.

    Workloads: a TCP counter service holding 256 MiB and 1 GiB of realistic memory (--quick: 64 MiB and
    256 MiB), each dirtying 20 MB/s, with a client on local-3 holding one connection through each run.
    Each workload is migrated between local-1 and local-2 once per mode (stop-copy first, after one
    unmeasured warm-up migration), and iperf3 measures the same overlay path both ways.

    Per run: the freeze, the client's largest gap, the total time, the bytes on the wire (and each one's
    ratio to the stop-copy run of the same workload in this bench), pre-copy rounds and why they stopped,
    bytes on the wire ÷ RSS, and the memory stream's rate against iperf3's. A failed run is reported and
    the others go on; a migration still running after 180 s + 0.25 s per MiB is killed and reported as
    failed. The hosts are always torn down. Takes 3-20 minutes on 2 cores (--quick: 2-8), more when a
    mode stalls. Exit status 1 if any run failed.

    Examples:

      skyferry bench --quick

      skyferry bench --out bench/out --json > bench.json

      skyferry bench --evacuate --out bench/out

    --evacuate: N containers (1, 4, 8) holding 64 MiB of incompressible memory each, with a client each on
    local-3, are evacuated from local-1 to local-2 with `skyferry evacuate --parallel` (at most N). Per
    count: seconds taken against the seconds iperf3 (the faster of just before and just after, same
    direction) needs for all that memory, when each container finished, and the clients' largest gaps.
    Then one such container moves with Podman's `checkpoint --export` / `restore --import`, its archive
    sent over the same overlay, and skyferry's one-container run is compared with it. Writes
    evacuate.json and evacuate.md.
    """
    # `kill` must still tear the hosts down (the runner's finally); Python's default for SIGTERM skips
    # finally blocks. (netplane/__init__.py keeps pyroute2's forked helpers from inheriting this.)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))

    def progress(text: str) -> None:  # stderr, so a log of a background run shows where it is
        output.err_console.print(f"[bold cyan]>[/bold cyan] {text}", highlight=False)

    if evacuate:
        _evacuate(quick, out, wan, json_out, parallel, progress)
        return
    cfg = runner.Config(workloads=runner.QUICK if quick else runner.FULL, wan=wan or None)
    progress(f"modes: {', '.join(cfg.mode_order())}")

    result = runner.run(cfg, progress)
    paths = benchreport.write(result, out)
    result["files"] = {k: str(v) for k, v in paths.items()}
    if json_out:
        output.print_json(result)
    else:
        _print(result, paths)
    if result["errors"] or not result["runs"] or not all(r["ok"] for r in result["runs"]):
        raise typer.Exit(1)


def _print(result: dict[str, Any], paths: dict[str, Path]) -> None:
    # Piped output (a log, the README) gets whole tables instead of 80 squeezed columns.
    console = output.console if output.console.is_terminal else Console(width=200)
    wan = result["config"].get("wan") or "none"
    for title, columns, rows in (
        (
            f"skyferry bench, WAN {wan} (xN: ratio to this workload's stop-copy)",
            benchreport.COLUMNS,
            benchreport.rows(result),
        ),
        ("Targets (issue 5)", ["", "stop-copy", "best mode", "goal"], benchreport.targets(result)),
    ):
        console.print(_table(title, columns, rows))
    console.print(f"iperf3 over the overlay, 8 MiB window: {benchreport.iperf3_line(result)}", highlight=False)
    console.print(f"machine: {benchreport.machine_line(result['machine'])}", highlight=False)
    for err in result["errors"]:
        console.print(f"[bold red]error:[/bold red] {err}", highlight=False)
    files = ", ".join(str(p) for p in paths.values())
    console.print(f"wrote {files} in {result['seconds']:.0f} s", highlight=False)


def _evacuate(quick: bool, out: Path, wan: str, json_out: bool, parallel: int, progress: runner.Progress) -> None:
    cfg = bench_evacuate.Config(wan=wan or None, parallel=parallel)
    if quick:
        cfg.counts, cfg.memory_mib = (1, 4), 32
    result = bench_evacuate.run(cfg, progress)
    paths = evacreport.write(result, out)
    result["files"] = {k: str(v) for k, v in paths.items()}
    if json_out:
        output.print_json(result)
    else:
        console = output.console if output.console.is_terminal else Console(width=200)
        tables = [(f"skyferry bench --evacuate, WAN {result['config'].get('wan') or 'none'}, {cfg.memory_mib} MiB "
                   "incompressible each", evacreport.COLUMNS, evacreport.rows(result))]  # fmt: skip
        if result.get("podman"):
            tables.append(("Against Podman checkpoint --export / restore --import (one container)",
                           evacreport.PODMAN_COLUMNS, evacreport.podman_rows(result)))  # fmt: skip
        for title, columns, rows in tables:
            console.print(_table(title, columns, rows))
        console.print(f"iperf3 {bench_evacuate.SOURCE} -> {bench_evacuate.TARGET} before / after, by containers: "
                      f"{evacreport.iperf3_line(result) or 'not measured'}", highlight=False)  # fmt: skip
        console.print(f"machine: {benchreport.machine_line(result['machine'])}", highlight=False)
        for err in result["errors"]:
            console.print(f"[bold red]error:[/bold red] {err}", highlight=False)
        console.print(
            f"wrote {', '.join(str(p) for p in paths.values())} in {result['seconds']:.0f} s", highlight=False
        )
    podman_ok = (result.get("podman") or {}).get("ok", not cfg.podman)
    if result["errors"] or not result["runs"] or not all(r["ok"] for r in result["runs"]) or not podman_ok:
        raise typer.Exit(1)


def _table(title: str, columns: list[str], rows: list[list[str]]) -> Table:
    table = Table(title=title, title_justify="left")
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    return table
