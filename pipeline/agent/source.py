"""The source side of one migration: a `SourceSession` holds everything this host keeps for it.

Steps, named as the controller's stages and the agent's operations (POST /v1/migrations/ID/STEP):
  precopy     memory and file rounds while the container runs, streamed to the target
  checkpoint  freeze, silence, dump (lazily in post-copy and hybrid, with a scan of the frozen memory)
  transfer    what the target still lacks, inside the freeze: the final deltas after rounds, else the
              whole image and payload; then the client segments our lock has dropped so far
  rollback    thaw the frozen container (any time before confirm)
  confirm     end the frozen copy (after post-copy, once the target has every page)
Each step is idempotent: a resumed controller may call it again. The session talks to the target only
through `Lane`s the server builds (functions, no sockets), and `close()` releases everything it holds.

Every freeze here is bounded (pipeline/agent/freeze.py): `expire` ends one that outlived its deadline,
called by the agent's watchdog thread.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import secrets
import signal
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from skyferry.pipeline import proctree
from skyferry.pipeline.agent import metrics, netlock, preflight, settle
from skyferry.pipeline.agent.freeze import Freeze
from skyferry.pipeline.agent.holdback import Holdback
from skyferry.pipeline.agent.host import Host
from skyferry.pipeline.criu import version as criu_version
from skyferry.pipeline.criu.breakpoints import PerfHooks
from skyferry.pipeline.errors import NotRestored, RestoreFailed, SkyferryError
from skyferry.pipeline.files import leases, wire
from skyferry.pipeline.files.fsync import FsStats, FsTracker
from skyferry.pipeline.hostapi import faults
from skyferry.pipeline.hostapi.client import AgentClient, AgentUnreachable
from skyferry.pipeline.hostapi.layout import FREEZE_TIMEOUT, POSTCOPY_TIMEOUT
from skyferry.pipeline.memory import hybrid, pagetunnel
from skyferry.pipeline.memory.policy import ConvergencePolicy
from skyferry.pipeline.memory.precopy import SourceEngine
from skyferry.pipeline.memory.predump import PredumpSource
from skyferry.pipeline.runtimes.children import kill_groups
from skyferry.pipeline.runtimes.protocol import Runtime
from skyferry.pipeline.runtimes.throttle import Throttle

log = logging.getLogger("skyferry.agent.source")
SERVING_MARGIN = 120.0  # seconds past the target's lazy bound: it stops its copy and answers meanwhile
THROTTLE_DRAIN_S = 0.02  # a throttled container runs this long unthrottled as its rounds end
LATE_WAIT_S = 5.0  # confirm waits this long for the late segments' hand-over (one round trip, usually)


class Upload(Protocol):
    def __call__(self, stream: str, chunks: Iterable[bytes], **query: str) -> dict[str, Any]: ...


class Call(Protocol):
    def __call__(self, op: str, body: dict[str, Any]) -> dict[str, Any]: ...


Peer = Callable[[str, int], AgentClient]  # a client to another agent at (address, port)


@dataclass(frozen=True)
class Lane:
    """One kept-alive connection to the target's agent for this migration: `upload` PUTs a stream,
    `call` POSTs an operation, `warm` opens it ahead of use. Memory and files have a lane each, so their
    finals travel side by side; the hold lane asks for the restore while they wait for their answers.
    `bulk` PUTs a stream over a connection this host keeps to that agent across migrations: a first
    round goes where the last one left TCP's window open, instead of ramping up a fresh one."""

    upload: Upload
    call: Call
    warm: Callable[[], None]
    bulk: Upload


