"""The stages of a migration. Each is a small object: `run` does its step, `undo` reverses it.

Both are idempotent, so the runner may repeat a stage that was interrupted, and a rollback may undo a
stage that only half ran. Undo order is the reverse of run order, which is what keeps the container
running exactly once: the target's copy is killed before the frozen source is thawed.
"""

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from skyferry.netplane import routes
from skyferry.netplane.mesh import Mesh
from skyferry.pipeline.controller import freezecost
from skyferry.pipeline.controller.registry import Entry
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.hostapi import compat
from skyferry.pipeline.hostapi.client import AgentClient, AgentUnreachable
from skyferry.pipeline.hostapi.layout import AGENT_PORT, FREEZE_TIMEOUT, POSTCOPY_TIMEOUT

COMPLETION_TIMEOUT = 150.0  # seconds per GiB: KubeVirt's completionTimeoutPerGiB (800 before v1.1)
ON_TIMEOUT = ("postcopy", "abort")
MAX_FREEZE_MS = 300.0  # --max-freeze: QEMU's default downtime limit
AGENT_BACK_S = 20.0  # how long a rollback waits for a restarting agent (systemd brings it back in seconds)
# Auto mode: how a freeze after pre-copy rounds may end, preferred first. Pre-copy leaves nothing behind on
# the source once the copy runs; hybrid's lazy phase still needs it, so it wins only on a shorter freeze.
FINISHES = ("precopy", "hybrid")
CHOOSING = ("auto", "estimate")  # the modes whose pre-copy rounds choose the finish


@dataclass
class Context:
    mig_id: str
    entry: Entry
    source: str
    target: str
    mesh: Mesh
    state: Path
    src: AgentClient
    dst: AgentClient
    push: routes.Push
    mode: str = "stop-copy"
    # Seconds the container may stay frozen before the source's watchdog thaws it and the migration rolls
    # back (journalled by the check stage, so a resumed migration keeps its bound).
    freeze_timeout: float = FREEZE_TIMEOUT
    # Auto-converge (docs/precopy.md): throttle the container's CPU while rounds cannot keep up (precopy).
    auto_converge: bool = True
    # The rounds' bound, seconds per GiB of memory (KubeVirt's completionTimeoutPerGiB), and what follows
    # it: "postcopy" (hand over to a lazy finish) or "abort"; None: postcopy where the target can. Both
    # journalled by the check stage, so a resumed migration keeps them.
    completion_timeout: float = COMPLETION_TIMEOUT
    on_timeout: str | None = None
    # The downtime limit (ms) the rounds aim for (journalled by the check stage, like the freeze bound).
    max_freeze_ms: float = MAX_FREEZE_MS
    # How many pre-copy first rounds may stream from the source at once, asked as the rounds begin (an
    # evacuation's runbooks/streams.py); None: no limit.
    streams: Callable[[], int] | None = None
    # "freeze_deadline": the source's deadline (wall clock) from its checkpoint, bounding the restore;
    # "freeze_s": the freeze as the journal measured it, once the restore is done; "failed_stage": the
    # stage whose failure this rollback undoes (both for the agents' metrics).
    # Auto mode: "finishes" the check found this pair and engine can do, "finish" the one the rounds chose.
    notes: dict[str, Any] = field(default_factory=dict)

    def target_agent(self) -> dict[str, Any]:
        return {"address": self.mesh.host(self.target).overlay_ip, "port": AGENT_PORT}

    def mig_call(self, agent: AgentClient, op: str, **body: Any) -> Any:
        failed = {"failed_stage": self.notes["failed_stage"]} if self.notes.get("failed_stage") else {}
        mode = self.notes.get("finish") or self.mode  # auto: the finish, once its rounds chose it
        step = {"name": self.entry.name, "mode": mode, **failed, **body}
        return agent.call("POST", f"/v1/migrations/{self.mig_id}/{op}", step)


class Stage(Protocol):
    name: str

    def run(self, ctx: Context) -> dict[str, Any] | None: ...

    def undo(self, ctx: Context) -> None: ...


