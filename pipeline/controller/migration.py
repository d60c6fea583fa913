"""Drive a migration through its stages, journalling each transition; resume or roll back from the journal.

A failure before the point of no return (a successful restore: the target's copy is live) rolls back
at once: the stages that started are undone in reverse, and the container runs on the source again.
From there on the only way is forward: a failure is finished by `migrations resume`. If an undo itself
fails, the rollback stops there (thawing the source while the target's copy might still run would make
two copies), the migration is marked `failed`, and `skyferry migrations rollback ID` retries from the
same point.
"""

import contextlib
import logging
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from skyferry.netplane.mesh import Mesh
from skyferry.pipeline import logfmt
from skyferry.pipeline.controller import agentctl, freezecost, freezeparts
from skyferry.pipeline.controller.journal import Journal, Migration
from skyferry.pipeline.controller.registry import Registry
from skyferry.pipeline.controller.stages import (
    AGENT_BACK_S,
    AUTO,
    COMPLETION_TIMEOUT,
    ESTIMATE_ROUNDS,
    FREEZE_TO,
    HYBRID,
    HYBRID_FINISH,
    MAX_FREEZE_MS,
    ON_TIMEOUT,
    POINT_OF_NO_RETURN,
    POSTCOPY,
    PRECOPY,
    PRECOPY_FINISH,
    STOP_COPY,
    Context,
    ForwardOnly,
    LazyPhaseLost,
    PreCopy,
    Stage,
    freeze_s,
)
from skyferry.pipeline.errors import NotRestored, RestoreFailed, SkyferryError
from skyferry.pipeline.hostapi import faults
from skyferry.pipeline.hostapi.client import AgentUnreachable
from skyferry.pipeline.hostapi.layout import FREEZE_TIMEOUT

# auto: pre-copy rounds, whose measurements choose between a precopy and a hybrid finish;
# precopy: memory rounds, CRIU pre-dumps where the source has soft-dirty tracking, else content-based;
# postcopy: CRIU lazy pages; hybrid: content-based rounds, then lazy pages for what changed since;
# stop-copy: the baseline.
MODES = {"auto": AUTO, "precopy": PRECOPY, "hybrid": HYBRID, "postcopy": POSTCOPY, "stop-copy": STOP_COPY}
DEFAULT_MODE = "auto"
ESTIMATE = "estimate"  # the journal's mode while `migrate --estimate` runs its rounds
FINISHES = {"precopy": PRECOPY_FINISH, "hybrid": HYBRID_FINISH}
Progress = Callable[[str], None]
# What the report keeps of each pre-copy round (frozen_ms: soft-dirty only, CRIU's freeze per pre-dump).
ROUND_KEYS = ("seq", "duration", "pages_scanned", "pages_changed", "pages_zero", "bytes_out", "frozen_ms")
FS_ROUND_KEYS = ("seq", "duration", "files_scanned", "files_sent", "bytes_raw", "bytes_wire")
log = logging.getLogger("skyferry.controller.migration")


def _quiet(_: str) -> None:
    pass


def plan(mode: str, finish: str | None = None) -> list[Stage]:
    """The stages of a migration in `mode`. Auto mode knows only its first ones (check, prepare, precopy)
    until the rounds have measured the container and the link and chosen how to finish: precopy's
    journalled `finish` then adds that finish's stages."""
    if mode == ESTIMATE:
        return ESTIMATE_ROUNDS
    return MODES[mode] + (FINISHES[finish] if mode == "auto" and finish else [])


