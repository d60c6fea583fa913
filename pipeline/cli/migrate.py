"""`skyferry migrate` and `skyferry migrations ls|show|resume|rollback`."""

import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer
from skyferry.pipeline.controller import containers, migration, report_html
from skyferry.pipeline.controller.journal import Journal
from skyferry.pipeline.controller.registry import Registry
from skyferry.pipeline.controller.stages import COMPLETION_TIMEOUT, MAX_FREEZE_MS
from skyferry.pipeline.controller.state import state_dir
from skyferry.pipeline.controller.timeline import Span
from skyferry.pipeline.controller.timeline import spans as timeline_of
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.hostapi.layout import FREEZE_TIMEOUT
from skyferry.pipeline.runbooks import ingress

from . import output
from .app import app

PANEL = "Migration"
migrations_app = typer.Typer(no_args_is_help=True, help="The migration journal: list, inspect, resume, roll back.")
app.add_typer(migrations_app, name="migrations", rich_help_panel=PANEL)


@contextmanager
def _progress(enabled: bool) -> Iterator[Callable[[str], None]]:
    """A live status line on a terminal; silent when piped or with --json."""
    if not enabled or not sys.stderr.isatty():
        yield lambda _: None
        return
    with output.err_console.status("starting") as status:
        yield lambda stage: status.update(f"[bold]{stage}[/bold]")


def _print_report(report: dict[str, Any]) -> None:
    rows = [
        ["migration", report["id"]],
        ["container", f"{report['container']}: {report['source']} -> {report['target']} ({report['mode']})"],
        ["  mode chosen", f"{report.get('mode_requested')}: {report.get('mode_reason')}"],
        ["state", report["state"]],
        ["freeze", f"{report['freeze_ms']} ms" if report["freeze_ms"] is not None else "-"],
        ["total", f"{report['total_ms']} ms"],
        ["bytes on the wire", _size(report.get("bytes_wire"))],
        ["  inside the freeze", _size(report.get("bytes_at_freeze"))],
    ]
    if report.get("precopy_method"):
        rows.append(["  pre-copy method", report["precopy_method"]])
    for r in report.get("rounds", []):
        rows.append(
            [f"  round {r['seq']}", f"{r['pages_changed']} pages, {_size(r['bytes_out'])}, {r['duration']:.2f} s"]
        )
    if report.get("predicted_freeze_ms") is not None:
        rows.insert(
            5, ["  predicted", f"{report['predicted_freeze_ms']} ms (--max-freeze {report['max_freeze_ms']} ms)"]
        )
    for t in report.get("throttle_steps", []):
        dirtied = f"{t['percent']} % CPU (memory changed at {t['dirty_bytes_s'] / 1e6:.1f} MB/s)"
        rows.append([f"  throttle after round {t['round']}", dirtied])
    if report.get("precopy_stop"):
        handover = f"; handed over to {report['handover']}" if report.get("handover") else ""
        rows.append(["  rounds stopped", f"{report['precopy_stop']}: {report.get('precopy_why') or ''}{handover}"])
    rows += [[f"  {name}", f"{secs * 1000:.1f} ms"] for name, secs in report["stages_s"].items()]
    if report.get("error"):
        rows.append(["error", report["error"]])
    if report.get("ingress"):
        rows.append(["ingress", report["ingress"]["summary"]])
        if report["ingress"].get("error"):
            rows += [["ingress error", report["ingress"]["error"]], ["hint", report["ingress"]["hint"]]]
    output.print_table(None, ["", ""], rows)


