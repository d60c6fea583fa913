"""The workloads table of docs/compatibility.md by one command: each real workload x mode, moved live.

A cell starts the workload (workloads.py) on local-1 with its client working from local-3, moves it to
local-2 and back to local-1, both moves in the cell's mode (`workloads.there_and_back`), stops the client
and records its verdict, the two freezes and what the client saw. A migration that fails is recorded with
skyferry's one-line error and where it stopped: before the freeze ("refused") or inside it ("failed").

    make compat-workloads                                                # every workload and mode; rewrites the table
    python -m skyferry.pipeline.scenarios.workload_matrix jvm node       # some workloads, every mode, printed
    python -m skyferry.pipeline.scenarios.workload_matrix --mode precopy --merge pipeline   # rerun, merge in
    python -m skyferry.pipeline.scenarios.workload_matrix --render cells.json     # the table from a saved run
"""

import argparse
import contextlib
import json
import os
import platform
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel
from skyferry.netplane.mesh import Mesh
from skyferry.pipeline.controller import containers
from skyferry.pipeline.controller.journal import Journal
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.scenarios import demo as scenario
from skyferry.pipeline.scenarios import matrixdoc, workloads

KINDS = ("postgres", "nginx", "memcached", "jvm", "node", "pipeline")
ENGINE = "runc"  # the workloads' images run in runc; Podman and Docker are not in this table yet
MODES = ("precopy", "stop-copy", "hybrid")
BEFORE_FREEZE = ("check", "prepare", "precopy")
CRIU_VERSION = "4.2.1"
HOLDS = {
    "postgres": "PostgreSQL 15 (runs as `postgres`), psycopg2 committing one row per transaction",
    "nginx": "nginx 1.22 (master + 2 workers), 3 keep-alive clients and a paced 8 MiB download",
    "memcached": "memcached 1.6 (4 threads), 4 connections setting and reading back keys",
    "jvm": "OpenJDK 17 line-echo server (a thread per connection), 4 connections",
    "node": "Node.js 18 line-echo server (one event loop), 4 connections",
    "pipeline": "bash pipeline: 2 producers → named FIFO → consumer, appending under flock; a held flock",
}

Outcome = Literal["pass", "refused", "failed"]


class Cell(BaseModel):
    """One workload moved there and back in one mode (or, from the tests, one move of a there-and-back)."""

    workload: str
    engine: str = ENGINE
    mode: str
    outcome: Outcome
    stage: str | None = None  # where it stopped: a migration stage, or "verify" (the client's verdict)
    reason: str = ""
    freeze_ms: list[float] = []  # each move's freeze
    total_ms: list[float] = []
    client: str = ""  # the client's verdict, in a few words
    when: str = ""
    seconds: float = 0.0


class Matrix(matrixdoc.Header):
    cells: list[Cell]


def client_for(
    kind: str, state: Path, mesh: Mesh, name: str, server: dict[str, Any], workdir: Path
) -> workloads.Client:
    """The client that keeps workload `kind` busy (on local-3) and judges it afterwards."""
    netns = mesh.hosts["local-3"].netns or ""
    if kind == "postgres":
        return workloads.ContainerClient(state, "local-3", f"{name}-client", server["ip"])
    if kind == "nginx":
        return workloads.HostClient("http", netns, server["ip"], workdir,
                                    ["--connections", "3", "--interval", "0.02", "--download", "/big.bin",
                                     "--release", str(workdir / "release")])  # fmt: skip
    if kind == "memcached":
        return workloads.HostClient("memcached", netns, server["ip"], workdir,
                                    ["--connections", "4", "--keys", "2000", "--interval", "0"])  # fmt: skip
    if kind in ("jvm", "node"):
        return workloads.HostClient("echo", netns, server["ip"], workdir, ["--connections", "4", "--interval", "0.01"])
    return workloads.PipelineCheck(state, name)


def summary(kind: str, verdict: dict[str, Any]) -> str:
    """What the client saw, in a few words, for the table."""
    if kind == "postgres":
        return f"{verdict.get('commits', 0)} commits on one backend, {len(verdict.get('missing') or [])} missing"
    if kind == "nginx":
        download = verdict.get("download", {})
        return (f"{sum(verdict.get('requests', []))} keep-alive requests; download "
                f"{download.get('bytes', 0)} of {download.get('size', 0)} bytes")  # fmt: skip
    if kind == "memcached":
        return f"{sum(verdict.get('sets', []))} acknowledged sets on {verdict.get('keys', 0)} keys, " \
               f"{verdict.get('lost_count', 0)} lost"  # fmt: skip
    if kind in ("jvm", "node"):
        answered = verdict.get("answered", [])
        return f"{sum(answered)} lines echoed in order on {len(answered)} connections"
    last = ", ".join(f"{who} {n}" for who, n in sorted(verdict.get("last", {}).items()))
    return f"{verdict.get('lines', 0)} log lines in order ({last}); the held flock still held"