def migrate(
    state: Path,
    name: str,
    target: str,
    mode: str | None = None,
    progress: Progress = _quiet,
    freeze_timeout: float = FREEZE_TIMEOUT,
    max_freeze_ms: float = MAX_FREEZE_MS,
    auto_converge: bool = True,
    completion_timeout: float = COMPLETION_TIMEOUT,
    on_timeout: str | None = None,
    streams: Callable[[], int] | None = None,
) -> dict[str, Any]:
    """Move container `name` to host `target`; returns the report. Raises SkyferryError after rolling back.
    Without a mode, auto: pre-copy rounds until the predicted freeze fits `max_freeze_ms`, then the finish
    predicted shortest (Podman and Docker: stop-copy, their only mode). The container stays frozen at most
    `freeze_timeout` seconds without the target's restore: then the source's watchdog thaws it and the
    migration rolls back (docs/reliability.md, "The freeze bound"). Pre-copy rounds that cannot keep up
    throttle the container's CPU (`auto_converge`); rounds that outlast `completion_timeout` seconds per GiB
    of its memory hand over to a lazy finish or abort (`on_timeout`: "postcopy", "abort", None: postcopy
    where the target can) (docs/precopy.md, "Auto-converge and the completion timeout"). `streams`: how
    many first rounds may stream from the source at once, asked when the rounds begin (evacuate's)."""
    if not 0 < completion_timeout <= 86400:
        raise SkyferryError(f"completion timeout {completion_timeout:g} s/GiB is out of range", hint="0 to 86400")
    if on_timeout is not None and on_timeout not in ON_TIMEOUT:
        raise SkyferryError(f"unknown --on-timeout {on_timeout!r}", hint=" or ".join(ON_TIMEOUT))
    mesh, entry, modes = _pair(state, name, target, mode, freeze_timeout, max_freeze_ms)
    mode = mode or DEFAULT_MODE
    reason = None
    if mode == "auto" and "precopy" not in modes:  # no rounds to measure with: the engine's one mode
        mode, reason = modes[0], f"{entry.spec.runtime} containers migrate by {modes[0]} only"
    if mode not in modes and mode != "auto":
        raise SkyferryError(
            f"{entry.spec.runtime} containers do not migrate by {mode}", hint=f"--mode {' or '.join(modes)}"
        )
    journal = Journal(state)
    mig = journal.begin(name, entry.host, target, mode)
    ctx = _context(state, mig, mesh, journal)
    ctx.freeze_timeout, ctx.max_freeze_ms = freeze_timeout, max_freeze_ms
    ctx.auto_converge, ctx.completion_timeout, ctx.on_timeout = auto_converge, completion_timeout, on_timeout
    ctx.notes["mode_reason"] = reason
    ctx.streams = streams
    with logfmt.bound(migration=mig.id, container=name):
        return _drive(ctx, journal, progress)


def estimate(
    state: Path, name: str, target: str, max_freeze_ms: float = MAX_FREEZE_MS, progress: Progress = _quiet
) -> dict[str, Any]:
    """What migrating `name` to `target` would cost in each mode, predicted from two pre-copy rounds (the
    first moves all memory, the second shows how fast it changes): freeze, total time and bytes. Nothing
    is frozen; afterwards the source's round state and the target's prepared copy are removed, and the
    journal keeps nothing. While it runs, the journal holds the container against a migration; a
    controller that dies meanwhile leaves an `estimate` entry that `migrations rollback` clears."""
    mesh, entry, modes = _pair(state, name, target, None, FREEZE_TIMEOUT, max_freeze_ms)
    if "precopy" not in modes:
        raise SkyferryError(
            f"{entry.spec.runtime} containers migrate by {modes[0]} only: nothing to estimate by pre-copy rounds",
            hint="--estimate measures runc containers",
        )
    journal = Journal(state)
    mig = journal.begin(name, entry.host, target, ESTIMATE)
    with logfmt.bound(migration=mig.id, container=name):
        return _estimate(state, journal, mig, mesh, max_freeze_ms, progress)


