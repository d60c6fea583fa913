"""`skyferry bench`: issue 16's Targets table from one run on local hosts; every mode against stop-copy,
evacuations against the link, and the Podman baseline; table, JSON, Markdown and PNG."""

import signal
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.scenarios import bench as runner
from skyferry.pipeline.scenarios import bench_evacuate, benchreport, benchtargets, evacreport

from . import output
from .app import app

PARTS = [*dict.fromkeys(w.part for w in benchtargets.FULL + benchtargets.QUICK), "evacuate", "podman"]


@app.command(rich_help_panel="Getting started")
def bench(
    quick: bool = typer.Option(
        False, "--quick", help="Small sizes: the tiny service, 256 MiB, 64 MiB incompressible, 1 and 4 x 32 MiB."
    ),
    out: Path = typer.Option(
        Path("bench/out"),
        "--out",
        help="Folder for bench.json, bench.md, bench.png; and logs/ with the CRIU logs of any migration that "
        "failed or froze far past its prediction.",
    ),
    wan: str = typer.Option(benchtargets.WAN, "--wan", help="Emulated WAN between the hosts."),
    json_out: bool = typer.Option(False, "--json", help=output.JSON_OPTION_HELP),
    skip: list[str] = typer.Option([], "--skip", help=f"Leave a part out (repeat for more): {', '.join(PARTS)}."),
    evacuate: bool = typer.Option(
        False, "--evacuate", help="Only the evacuations and the Podman baseline (--skip every workload)."
    ),
    parallel: int = typer.Option(4, "--parallel", help="Evacuations: migrations at once (at most the count)."),
) -> None:
    """Measure live migration against issue 16's targets, on 3 local hosts with an emulated WAN, and print
    the Targets table with every run behind it.

    One mesh serves every part, in this order:

    - tiny: the counter service `make demo` moves (no memory), in stop-copy and the default mode (auto);
    - 256mib, 1gib: the counter holding 256 MiB and 1 GiB of realistic memory (about 3 times
      compressible) dirtying 20 MB/s, in every mode;
    - incompressible: 512 MiB of incompressible memory dirtying 20 MB/s, in stop-copy and the default mode;
    - evacuate: 1, 4 and 8 containers of 64 MiB of incompressible memory evacuated from local-1 to
      local-2 with `skyferry evacuate --parallel`, against the seconds iperf3's rate needs for that memory;
    - podman: one such container moved with Podman's `checkpoint --export` / `restore --import`, its
      archive sent over the same overlay, against skyferry's one-container evacuation.

    Each workload is migrated between local-1 and local-2 (after one unmeasured warm-up migration), with a
    client on local-3 holding one connection through each run; iperf3 measures the same overlay path.
    Per run: the freeze, the client's largest gap, the total time, the bytes on the wire (and each one's
    ratio to the stop-copy run of the same workload), the mode auto chose, pre-copy rounds and why they
    stopped, bytes on the wire ÷ RSS, and the memory stream's rate against iperf3's.

    A failed run is reported and the others go on; a migration still running after 180 s + 0.25 s per
    MiB is killed and reported as failed. The hosts are always torn down. Takes about 20 minutes on 2
    quiet cores (--quick: about 5), twice that under load. Exit status 1 if any run failed.

    Examples:

      skyferry bench --quick

      skyferry bench --out bench/out --json > bench.json

      skyferry bench --skip 1gib --skip podman

      skyferry bench --evacuate --parallel 8
    """
    # `kill` must still tear the hosts down (the runner's finally); Python's default for SIGTERM skips
    # finally blocks. (netplane/__init__.py keeps pyroute2's forked helpers from inheriting this.)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))

    def progress(text: str) -> None:  # stderr, so a log of a background run shows where it is
        output.err_console.print(f"[bold cyan]>[/bold cyan] {text}", highlight=False)

    cfg = replace(config(quick, wan, skip, evacuate, parallel), keep_logs=out / "logs")
    for wl in cfg.workloads:
        progress(f"{wl.label}: {', '.join(cfg.mode_order(wl))}")
    if ev := cfg.evacuate:
        counts = ", ".join(map(str, ev.counts)) or "none"
        progress(f"evacuations of {counts} x {ev.memory_mib} MiB; Podman baseline: {'yes' if ev.podman else 'no'}")
    result = runner.run(cfg, progress)
    paths = benchreport.write(result, out)
    result["files"] = {k: str(v) for k, v in paths.items()}
    if json_out:
        output.print_json(result)
    else:
        _print(result, paths)
    if runner.failed(result):
        raise typer.Exit(1)