class Check:
    """Both hosts can do this migration, decided before anything freezes: CRIU on both, the target's at
    least as new; the kernel features the mode needs on each side (pipeline/hostapi/compat.py); and the
    target's CPU passes CRIU's own `cpuinfo check` of the source's cpuinfo image. A refusal is one line
    and a hint, never a failed restore (docs/migration.md, "check")."""

    name = "check"

    def run(self, ctx: Context) -> dict[str, Any]:
        src, dst = ctx.src.call("GET", "/v1/facts"), ctx.dst.call("GET", "/v1/facts")
        info = ctx.src.call("GET", f"/v1/containers/{ctx.entry.name}")
        if info["state"] != "running":
            raise SkyferryError(
                f"container {ctx.entry.name!r} is {info['state']} on {ctx.source}, not running",
                hint="only running containers migrate live",
            )
        spec = ctx.entry.spec
        if (spec.uid, spec.gid) != (0, 0) and not src.get("dumps_other_users", True):
            raise SkyferryError(
                f"CRIU on {ctx.source} cannot dump {spec.name!r}, which runs as {spec.uid}:{spec.gid}: root there "
                "lacks CAP_SYS_RESOURCE, which CRIU needs to read another user's rlimits (prlimit(2))",
                hint="run the source's agent with root's full capabilities (docs/security.md, Containers)",
            )
        # Auto's rounds count the forks from here (PreCopy): the check need not wait 0.5 s to count them.
        forks = "later" if ctx.mode == "auto" else "now"
        found = ctx.src.call("GET", f"/v1/containers/{ctx.entry.name}/preflight?forks={forks}")
        fatal = [f for f in found if not f.get("modes")]  # the others rule out some modes only (below)
        if fatal:
            shapes = "; ".join(map(_shape, fatal))
            raise SkyferryError(f"CRIU cannot checkpoint {ctx.entry.name!r}: {shapes}", hint=fatal[0]["hint"])
        for facts in (src, dst):
            if not facts.get("criu"):
                raise SkyferryError(f"{facts['host']} has no CRIU", hint="run scripts/bootstrap-host.sh there")
        if _version(dst["criu"]) < _version(src["criu"]):
            raise SkyferryError(
                f"target CRIU {dst['criu']} is older than source CRIU {src['criu']}",
                hint="images from a newer CRIU may not restore; upgrade the target",
            )
        if src["arch"] != dst["arch"]:
            raise SkyferryError(f"architectures differ: {src['arch']} -> {dst['arch']}")
        mode = "precopy" if ctx.mode in CHOOSING else ctx.mode  # auto needs no more than pre-copy does
        lacking = compat.missing(src, dst, mode)
        if lacking:
            raise SkyferryError(
                f"{ctx.source} -> {ctx.target} cannot run a {mode} migration: {'; '.join(map(str, lacking))}",
                hint=compat.hint(lacking),
            )
        engine = src.get("modes", {}).get(spec.runtime, [])
        can = [m for m in compat.ALL_MODES if m in engine and not compat.missing(src, dst, m)]
        can, ruled_out = rule_out(ctx.entry.name, ctx.mode, can, found)
        ctx.notes["finishes"] = [f for f in FINISHES if f in can]
        cpu = self._cpu(ctx, src, dst)
        lazy = "hybrid" in can
        if ctx.on_timeout is None:  # hand the rounds over to post-copy only where the target can take it
            ctx.on_timeout = "postcopy" if lazy else "abort"
        elif ctx.on_timeout == "postcopy" and ctx.mode in ("precopy", "auto") and not lazy:
            why = ruled_out or "; ".join(map(str, compat.missing(src, dst, "hybrid")))
            raise SkyferryError(
                f"{ctx.source} -> {ctx.target} cannot hand pre-copy over to post-copy at the completion timeout: "
                f"{why or f'{spec.runtime} has no lazy restore'}",
                hint="--on-timeout abort",
            )
        for t in ctx.dst.call("GET", "/v1/containers"):
            if t["name"] == ctx.entry.name:
                raise SkyferryError(f"{ctx.target} already has a container named {ctx.entry.name!r}")
        return {
            "criu": [src["criu"], dst["criu"]],
            "kernel": [src["kernel"], dst["kernel"]],
            "features": [src.get("features"), dst.get("features")],
            "cpu": cpu,
            "freeze_timeout": ctx.freeze_timeout,
            "auto_converge": ctx.auto_converge,
            "completion_timeout": ctx.completion_timeout,
            "on_timeout": ctx.on_timeout,
            "max_freeze_ms": ctx.max_freeze_ms,
            "modes": can,  # what this pair and engine can run; auto's rounds choose among FINISHES of them
            "finishes": ctx.notes["finishes"],
            **({"ruled_out": ruled_out} if ruled_out else {}),  # modes the preflight ruled out, and why
            **({"mode_reason": ctx.notes["mode_reason"]} if ctx.notes.get("mode_reason") else {}),
        }

    def _cpu(self, ctx: Context, src: dict[str, Any], dst: dict[str, Any]) -> str:
        """The source's `criu cpuinfo dump` image, checked by the target's `criu cpuinfo check`. A restored
        process keeps using the instructions its libraries picked at start (glibc selects code paths by
        CPU feature), so a target CPU without them kills it later with SIGILL, after the point of no
        return. CRIU's check is the authority; the /proc/cpuinfo flags only name what differs."""
        image = ctx.src.call("GET", "/v1/cpuinfo")["image"]
        if image is None:
            return f"not checked: CRIU has no cpuinfo check on {src['arch']}"
        verdict = ctx.dst.call("POST", "/v1/cpuinfo/check", {"image": image})
        if verdict["ok"]:
            return "criu cpuinfo check passed"
        flags = sorted(set(src["cpu_flags"]) - set(dst["cpu_flags"]))
        named = f"; CPU flags {ctx.target} lacks: {', '.join(flags[:12])}" if flags else ""
        raise SkyferryError(
            f"{ctx.target}'s CPU lacks features {ctx.source}'s CPU has (criu cpuinfo check: {verdict['error']}){named}",
            hint="pick a target with the same or a newer CPU model; CRIU's --cpu-cap (criu(8)) decides what is "
            "compared, and skyferry keeps CRIU's default (fpu,ins), because a weaker check only moves the "
            "failure to a SIGILL after the restore",
        )

    def undo(self, ctx: Context) -> None:
        pass