def _estimate(
    state: Path, journal: Journal, mig: Migration, mesh: Mesh, max_freeze_ms: float, progress: Progress
) -> dict[str, Any]:
    """Check, prepare and two rounds, journalled as they go; then both undone and the entry forgotten."""
    name = mig.container
    ctx = _context(state, mig, mesh, journal)
    ctx.max_freeze_ms = max_freeze_ms
    done: dict[str, dict[str, Any]] = {}
    for stage in ESTIMATE_ROUNDS:
        progress(stage.name)
        journal.transition(mig.id, stage.name, "started")
        try:
            done[stage.name] = stage.run(ctx) or {}
        except Exception as exc:
            journal.transition(mig.id, stage.name, "failed", _failure(exc))
            _undo(ctx, journal, ESTIMATE_ROUNDS, progress, cause=f"{stage.name} failed: {exc}")
            journal.forget(mig.id)
            raise SkyferryError(f"estimate of {name!r} failed at {stage.name}: {exc}. Nothing was changed",
                                hint=getattr(exc, "hint", None)) from exc  # fmt: skip
        journal.transition(mig.id, stage.name, "done", done[stage.name])
        faults.crash_point(stage.name)
    _undo(ctx, journal, ESTIMATE_ROUNDS, progress)  # the source's rounds, the target's prepared copy
    journal.forget(mig.id)
    rounds = done[PreCopy.name]
    available = done["check"]["modes"]
    return {
        "container": name,
        "source": mig.source,
        "target": mig.target,
        "max_freeze_ms": max_freeze_ms,
        "precopy_method": rounds["method"],
        "rounds": [{k: r.get(k, 0) for k in ROUND_KEYS} for r in rounds["rounds"]],
        "measured": rounds["measured"],
        "modes": {
            m: {**p, "available": m in available, "fits": p["freeze_ms"] <= max_freeze_ms}
            for m, p in rounds["predicted"].items()
        },
        "auto": {"mode": rounds["finish"], "mode_reason": rounds["finish_reason"]},
    }


def _pair(
    state: Path, name: str, target: str, mode: str | None, freeze_timeout: float, max_freeze_ms: float
) -> tuple[Mesh, Any, list[str]]:
    """The mesh, the container's entry and the modes its engine offers, after checking the arguments."""
    if mode is not None and mode not in MODES:
        raise SkyferryError(f"unknown mode {mode!r}", hint=f"modes: {', '.join(MODES)}")
    if not 0 < freeze_timeout < 86400:
        raise SkyferryError(f"freeze timeout {freeze_timeout:g} s is out of range", hint="between 0 and 86400 s")
    if not 0 < max_freeze_ms <= 86_400_000:
        raise SkyferryError(f"--max-freeze {max_freeze_ms:g} ms is out of range", hint="more than 0 ms")
    mesh = Mesh.load(state)
    entry = Registry(state).get(name)
    mesh.host(target)  # unknown host -> clear error
    if target == entry.host:
        raise SkyferryError(f"container {name!r} already runs on {target}", hint="pick another --to host")
    runtime = entry.spec.runtime
    modes = agentctl.client(state, mesh, entry.host).call("GET", "/v1/facts").get("modes", {}).get(runtime, [])
    if not modes:
        raise SkyferryError(f"{entry.host} has no {runtime} runtime for {name!r}", hint="skyferry doctor on that host")
    return mesh, entry, modes


def resume(state: Path, mig_id: str, progress: Progress = _quiet) -> dict[str, Any]:
    """Finish an interrupted migration from its first unfinished stage."""
    journal = Journal(state)
    mig = journal.get(mig_id)
    if mig.state in ("done", "rolled-back"):
        return _report(journal, mig)  # nothing left to do: idempotent
    statuses = journal.stage_status(mig_id)
    if "undone" in statuses.values() or mig.state == "failed" or mig.mode == ESTIMATE:
        raise SkyferryError(f"migration {mig_id} was being rolled back", hint=f"skyferry migrations rollback {mig_id}")
    journal.claim(mig_id)
    with logfmt.bound(migration=mig_id, container=mig.container):
        return _drive(_context(state, mig, Mesh.load(state), journal), journal, progress)


def rollback(state: Path, mig_id: str, progress: Progress = _quiet) -> dict[str, Any]:
    """Undo an unfinished migration: the container ends up running on the source."""
    journal = Journal(state)
    mig = journal.get(mig_id)
    if mig.state == "rolled-back":
        return _report(journal, mig)
    if mig.state == "done" or journal.stage_status(mig_id).get(POINT_OF_NO_RETURN) == "done":
        raise SkyferryError(
            f"migration {mig_id} is past the point of no return: {mig.container} runs on {mig.target}",
            hint=f"migrate it back: skyferry migrate {mig.container} --to {mig.source}",
        )
    journal.claim(mig_id)
    ctx = _context(state, mig, Mesh.load(state), journal)
    # A rollback that finishes one a failure started keeps that failure as its cause.
    failed = next((t for t in journal.transitions(mig_id) if t["status"] == "failed"), None)
    cause = f"{failed['stage']} failed: {(failed['detail'] or {}).get('error')}" if failed else None
    ctx.notes["failed_stage"] = failed["stage"] if failed else None
    with logfmt.bound(migration=mig_id, container=mig.container):
        _undo(ctx, journal, plan(mig.mode, ctx.notes.get("finish")), progress, cause=cause)
    if mig.mode == ESTIMATE:  # an estimate whose controller died: now undone, it leaves nothing behind
        journal.forget(mig_id)
        return {"id": mig_id, "container": mig.container, "mode": ESTIMATE, "state": "rolled-back"}
    return _report(journal, journal.get(mig_id))


