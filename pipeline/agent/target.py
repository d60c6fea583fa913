"""The target side of one migration: a `TargetSession` holds everything this host keeps for it.

Steps, named as the controller's stages and the agent's operations (POST /v1/migrations/ID/STEP):
  prepare        the netns (locked inbound) and an empty bundle
  precopy-reset  a fresh page store and file applier for the source's rounds
  hold           client segments the frozen source's lock dropped, replayed at the restore; the
                 source's last request of a transfer, it may carry the restore (then the restore follows)
  restore        restore, then open the netns: from here on the copy is live (the point of no return)
  lazy           post-copy and hybrid: wait until every page has arrived; a lost page source stops the copy
  abort          undo all of the above (refused once the copy is live)
  cleanup        drop what is left
and the streams from the source (PUT /v1/migrations/ID/STREAM), each handled by the method of its name:
`receive` (stop-copy: images and payload in one tar), `precopy-round`, `precopy-final` (builds the image
on the pre-copied store), `lazy-final` (hybrid: a lazy dump and the clean map), `fs-round`.
Each step is idempotent; `close()` releases everything the session holds.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, BinaryIO

from skyferry.netplane import attach
from skyferry.pipeline.agent import metrics, netlock
from skyferry.pipeline.agent.finals import Finals
from skyferry.pipeline.agent.holdback import Holdback, inject
from skyferry.pipeline.agent.host import Host
from skyferry.pipeline.criu.breakpoints import PerfHooks
from skyferry.pipeline.criu.version import PRECOPY_CONTENT, PRECOPY_SOFT_DIRTY
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.files import wire
from skyferry.pipeline.files.applier import FsApplier
from skyferry.pipeline.hostapi import faults
from skyferry.pipeline.hostapi.layout import POSTCOPY_TIMEOUT
from skyferry.pipeline.hostapi.spec import ContainerSpec
from skyferry.pipeline.memory import hybrid, lazypages
from skyferry.pipeline.memory.lazypages import Pager
from skyferry.pipeline.memory.pages import HashTable
from skyferry.pipeline.memory.pagetunnel import Dialled, PageSource
from skyferry.pipeline.memory.predump import PredumpTarget
from skyferry.pipeline.memory.store import TargetStore
from skyferry.pipeline.runtimes.children import kill_groups
from skyferry.pipeline.runtimes.protocol import Runtime

RETRY_WAIT_S = 0.2  # before the one retry of a failed restore (see TargetSession._restore)


class TargetSession:
    def __init__(self, host: Host, mig: str, name: str) -> None:
        self.host, self.mig, self.name = host, mig, name
        self.dir = host.mig_dir(mig)
        self.store: TargetStore | None = None  # pre-copied pages (post-copy: the pages fetched)
        self.chain: PredumpTarget | None = None  # soft-dirty pre-copy: the source's pre-dumps
        self.applier: FsApplier | None = None  # pre-copied files
        self.clean_map: dict[int, HashTable] = {}  # hybrid: the pages the store holds unchanged
        self.pager: Future[Pager] | None = None  # post-copy and hybrid: started during the transfer
        self.page_source: PageSource | None = None  # post-copy and hybrid: the source's page tunnel
        self.dialled: Future[Dialled] | None = None  # its link, opened while the images arrive
        self.guard: subprocess.Popen[bytes] | None = None  # the lazy-pages guard, started ahead of its daemon
        self.holdback: Holdback | None = None  # client segments, replayed when the restore opens the netns
        self.fetching: Pager | None = None  # post-copy and hybrid: the pager, for the metrics until close
        self.restored = False  # the engine's restore went through: no more streams
        self.finals = Finals()  # the final streams, which a restore asked early waits for
        self.perf = PerfHooks()  # CRIU's breakpoints then skip an RCU grace period inside the freeze
        self.perf.hold()

    @classmethod
    def of(cls, host: Host, mig: str, name: str) -> TargetSession:
        """This host's session of migration `mig`, made on first use."""
        return host.session(host.targets, cls, mig, name)

    def prepare(self, spec: ContainerSpec) -> None:
        """The same netns and IP as on the source, locked inbound (from the cutover on, before the
        restore, traffic arrives here, and an empty netns would answer it with RSTs), and an empty bundle."""
        runtime = self.host.engine(spec)
        if self.host.state(spec.name) is not None:
            raise SkyferryError(f"a container named {spec.name!r} already runs on {self.host.cfg.name}")
        netns = self.host.netns(spec.name)
        # No host route yet: clients on this very host keep reaching the source until the cutover.
        attach.attach(netns, spec.ip, route=False, mtu=self.host.cfg.mtu)
        netlock.lock(netns, inbound_only=True)
        if self.holdback is None:
            self.holdback = Holdback(netns, spec.ip)
        runtime.prepare(spec, self.host.netns_path(spec.name))
        self.dir.mkdir(parents=True, exist_ok=True)

    def precopy_reset(self, method: str = PRECOPY_CONTENT) -> None:
        """A fresh store (content-based) or chain of pre-dumps (soft-dirty) for a new pre-copy session (an
        earlier one for this migration is dropped)."""
        payload = self.host.rt(self.name).payload(self.name)  # raises unless prepared
        if method not in (PRECOPY_CONTENT, PRECOPY_SOFT_DIRTY):
            raise SkyferryError(f"unknown pre-copy method {method!r}", hint="upgrade both agents")
        if self.store is not None:
            self.store.close()
        self.store = self.chain = None
        if method == PRECOPY_SOFT_DIRTY:
            self.chain = PredumpTarget(self.dir / "rounds")
        else:
            self.store = TargetStore(self.dir / "store")
            self._guard_ahead()  # content rounds may end lazily (hybrid)
        self.applier = FsApplier(payload)

    def hold(self, packets: list[bytes]) -> int:
        """Replay these at the restore too; once restored, deliver them now (segments that reached the
        source after its hand-over)."""
        if self.holdback is not None:
            self.holdback.add(packets)
            return len(packets)
        if self.restored:
            return inject(self.host.netns(self.name), self.host.rt(self.name).spec(self.name).ip, packets)
        raise SkyferryError(f"migration {self.mig}: not prepared on {self.host.cfg.name}")

    # --- streams from the source -----------------------------------------------------------------

    def refuse_if_restored(self) -> None:
        """No stream goes into a copy restored here: a repeated transfer would write into its rootfs. (The
        controller asks before it repeats one: this covers a source that sends again on its own.)"""
        if self.restored:
            raise SkyferryError(f"{self.name!r} is already restored on {self.host.cfg.name}: no more streams",
                                hint="finish the migration: skyferry migrations resume ID")  # fmt: skip

    def receive(self, body: BinaryIO, page_source: PageSource | None) -> dict[str, Any]:
        """Stop-copy: the whole CRIU image and the payload (rootfs, volumes) in one stream."""
        dirs = dict(self.host.rt(self.name).payload(self.name))  # raises unless prepared
        images = self.dir / "images"
        wire.wipe(images)
        if page_source:
            self._prepare_pager(page_source)
        stats = wire.StreamStats()
        wire.decode(body, {"images": images, **dirs}, stats)
        if page_source:
            self._start_pager(page_source)
        return {"bytes_wire": stats.bytes_wire, "sha256": stats.sha256}

    def precopy_round(self, body: BinaryIO) -> dict[str, Any]:
        if self.chain is not None:
            return self.chain.apply(_chunks(body)).as_dict()
        return self._the_store().apply(_chunks(body)).as_dict()

    def precopy_final(self, body: BinaryIO) -> dict[str, Any]:
        """The final delta: builds the restorable image, whose `parent` is the store (content-based) or
        the last pre-dump (soft-dirty)."""
        images = self.dir / "images"
        wire.wipe(images)
        if self.chain is not None:
            return self.chain.build_image(_chunks(body), images).as_dict()
        return self._the_store().build_image(_chunks(body), images).as_dict()

    def lazy_final(self, body: BinaryIO, page_source: PageSource | None) -> dict[str, Any]:
        """Hybrid: the lazy dump's files and the clean map, checked against the store."""
        images = self.dir / "images"
        wire.wipe(images)
        if page_source:
            self._prepare_pager(page_source)
        stats, self.clean_map = hybrid.accept_lazy_final(self._the_store(), _chunks(body), images)
        if page_source:
            self._start_pager(page_source)
        return stats.as_dict()

    def fs_round(self, body: BinaryIO) -> dict[str, Any]:
        if self.applier is None:
            raise SkyferryError(
                f"migration {self.mig}: no file-system rounds on {self.host.cfg.name} (agent restarted?)"
            )
        return self.applier.apply(body).as_dict()

    def _the_store(self) -> TargetStore:
        if self.store is None:
            raise SkyferryError(f"migration {self.mig}: no pre-copy store on {self.host.cfg.name} (agent restarted?)",
                                hint="the migration rolls back; run it again")  # fmt: skip
        return self.store

    # --- the freeze ends here ----------------------------------------------------------------------

    def restore(self, lazy: bool = False, deadline: float | None = None) -> dict[str, Any]:
        """Restore, then open the netns: from here on the container is live on this host.

        CRIU resumes the tasks only once the whole restore succeeded, so a failed restore never ran the
        copy and rolling back stays safe. The netns opens right after, so the restored process's first
        replies go out instead of being dropped (which would make its sockets back off for seconds).

        `lazy` (post-copy, hybrid): restore without the pages the source still serves, through the page
        source the transfer named. A marker (`lazy_marker`) says the copy depends on it until `lazy`
        has seen every page arrive, and the guard holds the copy's uffds (pipeline/memory/lazyguard.py).

        `deadline` (wall clock) is the source's freeze bound: a restore does not start after it, and one
        still running then is killed, so the source's watchdog, which fences this host with `abort` before
        it thaws the source, never waits on a restore for long.
        """
        page_source = self.page_source if lazy else None
        if lazy and page_source is None:
            raise SkyferryError(f"migration {self.mig}: no page source on {self.host.cfg.name} (agent restarted?)",
                                hint="the migration rolls back; run it again")  # fmt: skip
        runtime = self.host.rt(self.name)
        state = runtime.state(self.name)
        t0 = time.monotonic()
        if state is None or state["status"] != "running":
            with _bounded(runtime, self.name, self.mig, deadline):
                t_pager = self._restore(runtime, page_source, t0, deadline)
        self.restored = True
        restored = time.monotonic()
        netlock.unlock(self.host.netns(self.name))
        holdback, self.holdback = self.holdback, None
        replayed = holdback.replay() if holdback else 0
        timings = {"restore_s": restored - t0, "unlock_s": time.monotonic() - restored}
        if page_source and state is None:
            timings["pager_wait_s"] = t_pager - t0
        return {**timings, "replayed": replayed}

    def _restore(self, runtime: Runtime, page_source: PageSource | None, t0: float, deadline: float | None) -> float:
        """Run the engine's restore (lazily through `page_source`); when the pager was ready (monotonic).
        No retry starts past `deadline`: the source's watchdog fences this host then, and its `abort` waits
        for this restore, so a late retry would stretch the freeze past its bound."""
        t_pager = t0
        # Right after a failed attempt CRIU can hit "Can't fork for PID: File exists" until the old PID is
        # reaped; one retry after a short wait covers it. Not after a lazy restore: the source's page server
        # serves one client, and that was the first attempt's.
        attempts = (1,) if page_source else (1, 2)
        faults.act(self.host.cfg.state_root, "stop-engine:restore", lambda: _stop_when_started(runtime, self.name))
        for attempt in attempts:
            try:
                images, work = self.dir / "images", self.dir / f"work{attempt}"
                if page_source:
                    pager = self._ready_pager(page_source, work)
                    t_pager = time.monotonic()
                    self._lazy_marker().parent.mkdir(mode=0o700, exist_ok=True)
                    self._lazy_marker().write_text(self.mig)
                    with _unstick(pager, work):
                        runtime.restore_lazy(self.name, images, work)
                    _guard(pager, runtime.kill_argv(self.name))
                    pager.proxy.held = functools.partial(faults.listed, self.host.cfg.state_root, "hold-pages")
                else:
                    runtime.restore(self.name, images, work)
                break
            except SkyferryError:
                self._stop_pager()
                if (
                    attempt == attempts[-1]
                    or runtime.state(self.name) is not None
                    or (deadline is not None and time.time() + RETRY_WAIT_S >= deadline)
                ):
                    raise
                time.sleep(RETRY_WAIT_S)
        return t_pager

    def abort(self) -> None:
        """Undo prepare/receive/restore: nothing of the container stays on the target. Refused once the
        copy here is live (running, netns open): it may have talked, so the source's copy is stale."""
        state = self.host.state(self.name)
        if state is not None and state["status"] == "running" and not netlock.is_locked(self.host.netns(self.name)):
            raise SkyferryError(
                f"{self.name!r} is live on {self.host.cfg.name}; the older source copy must not come back",
                hint="finish the migration instead: skyferry migrations resume ID",
            )
        self.host.remove_if_present(self.name)
        self._lazy_marker().unlink(missing_ok=True)
        self.close()

    def lazy(self) -> dict[str, Any]:
        """After a lazy restore: wait until every page has arrived, then the proxy's stats. If the page
        source was lost first, the copy here has been stopped (by the guard, or by `stop_unfinished_lazy`
        when this agent restarted) and the answer says so in "lost": the controller then rolls back to the
        frozen source, which still holds every page."""
        early, self.pager = self.pager, None
        pager = _started(early) if early is not None else None
        marker = self._lazy_marker()
        if pager is None:
            if marker.exists():  # restored lazily, and this agent lost the pager before the end
                state = self.host.state(self.name)
                return {"lost": f"{self.host.cfg.name} lost the lazy phase of {self.name!r} (agent restarted); "
                                f"the copy here was stopped ({(state or {}).get('status', 'gone')})"}  # fmt: skip
            return {}  # finished earlier: a resumed controller asks again
        rc, stats = pager.finish(POSTCOPY_TIMEOUT)
        if rc != 0:
            why = f": {stats['error']}" if stats.get("error") else ""
            return {
                **stats,
                "lost": f"the lazy-pages daemon on {self.host.cfg.name} ended before every page arrived "
                f"({'timeout' if rc is None else f'exit {rc}'}){why}; its guard stopped the copy",
            }
        marker.unlink(missing_ok=True)
        return stats

    def pages_outstanding(self) -> int | None:
        """Pages the lazily restored copy still has to fetch from the source (None before a pager)."""
        pager = self.fetching
        return pager.proxy.outstanding if pager is not None else None

    def cleanup(self) -> dict[str, Any]:
        """Drop what the migration left here (after `lazy`, in post-copy and hybrid)."""
        self.close()
        return {}

    def close(self) -> None:
        """Release everything the migration holds here (idempotent) and leave the host's registry."""
        self._stop_pager()
        self.fetching = None
        self.clean_map = {}
        if self.store is not None:
            self.store.close()
            self.store = None
        if self.holdback is not None:
            self.holdback.close()
            self.holdback = None
        self.applier = self.chain = None
        self.perf.release()
        self.host.wipe(self.mig)
        if self.host.targets.get(self.mig) is self:
            del self.host.targets[self.mig]

    # --- the lazy-pages pager (post-copy and hybrid) -----------------------------------------------

    def _lazy_marker(self) -> Path:
        return lazy_marker(self.host, self.name)

    def _prepare_pager(self, page_source: PageSource) -> None:
        """While the images still arrive, open the link to the source's page tunnel (its TCP and TLS
        handshakes: two WAN round trips) and, unless the content rounds started it, the lazy-pages guard
        (a Python start-up): both were waited for inside the freeze."""
        if self.dialled is None:
            self.dialled = page_source.dial_soon()
        self._guard_ahead()

    def _guard_ahead(self) -> None:
        """The lazy-pages guard of the first pager, started before it is needed (a Python start-up)."""
        if self.guard is None:
            self.guard = lazypages.spawn_guard(self.dir / "work1")

    def _start_pager(self, page_source: PageSource) -> None:
        """Start the page-server proxy and CRIU's lazy-pages daemon as soon as the images are here
        (during the transfer), so that the restore inside the freeze only restores."""
        self.page_source = page_source
        if self.pager is None:
            self.pager = self.host.pool.submit(self._new_pager, page_source, self.dir / "work1")

    def _ready_pager(self, page_source: PageSource, work: Path) -> Pager:
        """A running pager for a restore in `work`: the one started early if it came up there, else a new one."""
        if self.pager is not None:
            pager = _started(self.pager)
            if pager is not None and pager.alive() and pager.work == work:
                return pager
            self._stop_pager()
        pager = self._new_pager(page_source, work)
        ready: Future[Pager] = Future()
        ready.set_result(pager)
        self.pager = ready
        return pager

    def _new_pager(self, page_source: PageSource, work: Path) -> Pager:
        """Clean pages (hybrid's map; none in post-copy) from the store, the rest prefetched from the
        source's page server, so the daemon never waits a WAN round trip per fault (see lazyproxy.py)."""
        if self.store is None:  # post-copy: the proxy keeps what it fetches in a fresh store
            self.store = TargetStore(self.dir / "store")
        images = self.dir / "images"
        # The early link and guard go to the first pager only: the source's tunnel serves one link.
        early, self.dialled, guard, self.guard = self.dialled, None, self.guard, None
        if guard is not None and guard.poll() is not None:  # it died meanwhile: the pager starts its own
            lazypages.end_guard(guard)
            guard = None
        try:
            pager = Pager(self.store, self.clean_map, images, early.result if early else page_source.dial, work, guard)
        except BaseException:
            if early is not None:  # the pager may have failed before it took the link
                early.add_done_callback(_close_link)
            raise
        self.fetching = pager
        pager.proxy.on_wait = metrics.page_wait
        return pager

    def _stop_pager(self) -> None:
        dialled, self.dialled, guard, self.guard = self.dialled, None, self.guard, None  # no pager took them
        if dialled is not None:
            dialled.add_done_callback(_close_link)
        if guard is not None:
            lazypages.end_guard(guard)
        early, self.pager = self.pager, None
        pager = _started(early) if early is not None else None  # let it finish starting before stopping it
        if pager is not None:
            pager.stop()