class Prepare:
    """The target gets the same netns and IP (no route yet) and an empty bundle, and takes this
    migration's streams from the source host only (`peer`); the source opens its connections to it, so
    that a migration an evacuation holds back from the link (runbooks/streams.py) streams at once when
    its turn comes, without TCP and TLS handshakes across a link others fill."""

    name = "prepare"

    def run(self, ctx: Context) -> None:
        ctx.mig_call(ctx.dst, "prepare", spec=ctx.entry.spec.to_dict(), peer=ctx.source)
        ctx.mig_call(ctx.src, "connect", target=ctx.target_agent())

    def undo(self, ctx: Context) -> None:
        with contextlib.suppress(AgentUnreachable):  # an agent that is gone has closed its connections
            ctx.mig_call(ctx.src, "rollback")  # closes them; nothing was frozen
        ctx.mig_call(ctx.dst, "abort")


class PreCopy:
    """Memory rounds while the container runs, until the predicted freeze fits the downtime limit (or the
    rounds stop paying off); the freeze then only moves what changed since. The source's policy also says
    which finish freezes shortest (memory/policy.py): in auto mode that decides the rest of the stages."""

    name = "precopy"
    # A final delta this small costs ~10 ms at 1 Gbit/s: not worth another round.
    policy = {"max_delta_bytes": 1 << 20}

    def __init__(self, method: str = "auto", finishes: tuple[str, ...] | None = ("precopy",), rounds: int = 0) -> None:
        # "auto": the source picks soft-dirty (CRIU pre-dump) where it can, else content-based rounds.
        self.method = method
        self.finishes = finishes  # None: the ones the check found (auto mode)
        self.rounds = rounds  # exactly this many (--estimate); 0: as the policy decides

    def run(self, ctx: Context) -> dict[str, Any]:
        finishes = self.finishes or tuple(ctx.notes["finishes"])
        method = "content" if "hybrid" in finishes else self.method  # hybrid's freeze scan needs the hashes
        # Hybrid finishes lazily anyway: its rounds neither throttle nor hand over; --estimate changes nothing.
        lazy_only, estimating = finishes == ("hybrid",), bool(self.rounds)
        policy: dict[str, Any] = {**self.policy, "max_freeze_ms": ctx.max_freeze_ms, "finishes": list(finishes),
                                  "fixed_ms": freezecost.fixed_ms(ctx.state, ctx.source, ctx.target),
                                  "throttle": ctx.auto_converge and not lazy_only and not estimating}  # fmt: skip
        if self.rounds:
            policy |= {"min_rounds": self.rounds, "max_rounds": self.rounds}
        forks = ctx.mode == "auto" and "hybrid" in finishes  # the check left the fork count to the rounds
        done: dict[str, Any] = ctx.mig_call(
            ctx.src, "precopy", target=ctx.target_agent(), policy=policy, method=method,
            freeze_timeout=ctx.freeze_timeout, completion_timeout=ctx.completion_timeout, forks=forks,
            streams=ctx.streams() if ctx.streams else None,
        )  # fmt: skip
        if done["stop"] != "completion-timeout" or lazy_only or estimating:
            return done
        timed_out = (
            f"pre-copy of {ctx.entry.name!r} did not complete within {done['completion_timeout_s']:g} s "
            f"({ctx.completion_timeout:g} s per GiB): {done['why']}; aborted, nothing was frozen"
        )
        if done.get("ruled_out"):  # the rounds found a tree forking too fast for a lazy phase to end
            raise SkyferryError(
                f"{timed_out}; no lazy finish: {done['ruled_out']}", hint="a longer --completion-timeout"
            )
        if ctx.on_timeout != "postcopy":  # "abort", or a journal from before the choice existed
            raise SkyferryError(
                timed_out,
                hint="--on-timeout postcopy hands over to a lazy finish instead; or a longer --completion-timeout",
            )
        if "hybrid" in finishes:  # auto: the finish is the rounds' to name, and the runner follows it
            why = f"the rounds hit the completion timeout ({done['why']}): a lazy finish"
            return {**done, "finish": "hybrid", "finish_reason": why}
        return {**done, "handover": "hybrid"}  # --mode precopy: the runner goes on as hybrid (migration.py)

    def undo(self, ctx: Context) -> None:
        # The rounds left an engine and a (pre-warmed) image directory on the source; Checkpoint's undo
        # frees them too, but it never runs when the rounds themselves failed. Idempotent, and the
        # container was never paused here, so nothing thaws early. The target's store goes with Prepare's.
        ctx.mig_call(ctx.src, "rollback")