def _context(state: Path, mig: Migration, mesh: Mesh, journal: Journal) -> Context:
    """What the stages need; for a resumed migration also what its finished stages journalled: the freeze
    bound, the downtime limit and auto's possible finishes (check), the finish auto's rounds chose
    (precopy) and the source's freeze deadline (checkpoint)."""
    transitions = journal.transitions(mig.id)
    done = {t["stage"]: t["detail"] or {} for t in transitions if t["status"] == "done"}
    entry = Registry(state).get(mig.container)
    src, dst = agentctl.client(state, mesh, mig.source), agentctl.client(state, mesh, mig.target)
    push = agentctl.Pusher(state, mesh, {mig.source: src, mig.target: dst})
    push.warm()  # the cutover pushes to every member inside the freeze: no handshakes there
    check = done.get("check", {})
    return Context(
        mig_id=mig.id,
        entry=entry,
        source=mig.source,
        target=mig.target,
        mesh=mesh,
        state=state,
        src=src,
        dst=dst,
        push=push,
        mode=mig.mode,
        freeze_timeout=check.get("freeze_timeout", FREEZE_TIMEOUT),
        max_freeze_ms=check.get("max_freeze_ms", MAX_FREEZE_MS),
        auto_converge=check.get("auto_converge", True),
        completion_timeout=check.get("completion_timeout", COMPLETION_TIMEOUT),
        on_timeout=check.get("on_timeout"),
        notes={
            "freeze_deadline": done.get("checkpoint", {}).get("freeze_deadline"),
            # stages a controller began and never finished: a resumed transfer first asks the target
            "unfinished": {t["stage"] for t in transitions} - set(done),
            "freeze_s": freeze_s(transitions),
            "finishes": done.get("check", {}).get("finishes", []),
            "finish": done.get(PreCopy.name, {}).get("finish"),
        },
    )