def run_cell(state: Path, mesh: Mesh, kind: str, mode: str, workdir: Path) -> Cell:
    """`kind` on local-1, to local-2 and back in `mode` while its client works; the outcome."""
    started = time.monotonic()
    name = f"w-{kind}-{mode}"[:40]
    cell = Cell(workload=kind, mode=mode, outcome="pass", when=_today())
    client: workloads.Client | None = None
    try:
        server = workloads.start(state, "local-1", name, kind, mesh.hosts["local-3"].netns or "")
        if kind == "nginx":  # a download in flight across both moves, released before the verdict
            made = containers.exec_(state, name, ["/bin/sh", "-c", "head -c 8M /dev/urandom > /var/www/html/big.bin"])
            if made.exit_code:
                raise SkyferryError("could not write nginx's download file")
        client = client_for(kind, state, mesh, name, server, workdir).start()
        moves = (("local-2", mode), ("local-1", mode))
        reports = workloads.there_and_back(state, name, client, moves)
        (workdir / "release").touch()
        verdict = client.stop()
        cell = cell.model_copy(update={
            "freeze_ms": [round(r["freeze_ms"], 1) for r in reports],
            "total_ms": [round(r["total_ms"], 1) for r in reports],
            "client": summary(kind, verdict),
        })  # fmt: skip
        if not verdict.get("ok"):
            cell = cell.model_copy(update={"outcome": "failed", "stage": "verify", "reason": _one_line(str(verdict))})
    except SkyferryError as exc:
        cell = cell.model_copy(update=_failure(state, exc))
    finally:
        if client is not None:
            with contextlib.suppress(SkyferryError):  # the container may be gone: nothing to stop there
                client.stop(timeout=5)
        for leftover in [f"{name}-client", name] if kind == "postgres" else [name]:
            # A rollback that went wrong can leave the registry naming a host the container is not on:
            # the cell keeps its outcome, and the mesh's teardown removes whatever is left.
            with contextlib.suppress(SkyferryError):
                containers.remove(state, leftover)
    return cell.model_copy(update={"seconds": round(time.monotonic() - started, 1)})


def _failure(state: Path, exc: SkyferryError) -> dict[str, Any]:
    """Where a failed migration stopped, from the journal: before the freeze (refused) or inside it."""
    last = Journal(state).all()
    if not last or last[-1].state != "rolled-back":
        return {"outcome": "failed", "stage": "start", "reason": _one_line(str(exc))}
    mig = last[-1]
    failed = [t["stage"] for t in Journal(state).transitions(mig.id) if t["status"] == "failed"]
    stage = failed[0] if failed else "check"
    outcome = "refused" if stage in BEFORE_FREEZE else "failed"
    return {"outcome": outcome, "stage": stage, "reason": _one_line(mig.error or str(exc))}


def run_matrix(kinds: list[str], modes: list[str], progress: Callable[[str], None] = print,
               save: Path | None = None) -> Matrix:  # fmt: skip
    """Every workload and mode on a private three-host mesh, torn down afterwards."""
    cells: list[Cell] = []
    old_env = os.environ.get("SKYFERRY_STATE")
    state = Path(tempfile.mkdtemp(prefix="skyferry-workloads-"))
    state.chmod(0o700)
    os.environ["SKYFERRY_STATE"] = str(state)  # the agents and what they start use this state
    try:
        mesh = scenario.mesh_up(state, 3, name="wm" + secrets.token_hex(2))
        for mode in modes:
            for kind in kinds:
                workdir = state / "clients" / f"{kind}-{mode}"
                workdir.mkdir(parents=True)
                cell = run_cell(state, mesh, kind, mode, workdir)
                progress(f"{kind:10} {mode:10} {cell.outcome:8} {cell.stage or ''} {cell.freeze_ms} {cell.reason}")
                cells.append(cell)
                if save:  # a long run keeps what it has so far
                    save.write_text(_matrix(cells).model_dump_json(indent=1) + "\n")
    finally:
        scenario.mesh_down(state)
        shutil.rmtree(state, ignore_errors=True)
        if old_env is None:
            os.environ.pop("SKYFERRY_STATE", None)
        else:
            os.environ["SKYFERRY_STATE"] = old_env
    return _matrix(cells)