def _print_estimate(found: dict[str, Any]) -> None:
    m = found["measured"]
    dirty = f"{m['dirty_rate'] / 1e6:.1f} MB/s" if m["dirty_rate"] is not None else "not seen"
    output.console.print(
        f"{found['container']}: {found['source']} -> {found['target']}; memory {_size(m['memory_bytes'])} "
        f"({_size(m['memory_wire'])} on the wire), streams {m['bandwidth'] / 1e6:.1f} MB/s, changing {dirty} "
        f"({found['precopy_method']} rounds)",
        highlight=False,
    )
    rows = [
        [mode + ("" if p["available"] else " (not between these hosts)"), f"{p['freeze_ms']:.0f} ms",
         "yes" if p["fits"] else "no", f"{p['total_s']:.1f} s", _size(p["bytes_wire"]),
         _size(p["lazy_bytes"]) if p["lazy_bytes"] else "-"]
        for mode, p in found["modes"].items()
    ]  # fmt: skip
    limit = f"≤ {found['max_freeze_ms']:.0f} ms"
    output.print_table(None, ["MODE", "FREEZE", limit, "TOTAL", "BYTES", "AFTER RESTORE"], rows)
    output.console.print(f"auto would pick {found['auto']['mode']}: {found['auto']['mode_reason']}", highlight=False)


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n} B"


@app.command(rich_help_panel=PANEL)
def migrate(
    name: str = typer.Argument(..., help="Container to move: NAME, or podman:NAME / docker:NAME."),
    to: str = typer.Option(..., "--to", help="Target host."),
    mode: str | None = typer.Option(
        None,
        "--mode",
        help="auto (default): memory rounds while it runs; what they measure (memory, dirty rate, bandwidth) "
        "picks the finish predicted to freeze shortest, precopy or hybrid, and the report says why "
        "(podman and docker: stop-copy, their only mode); "
        "precopy: rounds, then a freeze that moves what changed since; "
        "hybrid: rounds, then restore at once and fetch only what changed since, lazily (shortest freeze "
        "for big memory; the target needs the source until those pages arrive); "
        "postcopy: restore at once, every page lazily; "
        "stop-copy: freeze, checkpoint, move everything, restore.",
    ),
    max_freeze: float = typer.Option(MAX_FREEZE_MS, "--max-freeze", metavar="MS", min=1, max=86_400_000,
                                     help="The downtime limit: rounds go on until the predicted freeze fits it "
                                     "(or stop shrinking it, or reach 8 rounds); like QEMU's downtime limit."),
    estimate: bool = typer.Option(False, "--estimate", help="Measure only: two pre-copy rounds (nothing "
                                  "frozen, nothing left behind), then the predicted freeze, total time and "
                                  "bytes of every mode, and the one auto would pick."),
    json_out: bool = typer.Option(False, "--json", help=output.JSON_OPTION_HELP),
    test: bool = typer.Option(False, "--test", help="Test cutover: a clone restored on the target, isolated, "
                              "checked and discarded; the source keeps running (docs/runbooks.md)."),
    check: str | None = typer.Option(None, "--check", help="With --test: shell health check run inside the "
                                     "clone, as nobody ($SKYFERRY_IP set); exit 0 means healthy."),
    freeze_timeout: float = typer.Option(FREEZE_TIMEOUT, "--freeze-timeout", metavar="SECONDS", min=0.1, max=86400,
                                         help="The longest the container may stay frozen: past it, the source "
                                         "thaws it and the migration rolls back (docs/reliability.md)."),
    auto_converge: bool = typer.Option(True, "--auto-converge/--no-auto-converge", help="Throttle the "
                                       "container's CPU in steps while pre-copy rounds cannot keep up; lifted at "
                                       "the freeze (docs/precopy.md, Auto-converge)."),
    completion_timeout: float = typer.Option(COMPLETION_TIMEOUT, "--completion-timeout", metavar="SECONDS_PER_GIB",
                                             min=0.001, max=86400, help="Bound the pre-copy rounds to this many "
                                             "seconds per GiB of the container's memory (at least one GiB's worth), "
                                             "like KubeVirt's completionTimeoutPerGiB."),
    on_timeout: str | None = typer.Option(None, "--on-timeout", metavar="postcopy|abort", help="At the completion "
                                          "timeout: hand over to a lazy finish (default where the target can) or "
                                          "abort (the container runs on at the source, unthrottled)."),
) -> None:  # fmt: skip
    """Live-migrate a running container to another host; its IP and TCP connections survive.

    Stages: check, prepare, precopy (rounds; not in stop-copy or postcopy), checkpoint, transfer, cutover,
    restore, lazy (hybrid and postcopy), confirm, cleanup.
    A failure before the restore succeeds rolls back: the container keeps running on the source,
    exactly once. From then on the target's copy is live, and a failure is finished forward. The freeze
    is bounded: the source's own watchdog thaws it after --freeze-timeout, even if this command dies.

    Examples: skyferry migrate web --to local-2; skyferry migrate web --to local-2 --estimate;
    skyferry migrate web --to local-2 --max-freeze 500; skyferry migrate podman:db --to local-3 --freeze-timeout 60
    """
    name = containers.resolve(state_dir(), name)
    if test or check:
        from .runbooks import test_cutover

        return test_cutover(name, to, test, check, json_out)
    if estimate:
        with _progress(not json_out) as progress:
            found = migration.estimate(state_dir(), name, to, max_freeze, progress)
        output.print_json(found) if json_out else _print_estimate(found)
        return
    with _progress(not json_out) as progress:
        report = _with_ingress(migration.migrate(
            state_dir(), name, to, mode, progress, freeze_timeout, max_freeze,
            auto_converge=auto_converge, completion_timeout=completion_timeout, on_timeout=on_timeout,
        ))  # fmt: skip
    output.print_json(report) if json_out else _print_report(report)
    _exit_on_ingress_error(report)