class Checkpoint:
    """Freeze, lock the network, dump. The source stays frozen, not killed, until confirm; or until its
    freeze bound, when the source's own watchdog fences the target and thaws it."""

    name = "checkpoint"
    lazy = False

    def run(self, ctx: Context) -> dict[str, Any]:
        peer = {"peer": ctx.target} if self.lazy else {}  # lazy: the one host that may fetch the pages
        done = ctx.mig_call(ctx.src, "checkpoint", lazy=self.lazy, target=ctx.target_agent(),
                            freeze_timeout=ctx.freeze_timeout, **peer)  # fmt: skip
        ctx.notes["freeze_deadline"] = done.get("freeze_deadline")
        return done

    def undo(self, ctx: Context) -> None:
        ctx.mig_call(ctx.src, "rollback")


class Transfer:
    """Images and rootfs go agent to agent across the overlay; digests must match on both ends. It
    `carries` the restore: the source's last request (the held client segments) asks the target to
    restore, so no controller call stands between the last byte and the restore (docs/migration.md, "The
    restore rides on the transfer"). The runner journals the restore as started before this stage and
    done with it."""

    name = "transfer"

    def __init__(self, carries: "Restore") -> None:
        self.carries = carries

    def run(self, ctx: Context) -> dict[str, Any]:
        order = self.carries.order(ctx)
        resumed = self.name in ctx.notes.get("unfinished", ())
        if resumed and self._restored(ctx):
            return self._after_restore(ctx, order)
        try:
            return ctx.mig_call(ctx.src, "transfer", target=ctx.target_agent(), restore=order)
        except SkyferryError:
            # Resumed while the transfer a dead controller asked for still ran: the source agent took the two
            # in turn, the first one restored the copy, and this one found no stream to send into it.
            if resumed and self._restored(ctx):
                return self._after_restore(ctx, order)
            raise

    def _restored(self, ctx: Context) -> bool:
        return self.carries.state_on_target(ctx) in ("live", "running")

    def _after_restore(self, ctx: Context, order: dict[str, Any]) -> dict[str, Any]:
        """Resumed after the target restored and its answer was lost (a controller or source agent died): no
        stream goes into a restored copy; the restore, asked again, only opens its netns."""
        return {"resumed_after_restore": True, "restore": ctx.mig_call(ctx.dst, "restore", **order)}

    def undo(self, ctx: Context) -> None:
        pass  # the target's received files go with Prepare's undo, a restored copy with Restore's