def _stop_when_started(runtime: Runtime, name: str) -> None:
    """Fault drill `stop-engine:restore`: SIGSTOP the engine's restore (runc and the CRIU it runs) as soon
    as it starts, as a runc or CRIU that hangs would; only the freeze bound ends it."""

    def stop() -> None:
        for _ in range(5000):  # about 10 s
            groups = runtime.started(name)
            for pgid in groups:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGSTOP)
            if groups:
                return
            time.sleep(0.002)

    threading.Thread(target=stop, name="stop-engine", daemon=True).start()


@contextlib.contextmanager
def _bounded(runtime: Runtime, name: str, mig: str, deadline: float | None) -> Iterator[None]:
    """Run the block (a restore) only before `deadline`, and kill the engine processes it waits on if it
    is still running then; a restore cut short raises an error that names the bound."""
    if deadline is None:
        yield
        return
    if time.time() >= deadline:
        raise SkyferryError(
            f"migration {mig}: the freeze bound was hit before the restore began; the source thaws {name!r}",
            hint="the migration rolls back; a longer bound: skyferry migrate --freeze-timeout SECONDS",
        )
    killed: list[int] = []

    def expire() -> None:
        killed.extend(runtime.started(name))
        kill_groups(killed)

    timer = threading.Timer(deadline - time.time(), expire)
    timer.start()
    try:
        yield
    except SkyferryError as exc:
        if killed:
            raise SkyferryError(
                f"migration {mig}: the freeze bound was hit during the restore: killed the restore (process "
                f"group {', '.join(map(str, killed))}); the source thaws {name!r}",
                hint="the migration rolls back; what hung is in the CRIU restore log (skyferry migrations show ID)",
                log=exc.log,
            ) from exc
        raise
    finally:
        timer.cancel()