def _today() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d")


def _matrix(cells: list[Cell]) -> Matrix:
    return Matrix(when=_today(), kernel=platform.release(), criu=CRIU_VERSION, cells=cells)


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- docs/compatibility.md -----------------------------------------------------------------------------

RESULTS = Path(__file__).resolve().parents[2] / "docs" / "workloads-results.json"
DOC = RESULTS.with_name("compatibility.md")
SECTION = matrixdoc.Section(
    "The matrix",
    "<!-- workloads-table: generated by `make compat-workloads`, do not edit -->",
    "<!-- workloads-table end -->",
)


def render(matrix: Matrix) -> str:
    """The table: one row per workload and mode, the notes of cells that did not pass below it."""
    lines = [
        f"Kernel {matrix.kernel}, CRIU {matrix.criu}, last run {matrix.when}: {len(matrix.cells)} cells, "
        f"{sum(c.outcome == 'pass' for c in matrix.cells)} passed.",
        "",
        "| workload | holds | engine | mode | result | freezes | totals | the client saw | run |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    notes: list[str] = []
    order = {k: i for i, k in enumerate(KINDS)}
    cells = sorted(matrix.cells, key=lambda c: (order.get(c.workload, 99), c.engine, MODES.index(c.mode)))
    for i, cell in enumerate(cells):
        first = i == 0 or cells[i - 1].workload != cell.workload  # name and describe a workload once
        workload, holds = (cell.workload, HOLDS.get(cell.workload, "")) if first else ("", "")
        result = cell.outcome
        if cell.outcome != "pass":
            notes.append(f"`{cell.workload}`, {cell.engine} {cell.mode}: {cell.outcome} at {cell.stage}: {cell.reason}")
            result = f"**{cell.outcome}** ({cell.stage}) [{len(notes)}]"
        freezes = ", ".join(f"{ms / 1000:.2f} s" for ms in cell.freeze_ms)
        totals = ", ".join(f"{ms / 1000:.1f} s" for ms in cell.total_ms)
        lines.append(f"| {workload} | {holds} | {cell.engine} | {cell.mode} | {result} | "
                     f"{freezes} | {totals} | {cell.client} | {cell.when} |")  # fmt: skip
    if notes:
        lines += ["", "Why:", ""] + [f"{i}. {note}" for i, note in enumerate(notes, 1)]
    return "\n".join(lines)


def merge(old: Matrix, new: Matrix) -> Matrix:
    """`old` with the cells `new` ran again replaced in place; new cells appended."""
    return matrixdoc.merge(old, new, key=lambda c: (c.workload, c.engine, c.mode))


def write_doc(matrix: Matrix, doc: Path = DOC, results: Path = RESULTS) -> None:
    """Save the cells as JSON and replace the generated table in `## The matrix`; the prose stays."""
    matrixdoc.write_doc(matrix, render(matrix), SECTION, doc, results)


def recorded() -> Matrix:
    return Matrix.model_validate_json(RESULTS.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kinds", nargs="*", help=f"workloads (default: all of {', '.join(KINDS)})")
    parser.add_argument("--mode", action="append", choices=MODES, help="only these modes (default: all)")
    parser.add_argument("--all", action="store_true", help="every workload and mode; rewrite the table")
    parser.add_argument("--merge", action="store_true", help="merge the cells run into the recorded table")
    parser.add_argument("--out", type=Path, help="also write the cells as JSON here")
    parser.add_argument("--render", type=Path, help="only rewrite the table from cells saved by --out")
    args = parser.parse_args(argv)
    if unknown := set(args.kinds) - set(KINDS):
        parser.error(f"unknown workloads: {', '.join(sorted(unknown))}")
    if args.render:
        write_doc(Matrix.model_validate_json(args.render.read_text()))
        return 0
    kinds = list(KINDS) if args.all else (args.kinds or list(KINDS))
    matrix = run_matrix(kinds, list(MODES) if args.all else (args.mode or list(MODES)), save=args.out)
    if args.all or args.merge:
        write_doc(merge(recorded(), matrix) if args.merge and RESULTS.exists() else matrix)
        print(f"wrote {DOC} and {RESULTS}")
    else:
        print(json.dumps([c.model_dump() for c in matrix.cells], indent=1))
    return 0 if all(c.outcome == "pass" for c in matrix.cells) else 1


if __name__ == "__main__":
    sys.exit(main())