class ForwardOnly(SkyferryError):
    """The target's copy is live: undoing would bring back the older source copy and lose state."""


class Restore:
    """The point of no return: once restored, the target's copy is live and the frozen source is stale.
    If the restore failed, CRIU never resumed the copy, and undo removes it before anything thaws the
    source. A copy that did come up live is never removed (the agent refuses too). Usually carried by the
    transfer; run on its own when a transfer that carried it was cut off after its last request."""

    name = "restore"
    lazy = False

    def order(self, ctx: Context) -> dict[str, Any]:
        """How the target restores (bodies.RestoreOrder): no later than the source's freeze deadline."""
        return {"lazy": self.lazy, "freeze_deadline": ctx.notes.get("freeze_deadline")}

    def run(self, ctx: Context) -> dict[str, Any]:
        return ctx.mig_call(ctx.dst, "restore", **self.order(ctx))

    def state_on_target(self, ctx: Context) -> str | None:
        """The copy's state on the target ("live": running with its netns open), None without one. A
        restarting target agent is waited for: until it answers, nothing may thaw the source."""
        found = [c for c in ctx.dst.call("GET", "/v1/containers", None, AGENT_BACK_S) if c["name"] == ctx.entry.name]
        if not found:
            return None
        return "live" if found[0]["state"] == "running" and not found[0]["frozen_for_migration"] else found[0]["state"]

    def undo(self, ctx: Context) -> None:
        if self.state_on_target(ctx) == "live":
            raise ForwardOnly(
                f"{ctx.entry.name} is already live on {ctx.target}; the frozen source copy is older",
                hint=f"finish the migration: skyferry migrations resume {ctx.mig_id}",
            )
        ctx.mig_call(ctx.dst, "abort")


class Cutover:
    """Route the /32 to the target while both copies are silent (the source frozen and locked, the
    target's netns dropping inbound): the target's host route, then one atomic peer-list change per
    mesh member. Done right after the checkpoint, before the transfer: from then on every client segment
    reaches the target, whose holdback keeps it for the restore, and the transfer hands over all the
    source's lock dropped before (after the transfer, a segment sent between that hand-over and the
    cutover waited out the client's retransmission timer). The source's host route goes with confirm."""

    name = "cutover"

    def run(self, ctx: Context) -> dict[str, Any]:
        deadline = ctx.notes.get("freeze_deadline")
        if deadline is not None and time.time() >= deadline:  # e.g. resumed late: the source has thawed
            raise SkyferryError(
                f"migration {ctx.mig_id}: the freeze bound was hit before the cutover; the source's watchdog "
                f"thaws {ctx.entry.name!r} there",
                hint="the migration rolls back. A longer bound: skyferry migrate --freeze-timeout SECONDS",
            )
        ctx.dst.call("POST", f"/v1/containers/{ctx.entry.name}/route", {"present": True})
        routes.publish(ctx.mesh, ctx.entry.ip, ctx.target, ctx.push)
        return {"ip": ctx.entry.ip}

    def undo(self, ctx: Context) -> None:
        try:
            routes.publish(ctx.mesh, ctx.entry.ip, ctx.source, ctx.push)
        except routes.PushFailed as exc:
            if exc.members != [ctx.target]:
                raise
            # Everyone else routes to the source again; a lost target keeps nothing that matters.
            raise AgentUnreachable(str(exc), host=ctx.target) from exc
        ctx.dst.call("POST", f"/v1/containers/{ctx.entry.name}/route", {"present": False})