def _with_ingress(report: dict[str, Any]) -> dict[str, Any]:
    """A container that arrived takes its ingress label along: its ports published on the target, its
    address moved, the source's ports withdrawn (docs/runbooks.md, "Ingress that delivers")."""
    if report["state"] != "done":
        return report
    entry = next((e for e in Registry(state_dir()).all() if e.name == report["container"]), None)
    done = ingress.after_cutover(state_dir(), entry, report["target"], report["source"]) if entry else None
    return {**report, "ingress": done} if done else report


def _exit_on_ingress_error(report: dict[str, Any]) -> None:
    if (report.get("ingress") or {}).get("error"):
        raise typer.Exit(1)  # the container moved; its ingress did not (running it again re-applies it)


@migrations_app.command("ls")
def ls(json_out: bool = typer.Option(False, "--json", help=output.JSON_OPTION_HELP)) -> None:
    """Every migration in the journal, oldest first."""
    migs = Journal(state_dir()).all()
    if json_out:
        output.print_json([m.to_dict() for m in migs])
        return
    output.print_table(
        None,
        ["ID", "CONTAINER", "FROM", "TO", "MODE", "STATE", "FREEZE"],
        [
            [
                m.id,
                m.container,
                m.source,
                m.target,
                f"{m.mode}: {m.report['mode']}" if m.report and m.report.get("mode", m.mode) != m.mode else m.mode,
                m.state,
                f"{m.report['freeze_ms']} ms" if m.report and m.report.get("freeze_ms") is not None else "-",
            ]
            for m in migs
        ],
    )