class SourceSession:
    def __init__(self, host: Host, mig: str, name: str) -> None:
        self.host, self.mig, self.name = host, mig, name
        self.dir = host.mig_dir(mig)
        self.engine: SourceEngine | None = None  # content-based pre-copy memory rounds
        self.chain: PredumpSource | None = None  # soft-dirty pre-copy: CRIU pre-dumps
        self.tracker: FsTracker | None = None  # pre-copy file rounds
        self.lazy_dump: subprocess.Popen[bytes] | None = None  # post-copy: CRIU's page server (loopback)
        self.tunnel: pagetunnel.Tunnel | None = None  # post-copy: TLS to it, for the target only
        self.page_port: int | None = None  # post-copy: the page server's port, firewalled to loopback
        self.freeze_scan: hybrid.FreezeScan | None = None  # hybrid: what the target holds, and more
        self.holdback: Holdback | None = None  # client segments, replayed if a rollback thaws us
        self.throttle: Throttle | None = None  # auto-converge; its record (host.throttles) outlives us
        self.restore_asked = False  # the transfer's last request, carrying the restore, went out
        self.finals: _Finals | None = None  # the final deltas, sent ahead of the transfer (send_finals)
        self.closed = False  # let go: a final delta still on its way is cut short
        self.frozen_pid: int | None = None  # the container's init, as the checkpoint found it
        self.frozen_leases: leases.Leases | None = None  # the write leases, read while CRIU dumped
        self.late: threading.Thread | None = None  # hands over segments after the restore (confirm waits)
        self.segments_late: int | None = 0  # how many it handed over; None while it runs
        self.perf = PerfHooks()  # CRIU's breakpoints then skip an RCU grace period inside the freeze
        self.perf.hold()

    @classmethod
    def of(cls, host: Host, mig: str, name: str) -> SourceSession:
        """This host's session of migration `mig`, made on first use."""
        return host.session(host.sources, cls, mig, name)

    def precopy(
        self,
        mem: Lane,
        fs: Lane,
        policy: ConvergencePolicy,
        method: str = "auto",
        freeze_timeout: float = FREEZE_TIMEOUT,
        completion_timeout: float | None = None,
        forks: bool = False,
        streams: int | None = None,
    ) -> dict[str, Any]:
        """Rounds while the container runs, until the policy stops them: memory, then the files of its
        rootfs and volumes. A repeated call starts afresh (the target resets its store).

        With `forks` (auto mode, whose check only marked the fork count: Host.preflight), the rounds take
        the lazy finishes away from a tree that forks too fast for a lazy phase to end, counted from the
        check's mark to the end of round 1 (at least 0.5 s: a shorter round waits out the rest).

        `method` "auto" takes CRIU's pre-dump where this kernel tracks soft-dirty pages and the engine can
        pre-dump, else content-based rounds; "content" (hybrid, whose freeze scan needs the hashes) forces
        the latter. A CRIU pre-dump freezes the container for its round: bounded like the checkpoint.

        With `policy.throttle` (auto-converge), rounds that cannot keep up throttle the container's CPU a
        step more each (pipeline/runtimes/throttle.py) until they converge or the throttle is at its cap.
        The rounds lift it as they end (or fail), before the checkpoint: the freezer cannot freeze a task
        the CFS throttle keeps off the CPU in time ("unable to freeze"), and the image (so the target's
        copy) then holds the container's own limit. `completion_timeout` (seconds per GiB of the
        container's memory, at least one GiB's worth, like KubeVirt's) ends the rounds with reason
        `completion-timeout`: the controller then aborts or hands over to post-copy.

        Round 1, the whole memory, waits until fewer than `streams` first rounds stream from this host
        (an evacuation's; None: at once), its connections open meanwhile (agent/bulk.py)."""
        try:
            return self._precopy(mem, fs, policy, method, freeze_timeout, completion_timeout, forks, streams)
        except Exception:
            self._unthrottle()
            raise

    def _precopy(
        self, mem: Lane, fs: Lane, policy: ConvergencePolicy, method: str, freeze_timeout: float,
        completion_timeout: float | None, forks: bool, streams: int | None,
    ) -> dict[str, Any]:  # fmt: skip
        self._unthrottle()  # a repeated call starts afresh
        mark = self.host.fork_marks.pop(self.name, None)
        runtime = self.host.rt(self.name)
        state = runtime.state(self.name)
        if state is None or state["status"] != "running":
            raise SkyferryError(f"container {self.name!r} is not running on {self.host.cfg.name}")
        if method not in ("auto", criu_version.PRECOPY_CONTENT):
            raise SkyferryError(f"unknown pre-copy method {method!r}", hint="auto or content")
        runtime.checkpoint_ahead(self.name)  # while the rounds run, not inside the freeze
        if method == "auto":
            method = criu_version.precopy_method(criu_version.soft_dirty(), runtime.pre_dumps)
        mem.call("precopy-reset", {"method": method})
        self.engine = self.chain = None
        rounds: SourceEngine | PredumpSource
        if method == criu_version.PRECOPY_SOFT_DIRTY:

            def pre_dump(images: Path, parent: str | None) -> Path:
                # One work dir per round (CRIU's log and stats-dump): host.wipe keeps work*/*.log.
                work = self.dir / f"work-round{images.name}"
                self.host.freezes.arm(self.mig, self.name, "pre-dump", freeze_timeout)
                try:
                    with self.throttle.relaxed() if self.throttle else contextlib.nullcontext():
                        runtime.pre_dump(self.name, images, parent, work)  # CRIU freezes: not while throttled
                except SkyferryError as exc:
                    self.host.freezes.check(self.mig, exc)  # the bound was hit: say so, not runc's last line
                    raise  # the record stays: the watchdog thaws what a failed pre-dump may have left frozen
                self.host.freezes.forget(self.mig)
                return work

            rounds = self.chain = PredumpSource(self.dir / "rounds", pre_dump)
        else:
            rounds = self.engine = SourceEngine(int(state["pid"]))
        tracker = self.tracker = FsTracker(runtime.payload(self.name))
        rss = proctree.tree_rss(int(state["pid"]))
        policy = replace(policy, method=method)  # the prediction: soft-dirty dumps only the delta
        if completion_timeout is not None:
            policy = replace(policy, completion_seconds=completion_timeout * max(rss / (1 << 30), 1.0))
        if policy.throttle:
            self.throttle = Throttle.start(self.host.throttles, self.mig, self.name, runtime.cgroup(self.name))
        fs_rounds, steps, levels = [], [], []  # levels: the throttle in force as each round began
        ruled_out, bulk = None, None
        # Beside the rounds: tmpfs warmed for the dump, and each file round on its own lane beside its
        # memory round; the link waits for neither.
        with ThreadPoolExecutor(2, thread_name_prefix="precopy") as side:  # its exit waits for both
            warm = side.submit(_prewarm, self.dir / "images", rss)
            while True:
                levels.append(self.throttle.level if self.throttle else 0.0)
                stats = FsStats()
                # Round 1 (all the memory, and the whole rootfs) in its turn; the later ones at once.
                with self.host.bulk.slot(streams) if bulk is None else contextlib.nullcontext() as turn:
                    files = side.submit(fs.upload, "fs-round", tracker.round(stats))  # its own lane
                    if turn:
                        mem.bulk("precopy-round", turn.counted(rounds.round()))
                    else:
                        mem.upload("precopy-round", rounds.round())
                    # Until the target holds it, not until the socket took it: a send buffer swallows a small
                    # round at once (5.7 MB "sent" in 0.12 s over 16 Mbit/s), and the policy's bandwidth too.
                    rounds.history[-1].duration = time.monotonic() - rounds.history[-1].started
                    files.result()
                bulk = bulk or turn
                metrics.precopy_round(self.name, method, rounds.history)
                fs_rounds.append(stats.as_dict())
                if forks and len(rounds.history) == 1 and (found := preflight.forking(int(state["pid"]), mark)):
                    ruled_out = preflight.ruled_out(found)
                    policy = replace(policy, finishes=[f for f in policy.finishes if f not in preflight.LAZY_MODES])
                    if not policy.finishes:
                        raise SkyferryError(f"{self.name!r} cannot finish lazily: {found[0]}", hint=found[0].hint)
                # A round's delta was dirtied while the round before it ran: judged by the throttle of then (a
                # step shows one round later), so the cap is judged only once a round ran under it.
                seen = levels[-2] if len(levels) > 1 else 0.0
                decision = policy.decide(rounds.history, files_wire=fs_rounds[0]["bytes_wire"], throttled=seen)
                if decision.reason == "throttle" and self.throttle is not None and not self.throttle.capped:
                    last = rounds.history[-1]
                    rate = last.bytes_out / max(last.started - rounds.history[-2].started, 1e-6)
                    steps.append({"round": len(rounds.history), "dirty_bytes_s": round(rate), **self.throttle.step()})
                    metrics.throttle(self.name, steps[-1]["percent"])
                    log.info("auto-converge: %s throttled to %d%% after round %d (%s)", self.name,
                             steps[-1]["percent"], len(rounds.history), decision.detail)  # fmt: skip
                if decision.stop:
                    break
            warm.result()
        if self._unthrottle():
            # Throttled, it ran 1 ms per period (up to 1 s): a moment unthrottled to answer what waited, or its
            # clients wait out that period on top of the freeze. Here, as the rounds end: the container runs.
            time.sleep(THROTTLE_DRAIN_S)
        return {
            "method": method,
            "rounds": [r.as_dict() for r in rounds.history],
            "fs_rounds": fs_rounds,
            "stop": decision.reason,
            "why": decision.detail,
            "finish": decision.finish,  # how the freeze ends (auto mode: the controller runs that finish)
            "finish_reason": decision.finish_reason,
            "max_freeze_ms": policy.max_freeze_ms,
            "predicted": decision.predicted,  # per mode, if the container froze now
            "measured": decision.measured,  # memory, bandwidth, dirty rate: what the predictions rest on
            "throttle_steps": steps,
            "bulk": bulk.report if bulk else None,  # round 1's slot: its time, bytes, and the link's meanwhile
            **({"ruled_out": ruled_out} if ruled_out else {}),  # the lazy finishes, by the fork rate
            **({"completion_timeout_s": round(policy.completion_seconds, 3)} if policy.completion_seconds else {}),
        }

    def checkpoint(
        self, lazy: bool, freeze_timeout: float = FREEZE_TIMEOUT, target: str | None = None,
        peer: str | None = None, tls: ssl.SSLContext | None = None, check: pagetunnel.Check = pagetunnel.no_check,
    ) -> dict[str, Any]:  # fmt: skip
        """Freeze, silence and dump the container; it stays frozen here until confirm or rollback.
        With `lazy` (post-copy) the pages stay in the frozen processes, served by a CRIU page server on
        loopback until the target has fetched them all, behind a tunnel (`pagetunnel.Tunnel`) on this
        host's overlay address that only host `peer` (the target) may enter, with mutual TLS (`tls`, this
        agent's server context; `check` refuses revoked certificates); both on ports the kernel picks.
        After pre-copy rounds (hybrid), the frozen memory is also scanned, alongside the dump, for the pages
        the target holds unchanged: the target takes those from its store and only the rest from the page
        server.

        The freeze is bounded from the pause on: past `freeze_timeout` seconds without the target's
        restore, the watchdog kills whatever hangs, fences the `target` ("address:port" of its agent)
        and thaws the container here (`expire`)."""
        runtime = self.host.rt(self.name)
        state = runtime.state(self.name)
        if state is None or state["status"] not in ("running", "paused"):
            raise SkyferryError(f"container {self.name!r} is not running on {self.host.cfg.name}")
        images = self.dir / "images"
        netns = self.host.netns(self.name)
        self.frozen_pid = int(state["pid"])
        self.finals = None  # a retried checkpoint's deltas come from its own dump
        settled = 0.0
        if state["status"] == "running" and self.host.freezes.get(self.mig) is None:  # not a retry inside it
            with self.host.freezes.settling(self.mig):
                settled = settle.settle(netns)
        t0 = time.monotonic()
        freeze = self.host.freezes.arm(self.mig, self.name, "checkpoint", freeze_timeout, target, lazy)
        try:
            t_frozen = self._freeze_and_dump(runtime, state, images, netns, lazy, peer, tls, check)
        except Exception as exc:
            self.host.freezes.check(self.mig, exc)  # the bound was hit: say so, not runc's last line
            raise
        return {
            "settle_s": settled,  # before the pause: its replies landing (agent/settle.py)
            "pause_s": t_frozen - t0,
            "dump_s": time.monotonic() - t_frozen,
            "image_bytes": _du(images),
            "freeze_deadline": freeze.deadline,  # the target's restore must be done by then
            "freeze_timeout": freeze.bound,
            **({"page_server": self.tunnel.address} if self.tunnel else {}),
        }

    def _freeze_and_dump(
        self, runtime: Runtime, state: dict[str, Any], images: Path, netns: str, lazy: bool,
        peer: str | None, tls: ssl.SSLContext | None, check: pagetunnel.Check,
    ) -> float:  # fmt: skip
        """Pause, lock, dump; when the container was frozen and locked (monotonic)."""
        faults.act(self.host.cfg.state_root, "stop-task:checkpoint", lambda: _stop_newest_task(int(state["pid"])))
        if state["status"] == "running":
            runtime.pause(self.name)
        netlock.lock(netns)
        if self.holdback is None:  # replayed if the migration rolls back and we thaw
            self.holdback = Holdback(netns, runtime.spec(self.name).ip)
        t_frozen = time.monotonic()
        wire.wipe(images)  # a retried checkpoint starts clean
        # Beside CRIU's dump: the leases (/proc/locks waits out an RCU grace period, 10-15 ms), for the file
        # finals; after pre-copy rounds, a lazy dump's freeze scan (in `_dump`).
        with ThreadPoolExecutor(2) as side:
            leased = side.submit(leases.write_leases)
            self._dump(runtime, images, lazy, peer, tls, check, side)
            self.frozen_leases = leased.result()
        return t_frozen

    def _dump(
        self, runtime: Runtime, images: Path, lazy: bool, peer: str | None, tls: ssl.SSLContext | None,
        check: pagetunnel.Check, side: ThreadPoolExecutor,
    ) -> None:  # fmt: skip
        if lazy:
            if peer is None or tls is None:
                raise SkyferryError(f"migration {self.mig}: a lazy checkpoint needs the target's name")
            # A lazy dump cannot take a pre-dump parent (hybrid pre-copies by content). After soft-dirty rounds
            # that hit the completion timeout the hand-over is plain post-copy: every page from the server.
            self.chain = None
            self._stop_lazy_dump()
            engine = self.engine
            # The scan reads memory while CRIU dumps the rest (on failure, `side` waits for it to end).
            scan = side.submit(hybrid.freeze_scan, engine) if engine else None
            port = self.page_port = pagetunnel.free_loopback_port()
            netlock.loopback_only(port)  # CRIU binds every address, whatever runc passes
            server = f"{pagetunnel.LOOPBACK}:{port}"
            self.lazy_dump = runtime.checkpoint_lazy(self.name, images, self.dir / "work", server)
            # The drill `lose-page-server`: the link to the target dies 64 KiB into the pages.
            cut = 64 << 10 if faults.listed(self.host.cfg.state_root, "lose-page-server") else None
            self.tunnel = pagetunnel.Tunnel(tls, self.host.cfg.overlay_ip, peer, port, check, cut_after=cut)
            if scan is not None:
                self.freeze_scan = scan.result()
        else:
            parent = self.chain.parent_for(images) if self.chain else None
            runtime.checkpoint(self.name, images, self.dir / "work", parent=parent)

    def transfer(self, mem: Lane, fs: Lane, hold: Lane, restore: dict[str, Any] | None = None) -> dict[str, Any]:
        """Stream the frozen container's state to the target, then the client segments our lock has
        dropped so far (the target replays them at its restore, so those clients need not wait out their
        back-off).

        After pre-copy rounds only the deltas travel: the memory pages and the files changed since the
        last round (each stream checksummed frame by frame), side by side on two lanes. Without rounds
        (stop-copy) the whole image and payload go as one tar, whose SHA-256 both ends must agree on.
        With a `restore` order (bodies.RestoreOrder) the segments carry it, and the answer's "restore" is
        the target's result. After rounds they go on the hold lane as soon as the deltas' last bytes are
        sent, naming them: the target restores the moment they have landed, without a round trip for
        their answers. Failing before that request, the transfer raises NotRestored: nothing on the target
        can be live.
        """
        t0 = time.monotonic()
        self.restore_asked = False
        try:
            self.host.freezes.check(self.mig)
            return self._transfer(mem, fs, hold, t0, restore)
        except Exception as exc:
            if restore is None or self.restore_asked:
                self.host.freezes.check(self.mig, exc)  # the bound was hit mid-stream: say so
                raise
            with _not_restored():
                self.host.freezes.check(self.mig, exc)
                raise

    def send_finals(self, mem: Lane, fs: Lane) -> None:
        """Start the final deltas towards the target as soon as the dump is done, while the controller cuts
        over: the transfer then finds them sent or on their way, and only hands over the held segments
        with the restore order (docs/migration.md, "Where the freeze goes", item 21). Without rounds
        (stop-copy) the whole payload waits for the transfer. A delta that cannot even start is left for
        the transfer, which starts it again and reports why it failed.

        Not after a lazy dump (hybrid): its final (the clean map and the pages changed since the last
        round) outlasted the cutover anyway, and sent beside it the client's gap exceeded the freeze by
        160-215 ms in two of three runs at 512 MiB (none of two before), not yet understood."""
        if self.lazy_dump is not None:
            return
        try:
            self.finals = self._start_finals(mem, fs)
        except Exception as exc:
            log.warning("%s: final deltas not sent ahead (%s); the transfer sends them", self.name, exc)

    def _start_finals(self, mem: Lane, fs: Lane) -> _Finals | None:
        final = self._final()
        fs_stats = FsStats()
        fs_final = self._fs_final(fs_stats)
        if final is None or fs_final is None:
            return None
        # After a lazy dump the target starts its pager as soon as the images are in, outside the restore.
        lazy = {"page_server": self.tunnel.address} if self.tunnel is not None else {}
        stream, chunks, mem_stats = final
        return _Finals(mem, fs, stream, self._bounded(chunks), mem_stats, self._bounded(fs_final), fs_stats, lazy)

    def _transfer(self, mem: Lane, fs: Lane, hold: Lane, t0: float, restore: dict[str, Any] | None) -> dict[str, Any]:
        finals, self.finals = self.finals, None
        if finals is None:
            finals = self._start_finals(mem, fs)
        if finals is not None:
            finals.wait_sent()  # their last bytes are out: the answers are a round trip away
            try:
                handed_over, restored = self._hand_over(hold, restore, finals.after)
            except NotRestored as exc:  # a stream failed there: its own error says why
                failed = finals.failure() or exc
                raise NotRestored(str(failed), hint=getattr(failed, "hint", None)) from failed
            finals.results()
            return {
                "memory_s": round(finals.ended[finals.stream] - finals.t0, 4),
                "fs_s": round(finals.ended["fs-round"] - finals.t0, 4),
                "finals_ahead_s": round(max(t0 - finals.t0, 0.0), 4),  # sent before this call began
                "final": finals.mem_stats.as_dict(),
                "fs_final": finals.fs_stats.as_dict(),
                "bytes_raw": finals.mem_stats.bytes_raw + finals.fs_stats.bytes_raw,
                "bytes_wire": finals.mem_stats.bytes_out + finals.fs_stats.bytes_wire,
                "segments_handed_over": handed_over,
                "seconds": time.monotonic() - t0,
                **restored,
            }
        lazy = {"page_server": self.tunnel.address} if self.tunnel is not None else {}
        images = self.dir / "images"
        if not images.exists():
            raise SkyferryError(f"migration {self.mig}: no checkpoint of {self.name!r} on {self.host.cfg.name}")
        stats = wire.StreamStats()
        payload = {"images": images, **self.host.rt(self.name).payload(self.name)}
        whole = wire.encode(payload, stats, self.frozen_leases)
        received = mem.upload("receive", self._bounded(whole), **lazy)
        if received.get("sha256") != stats.sha256:
            raise SkyferryError(
                f"image stream for {self.name!r} arrived corrupted (digest mismatch); nothing was restored",
                hint="the migration rolls back; check the link and retry",
            )
        handed_over, restored = self._hand_over(mem, restore)
        return {
            "bytes_raw": stats.bytes_raw,
            "bytes_wire": stats.bytes_wire,
            "segments_handed_over": handed_over,
            "seconds": time.monotonic() - t0,
            "sha256": stats.sha256,
            **restored,
        }

    def _final(self) -> tuple[str, Iterable[bytes], Any] | None:
        """The memory's final delta from the checkpoint, and the stream it goes to: the pages the target
        lacks ("precopy-final"), or after a lazy dump the clean map ("lazy-final"). None without
        pre-copy rounds: then everything travels."""
        images = self.dir / "images"
        if self.chain is not None:
            delta = self.chain.final(images, self.dir / "work")
            return "precopy-final", delta, delta.stats
        if self.engine is None:
            return None
        if self.freeze_scan is not None:
            delta = hybrid.lazy_final(self.engine, images, self.freeze_scan)
            return "lazy-final", delta, delta.stats
        delta = self.engine.final(images)
        return "precopy-final", delta, delta.stats

    def _fs_final(self, stats: FsStats) -> Iterable[bytes] | None:
        """The files changed since the last round, read while the container is frozen (None without
        rounds: then the payload travels whole)."""
        if self.tracker is None:
            return None
        # The rounds' tracker and the checkpoint are this session's: its pid, without a runtime call.
        pids = proctree.descendants(self.frozen_pid) if self.frozen_pid else []
        return self.tracker.final(stats, pids=pids, leased=self.frozen_leases)

    def _bounded(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        """`chunks`, cut short once the watchdog ends this freeze or the session lets go (a rollback while
        a delta sent ahead is on its way): the target lets go of the stream (and of its container lock,
        which the watchdog's fence needs) instead of taking in the rest."""
        for chunk in chunks:
            if self.closed:
                raise SkyferryError(f"migration {self.mig}: {self.name!r} was let go here; stream cut short")
            if self.mig in self.host.freezes.expiring:
                raise self.host.freezes.error(self.mig, self.host.freezes.get(self.mig))
            yield chunk

    def _hand_over(
        self, lane: Lane, restore: dict[str, Any] | None, after: dict[str, Any] | None = None
    ) -> tuple[int, dict[str, Any]]:
        """Pass the segments our lock has dropped so far to the target, with the `restore` order if there is
        one (then the target restores once the streams named in `after` have landed); how many, and
        {"restore": its result}."""
        held = self.holdback.snapshot() if self.holdback else []
        packets = [base64.b64encode(p).decode() for p in held]
        if restore is None:
            if held:
                lane.call("hold", {"packets": packets})
            return len(held), {}
        self.host.freezes.check(self.mig)  # past the bound, the watchdog is fencing the target: never ask
        self.restore_asked = True
        try:
            done = lane.call("hold", {"packets": packets, "restore": restore, "after": after})
        except (AgentUnreachable, NotRestored):
            raise
        except SkyferryError as exc:  # the target answered: its restore failed, and it says why
            raise RestoreFailed(str(exc), hint=exc.hint, log=exc.log) from exc
        self.host.freezes.restored(self.mig)
        self.segments_late = None
        self.late = threading.Thread(target=self._hand_over_late, args=(lane, held), name="late-segments", daemon=True)
        self.late.start()
        return len(held), {"restore": done["restore"]}

    def _hand_over_late(self, lane: Lane, sent: list[bytes]) -> None:
        """After the restore, outside the freeze: the segments our lock dropped since the hand-over, to the
        live target, which delivers them at once. A client's segment in flight towards us when the cutover
        moved its route arrives up to one WAN hop after it, past the hand-over; a client with nothing else
        in flight (no later segment for SACK to report) would wait out its retransmission timer, 200 ms
        or more. Best effort: TCP retransmits what is lost."""
        before = set(sent)
        late = [p for p in self.holdback.snapshot() if p not in before] if self.holdback else []
        if late:
            try:
                lane.call("hold", {"packets": [base64.b64encode(p).decode() for p in late]})
            except Exception as exc:  # anything: the migration is done either way
                log.warning("%s: %d late client segments not handed over (%s)", self.name, len(late), exc)
        self.segments_late = len(late)

    def rollback(self) -> dict[str, Any]:
        """Resume the frozen source: unlock its network, thaw it. Safe to call at any point before confirm."""
        replayed = self._thaw()
        self.close()
        self.host.freezes.forget(self.mig)
        return {**self.host.info(self.name), "replayed": replayed}

    def _thaw(self) -> int:
        """End whatever dump still runs (a hung one, or one an agent that died left behind: thawed, its
        CRIU would go on and freeze the container again when it finishes), unlock, thaw, and replay the
        held client segments; how many."""
        state = self.host.state(self.name)
        if state is None:
            raise SkyferryError(f"container {self.name!r} is gone from {self.host.cfg.name}; cannot resume it here")
        runtime = self.host.rt(self.name)
        netns = self.host.netns(self.name)
        stuck = runtime.started(self.name)
        if stuck:
            kill_groups(stuck)
            netlock.clear_criu_lock(netns)  # CRIU's own network lock, which a killed dump leaves in place
        self._stop_lazy_dump()
        netlock.unlock(netns)
        self._unthrottle()  # before the thaw: the container runs on at its own speed
        if state["status"] == "paused":
            runtime.resume(self.name)
        # Clients whose packets the lock dropped have backed off; hand them to the thawed container now.
        replayed = self.holdback.replay() if self.holdback else 0
        self.holdback = None
        return replayed

    def confirm(self) -> dict[str, Any]:
        """The target runs and is routed: end the frozen copy and everything it held here. After a
        post-copy restore (the controller has the target's word that every page arrived: its `lazy`
        step), first wait until our page server has seen the target hang up. Refused once the watchdog has
        thawed the container here (the target's copy was gone: `expire`): it is the only copy left."""
        record = self.host.freezes.get(self.mig)
        if record is not None and record.expired:
            raise self.host.freezes.error(self.mig, record)
        if self.late is not None:  # before the lanes go with this call
            self.late.join(LATE_WAIT_S)
        waited = 0.0
        proc = self.lazy_dump
        if proc is not None:
            t0 = time.monotonic()
            try:
                rc = proc.wait(timeout=POSTCOPY_TIMEOUT)
            except subprocess.TimeoutExpired:
                rc = None
            waited = time.monotonic() - t0
            if rc != 0:
                self._stop_lazy_dump()
                raise SkyferryError(
                    f"post-copy of {self.name!r}: the source's page server ended before the target had every "
                    f"page ({'timeout' if rc is None else f'exit {rc}'})",
                    hint=f"the copy on the target is missing memory and cannot continue; see {self.dir}",
                )
            self.lazy_dump = None
        self.host.remove_if_present(self.name)
        self.close()
        self.host.freezes.forget(self.mig)
        return {"postcopy_s": waited, "segments_late": self.segments_late}

    def close(self) -> None:
        """Release everything the migration holds here (idempotent) and leave the host's registry."""
        self.closed, self.finals = True, None  # a delta still on its way ends with its lane (server)
        self._unthrottle()
        self._stop_lazy_dump()
        if self.holdback is not None:
            self.holdback.close()
            self.holdback = None
        self.engine = self.chain = self.tracker = self.freeze_scan = None
        with contextlib.suppress(SkyferryError):  # gone after confirm, and its worker with it
            self.host.rt(self.name).checkpoint_ahead(self.name, ready=False)
        self.perf.release()
        self.host.wipe(self.mig)
        if self.host.sources.get(self.mig) is self:
            del self.host.sources[self.mig]

    def _unthrottle(self) -> bool:
        """Write the container's own CPU limit back, if this migration throttled it (also one an agent
        that died left throttled: the record is on disk); whether it was throttled."""
        self.throttle = None
        lifted = self.host.throttles.lift(self.mig)
        metrics.throttle(self.name, 0)
        return lifted

    def _stop_lazy_dump(self) -> None:
        """End a post-copy page server (and the CRIU dump it belongs to) and its tunnel. The frozen tasks
        it held stay frozen in their cgroup, so a rollback can still thaw them."""
        tunnel, self.tunnel = self.tunnel, None
        if tunnel is not None:
            tunnel.close()
        port, self.page_port = self.page_port, None
        if port is not None:
            netlock.release_port(port)
        proc, self.lazy_dump = self.lazy_dump, None
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            netlock.clear_criu_lock(self.host.netns(self.name))


class _Finals:
    """The final deltas on their way to the target, side by side on their own lanes: the memory's and the
    files', named by one transfer id, so that the target's restore waits for exactly these
    (`after`). `ended[stream]`: when each answer came; `t0`: when they started."""

    def __init__(self, mem: Lane, fs: Lane, stream: str, chunks: Iterable[bytes], mem_stats: Any,
                 fs_chunks: Iterable[bytes], fs_stats: FsStats, lazy: dict[str, str]) -> None:  # fmt: skip
        self.stream, self.mem_stats, self.fs_stats = stream, mem_stats, fs_stats
        self.t0 = time.monotonic()
        tag = {"transfer": secrets.token_hex(8)}
        self.after = {**tag, "streams": [stream, "fs-round"]}
        self.ended: dict[str, float] = {}
        pool = ThreadPoolExecutor(2, thread_name_prefix="finals")
        self.uploads = [_Upload(pool, fs, "fs-round", fs_chunks, tag, self.ended),
                        _Upload(pool, mem, stream, chunks, {**tag, **lazy}, self.ended)]  # fmt: skip
        pool.shutdown(wait=False)  # its two threads end with the uploads

    def wait_sent(self) -> None:
        for upload in self.uploads:
            upload.wait_sent()

    def failure(self) -> BaseException | None:
        """The first upload's error, once both have ended."""
        return next((e for e in (u.future.exception() for u in self.uploads) if e is not None), None)

    def results(self) -> None:
        for upload in self.uploads:
            upload.future.result()


class _Upload:
    """A final stream uploading in the background: `sent` once its last byte went out (or it ended),
    `ended[stream]` the moment its answer came."""

    def __init__(self, pool: ThreadPoolExecutor, lane: Lane, stream: str, chunks: Iterable[bytes],
                 query: dict[str, str], ended: dict[str, float]) -> None:  # fmt: skip
        self.sent = threading.Event()

        def then_sent() -> Iterator[bytes]:
            yield from chunks
            self.sent.set()

        def done(_: Future[dict[str, Any]]) -> None:
            ended.setdefault(stream, time.monotonic())
            self.sent.set()

        self.future = pool.submit(lane.upload, stream, then_sent(), **query)
        self.future.add_done_callback(done)

    def wait_sent(self) -> None:
        """Until the last byte went out; an upload that failed first raises its error here."""
        self.sent.wait()
        if self.future.done():
            self.future.result()


@contextlib.contextmanager
def _not_restored() -> Iterator[None]:
    """Re-raise a transfer's failure as NotRestored: it came before the target was asked to restore."""
    try:
        yield
    except SkyferryError as exc:
        raise NotRestored(str(exc), hint=exc.hint, log=exc.log) from exc
    except Exception as exc:
        raise NotRestored(f"transfer failed: {exc!r}") from exc


def expire(host: Host, record: Freeze, peer: Peer) -> None:
    """End a freeze that outlived its deadline (the watchdog calls this; pipeline/agent/freeze.py):

    1. kill the engine processes a step of this container waits on (a hung runc or CRIU), and stop this
       migration's uploads, so the step holding the container lets go;
    2. fence the target (after a checkpoint): its `abort` removes its copy, and with it any later
       restore; or it refuses because its copy is live: then the point of no return has passed, the
       frozen copy here is stale, and it stays frozen for confirm to remove (nothing to thaw);
    3. thaw the container here (unlock, resume, replay) and, after a checkpoint, mark the record expired,
       so that every later step of the migration is refused and the controller rolls back.
    A target that cannot be reached raises: the watchdog tries again, and the container stays frozen
    (a live copy there is possible, and two live copies would be worse than a longer freeze)."""
    if host.state(record.name) is None:  # the container is gone: nothing is frozen any more
        host.throttles.lift(record.mig)
        host.freezes.forget(record.mig)
        return
    if record.phase == "serving":
        _end_serving(host, record, peer)
        return
    killed = host.freezes.expiring.get(record.mig)
    if killed is None:  # once: on a retry (the fence failed) a runc running now is the rollback's `resume`
        killed = host.freezes.expiring[record.mig] = host.rt(record.name).started(record.name)
        kill_groups(killed)  # after marking the migration expiring: the step that wakes up must see the bound
        log.warning("freeze of %s (migration %s) passed its %g s bound; killed %s", record.name, record.mig,
                    record.bound, killed or "nothing")  # fmt: skip
    with host.lock(record.name):
        current = host.freezes.get(record.mig)
        if current is None or current.expired:
            host.freezes.expiring.pop(record.mig, None)
            return  # a rollback or confirm got here first
        if record.phase == "checkpoint" and not _fence(record, peer):
            log.warning("%s is live on the target of %s: the frozen copy here waits for confirm", record.name,
                        record.mig)  # fmt: skip
            if record.lazy:  # its missing pages come from here: watch on, past the target's own bound
                host.freezes.serve(current, serving_bound(host))
            else:
                host.freezes.forget(record.mig)
            return
        session = SourceSession.of(host, record.mig, record.name)
        session._thaw()
        session.close()
        if record.phase != "checkpoint":
            host.freezes.forget(record.mig)  # its own step failed, saying why; the migration may go on
            return
        stuck = f"; killed process group {', '.join(map(str, killed))}" if killed else ""
        host.freezes.mark_expired(record, f"frozen since {time.ctime(record.since)}, thawed by the watchdog at "
                                          f"{time.ctime()} during {record.phase}{stuck}")  # fmt: skip


def serving_bound(host: Host) -> float:
    """How long a frozen copy serving pages waits for confirm before it asks the target again: past the
    target's own bound on its lazy phase (POSTCOPY_TIMEOUT), by which it has stopped its copy or has every
    page. The drill `short-serving-bound` (the source host's faults file) makes it 3 s, for the tests."""
    return 3.0 if faults.listed(host.cfg.state_root, "short-serving-bound") else POSTCOPY_TIMEOUT + SERVING_MARGIN


def _end_serving(host: Host, record: Freeze, peer: Peer) -> None:
    """A frozen copy that served the target's pages and got no confirm by its deadline (the controller is
    gone): the target's answer decides. Its copy gone or stopped (the fence's `abort` went through: it lost
    its page source) -> thaw here, this is the only copy; still live -> stay frozen (it may still need our
    pages, or has them all and confirm must end this stale copy) and ask again later; unreachable -> stay
    frozen (its copy may be live: two live copies are worse), the watchdog asking again every tick."""
    with host.lock(record.name):
        current = host.freezes.get(record.mig)
        if current is None or current.expired or current.phase != "serving" or time.time() < current.deadline:
            return  # confirmed, rolled back or re-armed meanwhile
        if not _fence(current, peer):
            log.warning("%s is live on the target of %s, whose controller has not confirmed for %.0f s: the copy "
                        "here stays frozen (skyferry migrations resume %s ends it); asking again in %g s",
                        record.name, record.mig, time.time() - record.since, record.mig, current.bound)  # fmt: skip
            host.freezes.serve(current, current.bound)
            return
        session = SourceSession.of(host, record.mig, record.name)
        session._thaw()
        session.close()
        why = f"frozen since {time.ctime(record.since)}, serving pages; the target's copy was gone with no confirm"
        host.freezes.mark_expired(current, f"{why}, thawed by the watchdog at {time.ctime()}")
        log.warning("%s: the target's copy of migration %s was gone and nobody confirmed: thawed here",
                    record.name, record.mig)  # fmt: skip


def _fence(record: Freeze, peer: Peer) -> bool:
    """Whether the target holds no copy of the container that is, or may still become, live: True once its
    `abort` went through (TargetSession.abort, under the container's lock, so it waits for a restore in
    progress), False if it refused because the copy there is live."""
    if record.target is None:
        return True  # no target was named: nothing was sent anywhere that could be restored
    address, port = record.target.rsplit(":", 1)
    client = peer(address, int(port))
    try:
        client.call("POST", f"/v1/migrations/{record.mig}/abort", {"name": record.name})
    except SkyferryError as exc:  # unreachable included: the watchdog tries again
        if "is live on" in str(exc):  # TargetSession.abort's refusal
            return False
        if "was not prepared for it" in str(exc):
            # The target holds no binding for this migration (server.authorize): never prepared, or its
            # copy already removed (a binding goes only with the whole migration: abort, cleanup; and a
            # cleanup comes after our confirm, which ends the freeze record). Nothing there can go live.
            return True
        raise
    finally:
        client.close()
    return True


def _stop_newest_task(pid: int) -> None:
    """Fault drill `stop-task:checkpoint`: SIGSTOP the container's last task (as a workload that stops a
    child would) and wait until it is stopped, right before the pause: CRIU then hangs in ptrace_attach."""
    task = proctree.descendants(pid)[-1]
    os.kill(task, signal.SIGSTOP)
    for _ in range(200):
        if proctree.stopped([task]):
            return
        time.sleep(0.01)


def _prewarm(directory: Path, size: int) -> None:
    """Touch `size` bytes of tmpfs once before the rounds: this VM hands free pages back to its host,
    and a dump into cold tmpfs at the freeze runs 2-3x slower. (Not at the freeze: that would delay it.)"""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / ".prewarm"
    chunk = b"\0" * (1 << 20)
    with open(path, "wb") as f:
        for _ in range(size >> 20):
            f.write(chunk)
    path.unlink()


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