class LazyCheckpoint(Checkpoint):
    """Post-copy: dump everything but the memory; the frozen source serves its pages on demand, to the
    target host only (mutual TLS, its certificate's CN; docs/security.md, "Memory in flight")."""

    lazy = True


class LazyRestore(Restore):
    """Post-copy: restore without memory; pages arrive on first touch and in the background. The
    container runs at once, but until the last page has arrived it depends on the source."""

    lazy = True


class LazyPhaseLost(SkyferryError):
    """The target lost its page source before every page arrived, and its copy has been stopped: the
    frozen source, which still holds every page, is the one to bring back (the runner rolls back)."""


class LazyPhase:
    """Post-copy and hybrid: wait until the target has every page, before the source lets go of its frozen
    copy. If the page source was lost (the source's page server, the link, or the target's agent and its
    pager), the target's guard has stopped the copy there, since pages it never got would read as zeros;
    this stage then checks the copy is down and hands the migration back to the source (LazyPhaseLost).
    A target agent that restarts in the meantime is waited for: its answer after the restart is the
    verdict (it stops such a copy when it starts)."""

    name = "lazy"
    wait_for_agent_s = 60.0  # a restarting target agent; the copy there is stopped either way
    # The target answers by its own bound (POSTCOPY_TIMEOUT: then it stops its copy and says so); this
    # wait outlasts it by the time that takes, so the target's verdict, not a read timeout here, decides.
    wait_for_verdict_s = POSTCOPY_TIMEOUT + 120.0

    def run(self, ctx: Context) -> dict[str, Any]:
        verdict = self._ask(ctx)
        live = [c for c in ctx.dst.call("GET", "/v1/containers") if c["name"] == ctx.entry.name]
        if not verdict.get("lost"):
            if live and live[0]["state"] == "running":
                return verdict
            # Asked again after a controller died: the copy there is gone (the source's watchdog found it
            # stopped and fenced it), so the frozen or thawed source is the one to keep, never confirm.
            raise LazyPhaseLost(f"the copy on {ctx.target} is {live[0]['state'] if live else 'gone'}")
        if live and live[0]["state"] == "running":
            raise SkyferryError(
                f"{ctx.entry.name} on {ctx.target} lost its page source ({verdict['lost']}) but still runs",
                hint=f"stop it there before anything else: skyferry migrations rollback {ctx.mig_id}",
            )
        raise LazyPhaseLost(verdict["lost"])

    def _ask(self, ctx: Context, tries: int = 3) -> dict[str, Any]:
        """The target's verdict; a connection lost mid-wait (the agent restarted) is asked again."""
        path = f"/v1/migrations/{ctx.mig_id}/lazy"
        for attempt in range(1, tries + 1):
            try:
                verdict: dict[str, Any] = ctx.dst.call(
                    "POST", path, {"name": ctx.entry.name}, self.wait_for_agent_s, timeout=self.wait_for_verdict_s
                )
                return verdict
            except AgentUnreachable:
                if attempt == tries:
                    raise
        raise AssertionError("unreachable")

    def undo(self, ctx: Context) -> None:
        pass  # the copy on the target goes with Restore's undo


class Confirm:
    """End the frozen source copy and free what it held."""

    name = "confirm"

    def run(self, ctx: Context) -> dict[str, Any]:
        return ctx.mig_call(ctx.src, "confirm", freeze_s=ctx.notes.get("freeze_s"))

    def undo(self, ctx: Context) -> None:
        raise SkyferryError("the source copy is already gone; a confirmed migration cannot be undone")


class Cleanup:
    name = "cleanup"

    def run(self, ctx: Context) -> dict[str, Any]:
        return ctx.mig_call(ctx.dst, "cleanup")

    def undo(self, ctx: Context) -> None:
        pass


def _carried(restore: Restore) -> list[Stage]:
    """A transfer that carries the restore, then the restore (run on its own only on a resume)."""
    return [Transfer(carries=restore), restore]