def _drive(ctx: Context, journal: Journal, progress: Progress) -> dict[str, Any]:
    statuses = journal.stage_status(ctx.mig_id)
    stages = plan(ctx.mode, ctx.notes.get("finish"))
    i = 0
    while i < len(stages):
        stage = stages[i]
        i += 1
        if statuses.get(stage.name) == "done":
            continue
        progress(stage.name)
        logfmt.tag(stage=stage.name)
        log.info("%s started (%s -> %s, %s)", stage.name, ctx.source, ctx.target, ctx.mode)
        journal.transition(ctx.mig_id, stage.name, "started")
        # A transfer that carries the restore may end with a live copy on the target: journalled first, so
        # a rollback asks the target before it thaws the source (Restore.undo).
        carried = getattr(stage, "carries", None)
        if carried is not None:
            progress(carried.name)
            _log_carried(carried.name, stage.name, "%s started, carried by %s", carried.name, stage.name)
            journal.transition(ctx.mig_id, carried.name, "started")
        t0 = time.monotonic()
        try:
            with faults.crash_during(stage.name):
                detail = stage.run(ctx) or {}
        except LazyPhaseLost as exc:
            # Past the point of no return, yet the target's copy is down and the frozen source holds every
            # page: the one case where going back is right (and the only way the container runs again).
            log.warning("%s failed: %s", stage.name, exc)
            ctx.notes["failed_stage"] = stage.name
            journal.transition(ctx.mig_id, stage.name, "failed", {"error": str(exc)})
            _undo(ctx, journal, stages, progress, cause=f"{stage.name} failed: {exc}")
            raise SkyferryError(
                f"migration {ctx.mig_id}: post-copy lost its page source after the restore: {exc}. The copy on "
                f"{ctx.target} was stopped before it could run on missing pages; rolled back: "
                f"{ctx.entry.name} runs on {ctx.source}",
                hint="post-copy cannot survive losing the source, the link or the target's agent before every "
                "page has arrived (docs/migration.md, post-copy)",
            ) from exc
        except Exception as exc:
            if carried is not None and isinstance(exc, RestoreFailed):  # every byte arrived: the restore failed
                journal.transition(ctx.mig_id, stage.name, "done", {"seconds": round(time.monotonic() - t0, 4)})
                stage = carried
            log.warning("%s failed: %s", stage.name, exc)
            ctx.notes["failed_stage"] = stage.name
            journal.transition(ctx.mig_id, stage.name, "failed", _failure(exc))
            if carried is not None and isinstance(exc, NotRestored):  # the target was never asked
                journal.transition(ctx.mig_id, carried.name, "undone", {"error": f"never asked: {exc}"})
            names = [s.name for s in stages]
            if POINT_OF_NO_RETURN in names and names.index(stage.name) > names.index(POINT_OF_NO_RETURN):
                journal.finish(ctx.mig_id, "running", error=str(exc))
                raise SkyferryError(
                    f"migration {ctx.mig_id}: {stage.name} failed after the container went live on {ctx.target}: {exc}",
                    hint=f"skyferry migrations resume {ctx.mig_id}",
                ) from exc
            _undo(ctx, journal, stages, progress, cause=f"{stage.name} failed: {exc}")
            raise SkyferryError(
                f"migration {ctx.mig_id} failed at {stage.name}: {exc}. Rolled back: "
                f"{ctx.entry.name} runs on {ctx.source}",
                hint=getattr(exc, "hint", None)
                or (f"the tool's log: skyferry migrations show {ctx.mig_id}" if getattr(exc, "log", None) else None),
            ) from exc
        detail["seconds"] = round(time.monotonic() - t0, 4)
        restored = detail.pop("restore") if carried is not None else None
        journal.transition(ctx.mig_id, stage.name, "done", detail)
        log.info("%s done in %.3f s", stage.name, detail["seconds"])
        if restored is not None:  # the transfer's answer holds the restore's: done too
            took = round(restored.get("restore_s", 0.0) + restored.get("unlock_s", 0.0), 4)  # inside the transfer
            journal.transition(ctx.mig_id, carried.name, "done", {**restored, "seconds": took, "with_transfer": True})
            statuses[carried.name] = "done"
            _log_carried(carried.name, stage.name, "%s done in %.3f s on %s", carried.name, took, ctx.target)
        if FREEZE_TO in (stage.name, getattr(carried, "name", None)):
            ctx.notes["freeze_s"] = freeze_s(journal.transitions(ctx.mig_id))
        if stage.name == PreCopy.name and ctx.mode == "auto":
            # The rounds have measured the container and the link and chose how to finish (journalled
            # just above, so a resumed migration takes the same way): the rest of the stages follow.
            ctx.notes["finish"] = detail["finish"]
            stages = plan(ctx.mode, detail["finish"])
        if POINT_OF_NO_RETURN in (stage.name, getattr(carried, "name", None)):
            Registry(ctx.state).move(ctx.entry.name, ctx.target)  # from here on it lives there
        faults.crash_point(stage.name)
        if carried is not None:
            faults.crash_point(carried.name)
        if detail.get("handover") and detail["handover"] != ctx.mode:
            # The rounds hit the completion timeout: finish lazily. The stages done so far have the same
            # names in the new list, so it carries on after them (and a resume reads the new mode).
            journal.set_mode(ctx.mig_id, detail["handover"])
            ctx.mode = detail["handover"]
            stages = plan(ctx.mode)
    mig = journal.get(ctx.mig_id)
    report = {**_report(journal, mig), "state": "done"}  # journalled with the state it is stored under
    journal.finish(ctx.mig_id, "done", report=report)
    if report["freeze_ms"] and report["prediction"]:  # the next prediction between this pair learns from it
        with contextlib.suppress(sqlite3.Error):  # the container has moved: a busy store must not say otherwise
            freezecost.learn(
                ctx.state, mig.source, mig.target, report["mode"], report["freeze_ms"], report["prediction"]
            )
    return _report(journal, journal.get(ctx.mig_id))