def config(quick: bool, wan: str, skip: list[str], evacuate_only: bool, parallel: int) -> runner.Config:
    """The bench's Config from the command line: the full or quick workloads less the parts skipped."""
    if unknown := sorted(set(skip) - set(PARTS)):
        raise SkyferryError(f"no bench part {', '.join(unknown)}", hint=f"--skip {' | '.join(PARTS)}")
    workloads = benchtargets.QUICK if quick else benchtargets.FULL
    evac = bench_evacuate.Config(parallel=parallel, podman="podman" not in skip)
    if quick:
        evac.counts, evac.memory_mib = benchtargets.QUICK_EVACUATE_COUNTS, benchtargets.QUICK_EVACUATE_MIB
    if "evacuate" in skip:
        evac.counts = ()
    return runner.Config(
        workloads=() if evacuate_only else tuple(w for w in workloads if w.part not in skip),
        evacuate=None if "evacuate" in skip and "podman" in skip else evac,
        wan=wan or None,
        warm_memory_gib=2.0 if quick else runner.Config.warm_memory_gib,
    )


def _print(result: dict[str, Any], paths: dict[str, Path]) -> None:
    # Piped output (a log, the README) gets whole tables instead of 80 squeezed columns.
    console = output.console if output.console.is_terminal else Console(width=200)
    wan = result["config"].get("wan") or "none"
    tables = [(f"Targets (issue 16), WAN {wan}", benchtargets.COLUMNS, benchreport.target_rows(result))]
    if result["runs"]:
        tables.append(("Migrations (xN: ratio to this workload's stop-copy)", benchreport.COLUMNS,
                       benchreport.rows(result)))  # fmt: skip
        if freeze := benchreport.freeze_rows(result):
            tables.append(("Where each freeze went (ms)", benchreport.FREEZE_COLUMNS, freeze))
    if evac := result.get("evacuate"):
        cfg = evac["config"]
        if evac["runs"]:
            tables.append((f"Evacuations, {cfg['memory_mib']} MiB incompressible each", evacreport.COLUMNS,
                           evacreport.rows(evac)))  # fmt: skip
        if evac.get("podman"):
            tables.append(("Against Podman checkpoint --export / restore --import (one container)",
                           evacreport.PODMAN_COLUMNS, evacreport.podman_rows(evac)))  # fmt: skip
    for title, columns, rows in tables:
        console.print(_table(title, columns, rows))
    if result["runs"]:
        console.print(f"iperf3 over the overlay, 8 MiB window: {benchreport.iperf3_line(result)}", highlight=False)
    if evac and evac["runs"]:
        console.print(f"iperf3 {bench_evacuate.SOURCE} -> {bench_evacuate.TARGET} before / after each evacuation: "
                      f"{evacreport.iperf3_line(evac) or 'not measured'}", highlight=False)  # fmt: skip
    console.print(f"machine: {benchreport.machine_line(result['machine'])}", highlight=False)
    for err in result["errors"]:
        console.print(f"[bold red]error:[/bold red] {err}", highlight=False)
    files = ", ".join(str(p) for p in paths.values())
    console.print(f"wrote {files} in {result['seconds']:.0f} s", highlight=False)


def _table(title: str, columns: list[str], rows: list[list[str]]) -> Table:
    table = Table(title=title, title_justify="left")
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    return table