@migrations_app.command("show")
def show(
    mig_id: str = typer.Argument(..., metavar="ID"),
    json_out: bool = typer.Option(False, "--json", help=output.JSON_OPTION_HELP),
    timeline: bool = typer.Option(
        False, "--timeline", help="Each stage, pre-copy round and undo step on one time axis, with the freeze."
    ),
    html: Path | None = typer.Option(
        None, "--html", metavar="FILE", help="Also write the timeline as a self-contained HTML page (table and plot)."
    ),
) -> None:
    """One migration with every stage transition (or, with --timeline, its story on one time axis)."""
    journal = Journal(state_dir())
    mig = journal.get(mig_id)
    transitions = journal.transitions(mig_id)
    if html is not None:
        try:
            html.write_text(report_html.page(f"migration {mig.id}", [report_html.migration_section(journal, mig_id)]))
        except OSError as exc:
            raise SkyferryError(f"cannot write {html}: {exc.strerror}", hint="--html takes a file path") from None
        output.err_console.print(f"report: {html}", highlight=False)
    if timeline:
        found = timeline_of(journal, mig_id)
        if json_out:
            output.print_json({**mig.to_dict(), "timeline": [s.as_dict() for s in found]})
        else:
            output.console.print(f"{mig.id}: {mig.container} {mig.source} -> {mig.target} [{mig.state}]")
            _print_timeline(found, {"source": mig.source, "target": mig.target})
        return
    if json_out:
        output.print_json({**mig.to_dict(), "transitions": transitions})
        return
    output.console.print(f"{mig.id}: {mig.container} {mig.source} -> {mig.target} [{mig.state}]")
    if mig.error:
        output.console.print(f"error: {mig.error}", highlight=False)
    t0 = mig.started
    output.print_table(
        None,
        ["+ms", "STAGE", "STATUS", "DETAIL"],
        [[f"{(t['at'] - t0) * 1000:.0f}", t["stage"], t["status"], _brief(t["detail"])] for t in transitions],
    )
    for t in transitions:
        if t["status"] == "failed" and (t["detail"] or {}).get("log"):
            output.console.print(f"\nlog of the failed {t['stage']}:", style="bold")
            print(t["detail"]["log"])  # as written: a log is copied into bug reports, unwrapped


BAR = 40  # characters of the time axis
STYLES = {"freeze": "red", "round": "cyan", "undo": "yellow"}


def _print_timeline(found: list[Span], hosts: dict[str, str]) -> None:
    """A row per span: its bar on a shared axis (the freeze in red), where it ran, and how long it took."""
    end = max((s.end_ms for s in found), default=0.0) or 1.0
    rows = []
    for s in found:
        first = min(int(s.start_ms / end * BAR), BAR - 1)
        width = max(1, round((s.end_ms - s.start_ms) / end * BAR))
        style = {"freeze": "red", "round": "cyan", "undo": "yellow"}.get(
            s.kind, "green" if s.status == "done" else "red"
        )
        bar = " " * first + f"[{style}]" + "█" * min(width, BAR - first) + f"[/{style}]"
        label = f"  {s.label}" if s.kind == "round" else s.label
        where = re.sub(r"\b(source|target)\b", lambda m: hosts[m[1]], s.where)
        rows.append([label, bar, f"{s.end_ms - s.start_ms:.0f} ms", s.status, where])
    output.print_table(None, ["SPAN", f"0 … {end:.0f} ms", "TOOK", "STATUS", "WHERE"], rows)


def _brief(detail: Any) -> str:
    if not detail:
        return ""
    return ", ".join(f"{k}={v}" for k, v in detail.items() if k not in ("sha256", "log"))[:100]


@migrations_app.command("resume")
def resume(
    mig_id: str = typer.Argument(..., metavar="ID"),
    json_out: bool = typer.Option(False, "--json", help=output.JSON_OPTION_HELP),
) -> None:
    """Finish a migration whose controller died, from its first unfinished stage."""
    with _progress(not json_out) as progress:
        report = _with_ingress(migration.resume(state_dir(), mig_id, progress))
    output.print_json(report) if json_out else _print_report(report)
    _exit_on_ingress_error(report)


@migrations_app.command("rollback")
def rollback(
    mig_id: str = typer.Argument(..., metavar="ID"),
    json_out: bool = typer.Option(False, "--json", help=output.JSON_OPTION_HELP),
) -> None:
    """Undo an unfinished migration: the container runs on its source again. Refused after confirm."""
    with _progress(not json_out) as progress:
        report = migration.rollback(state_dir(), mig_id, progress)
    output.print_json(report) if json_out else _print_report(report)