def lazy_marker(host: Host, name: str) -> Path:
    """Present from a lazy restore of `name` until every page has arrived: the copy depends on its pager.
    In the host's state root, which outlives the agent (and its images tmpfs)."""
    return host.cfg.state_root / "lazy" / name


def stop_unfinished_lazy(host: Host) -> list[str]:
    """Kill every container here restored lazily whose lazy phase never finished: its pager died with an
    earlier agent, so the pages it never got would read as zeros. Run when an agent starts, before it stops
    stray daemons and before it serves. The marker stays (now "lost") until the controller's rollback
    aborts the migration here; the source still holds the frozen original."""
    stopped = []
    for marker in sorted((host.cfg.state_root / "lazy").glob("*")):
        name = marker.name
        state = host.state(name)
        if state is not None and state["status"] in ("running", "paused", "created"):
            runtime = host.rt(name)
            subprocess.run(runtime.kill_argv(name), stdin=subprocess.DEVNULL, capture_output=True, check=False)
            stopped.append(name)
        mig = (marker.read_text().split() or ["?"])[0]
        marker.write_text(f"{mig} lost\n")
    return stopped


@contextlib.contextmanager
def _unstick(pager: Pager, work: Path) -> Iterator[None]:
    """While a lazy restore in `work` runs: if the lazy-pages daemon dies first, kill the CRIU restore. CRIU
    then gives up on the restore but waits for the tasks it killed, which are runc's children, while
    runc waits for CRIU: the restore would never return (seen here with CRIU 4.2.1 and runc 1.1.5)."""
    done = threading.Event()
    killed: list[int] = []

    def watch() -> None:
        while not done.wait(0.05):
            if not pager.alive():
                killed.extend(lazypages.stop_restore(work))
                return

    watcher = threading.Thread(target=watch, daemon=True, name="unstick")
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()
        if killed:
            lazypages.unmount_under(work)


def _guard(pager: Pager, kill: list[str]) -> None:
    """Hand the lazily restored copy to its pager's guard; a copy nobody guards must not run on."""
    try:
        pager.guard(kill)
    except SkyferryError:
        subprocess.run(kill, stdin=subprocess.DEVNULL, capture_output=True, check=False)
        raise


def _close_link(dialled: Future[Dialled]) -> None:
    if dialled.exception() is None:
        dialled.result().close()


def _started(future: Future[Pager]) -> Pager | None:
    """The pager once it has started; None if starting it failed (the restore then starts another)."""
    try:
        return future.result()
    except SkyferryError:
        return None


def _chunks(body: BinaryIO) -> Iterator[bytes]:
    return iter(lambda: body.read(wire.CHUNK), b"")