STOP_COPY: list[Stage] = [Check(), Prepare(), Checkpoint(), Cutover(), *_carried(Restore()), Confirm(), Cleanup()]
# Post-copy: the shortest freeze (no page is written or read inside it), at the price of a phase after
# it in which the running copy still depends on the source for the pages it has not touched yet.
POSTCOPY: list[Stage] = [
    Check(), Prepare(), LazyCheckpoint(), Cutover(), *_carried(LazyRestore()), LazyPhase(), Confirm(), Cleanup(),
]  # fmt: skip
# After pre-copy rounds the freeze ends one of two ways: a stop-copy of what changed since the last round,
PRECOPY_FINISH: list[Stage] = [Checkpoint(), Cutover(), *_carried(Restore()), Confirm(), Cleanup()]
# or hybrid: a lazy checkpoint. The source has a pre-copy engine, so it also sends the pages the target
# holds unchanged; the target's lazy-pages daemon takes those from its store and only the pages that
# changed since the last round from the source (pipeline/memory/hybrid.py).
HYBRID_FINISH: list[Stage] = [
    LazyCheckpoint(), Cutover(), *_carried(LazyRestore()), LazyPhase(), Confirm(), Cleanup(),
]  # fmt: skip
PRECOPY: list[Stage] = [Check(), Prepare(), PreCopy(), *PRECOPY_FINISH]
HYBRID: list[Stage] = [Check(), Prepare(), PreCopy("content", ("hybrid",)), *HYBRID_FINISH]
# Auto: the rounds measure the container and the link, then precopy's `finish` picks PRECOPY_FINISH or
# HYBRID_FINISH (migration.plan). --estimate: two rounds, then both stages are undone.
AUTO: list[Stage] = [Check(), Prepare(), PreCopy(finishes=None)]
ESTIMATE_ROUNDS: list[Stage] = [Check(), Prepare(), PreCopy(finishes=None, rounds=2)]
POINT_OF_NO_RETURN = "restore"
FREEZE_FROM, FREEZE_TO = "checkpoint", "restore"


def freeze_s(transitions: list[dict[str, Any]]) -> float | None:
    """The freeze's seconds (None until the restore is done)."""
    wall = frozen_wall(transitions)
    return wall[1] - wall[0] if wall else None


def frozen_wall(transitions: list[dict[str, Any]]) -> tuple[float, float] | None:
    """When (wall clock) the container was frozen: from the first checkpoint's start, after the moments
    it let the container's replies land before its pause (agent/settle.py), to the last restore done."""
    started = next((t["at"] for t in transitions if t["stage"] == FREEZE_FROM and t["status"] == "started"), None)
    done = [t["at"] for t in transitions if t["stage"] == FREEZE_TO and t["status"] == "done"]
    return (started + settled_s(transitions), done[-1]) if started is not None and done else None


def settled_s(transitions: list[dict[str, Any]]) -> float:
    """The seconds the checkpoint let the container's replies land before its pause (agent/settle.py):
    inside its stage, outside the freeze."""
    done = (t for t in transitions if (t["stage"], t["status"]) == (FREEZE_FROM, "done"))
    return next(((t["detail"] or {}).get("settle_s", 0.0) for t in done), 0.0)


def rule_out(name: str, mode: str, can: list[str], found: list[dict[str, Any]]) -> tuple[list[str], str | None]:
    """The modes of `can` left after the preflight's findings that rule out some modes only (a tree that
    forks all the time rules out the lazy ones: agent/preflight.py), and why any were taken out. A mode
    asked for by name that is ruled out is refused here, before anything freezes."""
    out = {m: f for f in found for m in f.get("modes") or ()}
    if mode in out:
        raise SkyferryError(f"{name!r} cannot move by {mode}: {_shape(out[mode])}", hint=out[mode]["hint"])
    gone = [m for m in can if m in out]
    if not gone:
        return can, None
    return [m for m in can if m not in out], f"{' and '.join(gone)} ruled out: {_shape(out[gone[0]])}"


def _shape(finding: dict[str, Any]) -> str:
    return f"{finding['comm']} (pid {finding['pid']}) {finding['what']}"


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split(".") if x.isdigit())