def _log_carried(carried: str, running: str, msg: str, *args: Any) -> None:
    """One line of the stage `carried` by the one `running`, tagged with its own name."""
    logfmt.tag(stage=carried)
    log.info(msg, *args)
    logfmt.tag(stage=running)


def _failure(exc: Exception) -> dict[str, Any]:
    """A failed stage's journal entry: the error, and the tool's log that explains it when there is one."""
    log = getattr(exc, "log", None)
    return {"error": str(exc), **({"log": log} if log else {})}


def _undo(ctx: Context, journal: Journal, stages: list[Stage], progress: Progress, cause: str | None = None) -> None:
    statuses = journal.stage_status(ctx.mig_id)
    lost: list[str] = []
    for stage in reversed(stages):
        if statuses.get(stage.name) not in ("started", "done", "failed", "undoing"):
            continue
        progress(f"undo {stage.name}")
        logfmt.tag(stage=stage.name)
        log.info("undo %s", stage.name)
        journal.transition(ctx.mig_id, stage.name, "undoing")
        try:
            stage.undo(ctx)
        except AgentUnreachable as exc:
            if exc.host != ctx.target or statuses.get(POINT_OF_NO_RETURN, "undone") != "undone":
                raise _stopped(ctx, journal, stage, exc, cause) from exc
            # The target is gone before it ever ran a copy: there is nothing of the container to undo
            # there, and the source's own undo steps (thaw, unlock) must still run.
            journal.transition(ctx.mig_id, stage.name, "undo-skipped", {"error": str(exc)})
            lost.append(stage.name)
            continue
        except ForwardOnly as exc:
            # Nothing was undone: the migration stays resumable, and resume finishes it.
            journal.transition(ctx.mig_id, stage.name, "undo-refused", {"error": str(exc)})
            journal.finish(ctx.mig_id, "running", error=str(exc))
            raise
        except Exception as exc:
            raise _stopped(ctx, journal, stage, exc, cause) from exc
        journal.transition(ctx.mig_id, stage.name, "undone")
    if lost:
        lost = _undo_late(ctx, journal, [s for s in reversed(stages) if s.name in lost])
    if lost:
        cause = f"{cause or 'failed'}; {ctx.target} was unreachable, its {', '.join(lost)} left undone"
    # Rolled back, the container runs on the source: also after a lost lazy phase, which came past the
    # point of no return (where the registry moved to the target), and when `migrations rollback` finishes
    # such a rollback that stopped half way.
    Registry(ctx.state).move(ctx.entry.name, ctx.source)
    journal.finish(ctx.mig_id, "rolled-back", error=cause)


def _undo_late(ctx: Context, journal: Journal, skipped: list[Stage]) -> list[str]:
    """The target's undo steps skipped while it was unreachable (an agent restarting: systemd brings it back
    within seconds), tried once more after the source is thawed, where waiting for it freezes nothing. The
    names of those still not undone."""
    try:
        ctx.dst.connect(retry_for=AGENT_BACK_S)  # the source is thawed: waiting freezes nothing
    except AgentUnreachable:
        return [s.name for s in skipped]
    left = []
    for stage in skipped:
        try:
            stage.undo(ctx)
        except AgentUnreachable as exc:
            journal.transition(ctx.mig_id, stage.name, "undo-skipped", {"error": str(exc)})
            left.append(stage.name)
            continue
        journal.transition(ctx.mig_id, stage.name, "undone")
    return left


def _stopped(ctx: Context, journal: Journal, stage: Stage, exc: Exception, cause: str | None) -> SkyferryError:
    error = f"rollback stopped at {stage.name}: {exc}" + (f" (after {cause})" if cause else "")
    journal.finish(ctx.mig_id, "failed", error=error)
    return SkyferryError(
        f"migration {ctx.mig_id}: {error}",
        hint=f"the container stays frozen until this succeeds: skyferry migrations rollback {ctx.mig_id}",
    )


def _mode_reason(mode: str, precopy: dict[str, Any], check: dict[str, Any]) -> str:
    if mode == "auto":
        ruled_out = check.get("ruled_out") or precopy.get("ruled_out")  # by the preflight, or the fork count
        if ruled_out and precopy.get("finish"):  # the rounds had one finish left
            return f"{precopy['finish']}, the one finish left: {ruled_out}"
        return precopy.get("finish_reason") or "not chosen yet: the pre-copy rounds did not finish"
    return check.get("mode_reason") or f"--mode {mode}"  # or auto for an engine with one mode


def _report(journal: Journal, mig: Migration) -> dict[str, Any]:
    """Freeze = checkpoint started .. restore done; per-stage seconds; pre-copy rounds; bytes on the wire
    (rounds, final delta and payload)."""
    transitions = journal.transitions(mig.id)
    stages: dict[str, float] = {}
    finished: dict[str, float] = {}
    detail: dict[str, dict[str, Any]] = {}
    for t in transitions:
        if t["status"] == "done":
            finished[t["stage"]] = t["at"]
            detail[t["stage"]] = t["detail"] or {}
            stages[t["stage"]] = detail[t["stage"]].get("seconds", 0.0)
    transfer, precopy, check = detail.get("transfer", {}), detail.get("precopy", {}), detail.get("check", {})
    mode = (precopy.get("finish") or mig.mode) if mig.mode == "auto" else mig.mode
    prediction = (precopy.get("predicted") or {}).get(mode)
    rounds = [{k: r.get(k, 0) for k in ROUND_KEYS} for r in precopy.get("rounds", [])]
    fs_rounds = [{k: r.get(k, 0) for k in FS_ROUND_KEYS} for r in precopy.get("fs_rounds", [])]
    bytes_wire = None
    if "bytes_wire" in transfer:
        bytes_wire = (
            transfer["bytes_wire"] + sum(r["bytes_out"] for r in rounds) + sum(r["bytes_wire"] for r in fs_rounds)
        )
    frozen_s = freeze_s(transitions)
    freeze = round(frozen_s * 1000, 1) if frozen_s is not None else None
    end = max(finished.values()) if finished else mig.updated
    return {
        "id": mig.id,
        "container": mig.container,
        "source": mig.source,
        "target": mig.target,
        "mode": mode,  # auto: the mode its rounds chose
        "mode_requested": mig.mode,
        "mode_reason": _mode_reason(mig.mode, precopy, check),
        "state": mig.state,
        "error": mig.error,
        "freeze_ms": freeze,
        # The downtime limit the rounds aimed for, and what the policy predicted when it froze.
        "max_freeze_ms": precopy.get("max_freeze_ms"),
        "predicted_freeze_ms": prediction["freeze_ms"] if prediction else None,
        "prediction": prediction,
        "total_ms": round((end - mig.started) * 1000, 1),
        "bytes_wire": bytes_wire,
        "bytes_at_freeze": transfer.get("bytes_wire"),
        "rounds": rounds,
        # the rootfs and volumes, copied while the container runs: an image's whole root the first time
        "fs_rounds": fs_rounds,
        "precopy_stop": precopy.get("stop"),
        "precopy_why": precopy.get("why"),
        # auto-converge: each CPU throttle step (round, percent, the dirty rate that asked for it)
        "throttle_steps": precopy.get("throttle_steps", []),
        # round 1's turn on the source's link: seconds, bytes, the link's bytes meanwhile, streams beside it
        "bulk": precopy.get("bulk"),
        "handover": precopy.get("handover"),  # the mode the rounds handed over to at the completion timeout
        # "soft-dirty" (CRIU pre-dumps) or "content"; None without rounds. Older agents ran only content.
        "precopy_method": precopy.get("method", "content") if precopy else None,
        "stages_s": stages,
        # the freeze's parts: each agent's own work, each call's rest, the controller's between stages
        "freeze_parts_ms": freezeparts.parts(detail, frozen_s),
        # post-copy and hybrid: the lazy phase after the restore (hybrid: pages from the store vs the source)
        "lazy": {k: v for k, v in detail.get("lazy", {}).items() if k != "seconds"} or None,
    }
