"""What an agent does on its own host: containers, and each side of a migration.

Every method is idempotent, so a controller that crashed and resumed can call it again. Checkpoint
images live on tmpfs only (they hold every secret in the container's memory) and are wiped when the
migration ends either way.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from skyferry.netplane import attach
from skyferry.pipeline.agent import netlock
from skyferry.pipeline.agent.holdback import Holdback
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.files import wire
from skyferry.pipeline.files.fsync import FsApplier, FsStats, FsTracker
from skyferry.pipeline.hostapi import faults
from skyferry.pipeline.hostapi.layout import IMAGES_TMPFS, page_server
from skyferry.pipeline.hostapi.spec import ContainerSpec
from skyferry.pipeline.memory import hybrid
from skyferry.pipeline.memory.lazypages import Pager
from skyferry.pipeline.memory.policy import ConvergencePolicy
from skyferry.pipeline.memory.precopy import HashTable, SourceEngine, TargetStore
from skyferry.pipeline.runtimes.protocol import Runtime, runtimes

POSTCOPY_TIMEOUT = 900.0  # seconds for the target to fetch every page


@dataclass(frozen=True)
class HostConfig:
    name: str
    mesh: str
    state_root: Path
    overlay_ip: str
    mtu: int = 1420


class HostOps:
    def __init__(self, cfg: HostConfig) -> None:
        self.cfg = cfg
        self.runtimes = runtimes(cfg.state_root, f"/skyferry/{cfg.mesh}/{cfg.name}")
        self.images_root = IMAGES_TMPFS / cfg.mesh / cfg.name
        self.engines: dict[str, SourceEngine] = {}  # pre-copy, source side, by migration
        self.trackers: dict[str, FsTracker] = {}  # file-system rounds, source side, by migration
        self.appliers: dict[str, FsApplier] = {}  # file-system rounds, target side, by migration
        self.stores: dict[str, TargetStore] = {}  # pre-copy, target side, by migration
        self.lazy_dumps: dict[str, subprocess.Popen[bytes]] = {}  # post-copy page servers (source side)
        self.freeze_scans: dict[str, hybrid.FreezeScan] = {}  # hybrid, source side: what the target holds, and more
        self.clean_maps: dict[str, dict[int, HashTable]] = {}  # hybrid, target side: the same, checked
        self.pagers: dict[str, Future[Pager]] = {}  # post-copy and hybrid, target side: started during the transfer
        self._pool = ThreadPoolExecutor(4, thread_name_prefix="pager")
        self.holdbacks: dict[str, Holdback] = {}  # target side: replayed when the restore opens the netns
        self.source_holdbacks: dict[str, Holdback] = {}  # source side: replayed if a rollback thaws it
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def lock(self, name: str) -> threading.Lock:
        """One operation at a time per container."""
        with self._guard:
            return self._locks.setdefault(name, threading.Lock())

    def rt(self, name: str) -> Runtime:
        """The engine that holds container `name` on this host."""
        for runtime in self.runtimes.values():
            if runtime.owns(name):
                return runtime
        raise SkyferryError(f"no container named {name!r} on {self.cfg.name}")

    def engine(self, spec: ContainerSpec) -> Runtime:
        if spec.runtime not in self.runtimes:
            raise SkyferryError(
                f"{self.cfg.name} has no {spec.runtime} runtime", hint=f"available: {', '.join(self.runtimes)}"
            )
        return self.runtimes[spec.runtime]

    def _state(self, name: str) -> dict[str, Any] | None:
        """The engine's view of `name`, or None when no engine here has it."""
        for runtime in self.runtimes.values():
            if runtime.owns(name):
                return runtime.state(name)
        return None

    def netns(self, name: str) -> str:
        return f"{self.cfg.mesh}-{self.cfg.name}-{name}"

    def netns_path(self, name: str) -> str:
        return f"/run/netns/{self.netns(name)}"

    def mig_dir(self, mig: str) -> Path:
        return self.images_root / mig

    def _wipe(self, mig: str) -> None:
        """Remove a migration's images (they hold the container's memory), keeping CRIU's logs, which do
        not, in <state_root>/logs/<mig>/ for whoever investigates a failure."""
        src = self.mig_dir(mig)
        for log in src.glob("work*/*.log"):
            dest = self.cfg.state_root / "logs" / mig / f"{log.parent.name}-{log.name}"
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(log, dest)
        wire.wipe(src)

    # --- containers ------------------------------------------------------------------------------

    def run(self, spec: ContainerSpec) -> dict[str, Any]:
        runtime = self.engine(spec)
        state = self._state(spec.name)
        if state is not None:
            if state["status"] in ("running", "paused"):
                return self.info(spec.name)  # already there: idempotent
            self.rt(spec.name).remove(spec.name)
        attach.attach(self.netns(spec.name), spec.ip, mtu=self.cfg.mtu)
        try:
            runtime.run(spec, self.netns_path(spec.name))
        except Exception:
            attach.detach(self.netns(spec.name))
            raise
        return self.info(spec.name)

    def info(self, name: str) -> dict[str, Any]:
        runtime = self.rt(name)
        spec = runtime.spec(name)
        state = runtime.state(name) or {}
        return {
            "name": name,
            "host": self.cfg.name,
            "ip": spec.ip,
            "args": spec.args,
            "runtime": runtime.name,
            "state": state.get("status", "stopped"),
            "pid": state.get("pid") or None,
            "frozen_for_migration": netlock.is_locked(self.netns(name)) if state else False,
        }

    def list(self) -> list[dict[str, Any]]:
        return [self.info(name) for runtime in self.runtimes.values() for name in runtime.names()]

    def logs(self, name: str) -> bytes:
        return self.rt(name).logs(name)

    def remove(self, name: str) -> None:
        self.rt(name).remove(name)
        attach.detach(self.netns(name))

    # --- source side of a migration --------------------------------------------------------------

    def checkpoint(self, mig: str, name: str, lazy: bool = False) -> dict[str, Any]:
        """Freeze, silence and dump the container; it stays frozen here until confirm or rollback.
        With `lazy` (post-copy) the pages stay in the frozen processes, served by a CRIU page server
        on this host's overlay address until the target has fetched them all. After pre-copy rounds
        (hybrid), the frozen memory is also scanned, alongside the dump, for the pages the target
        holds unchanged: the target takes those from its store and only the rest from the page server."""
        runtime = self.rt(name)
        state = runtime.state(name)
        if state is None or state["status"] not in ("running", "paused"):
            raise SkyferryError(f"container {name!r} is not running on {self.cfg.name}")
        images = self.mig_dir(mig) / "images"
        t0 = time.monotonic()
        if state["status"] == "running":
            runtime.pause(name)
        netlock.lock(self.netns(name))
        if mig not in self.source_holdbacks:  # replayed if the migration rolls back and we thaw
            self.source_holdbacks[mig] = Holdback(self.netns(name), runtime.spec(name).ip)
        t_frozen = time.monotonic()
        wire.wipe(images)  # a retried checkpoint starts clean
        if lazy:
            self._stop_lazy_dump(mig, name)
            engine = self.engines.get(mig)
            with ThreadPoolExecutor(1) as pool:  # the scan reads memory while CRIU dumps the rest
                scan = pool.submit(hybrid.freeze_scan, engine) if engine else None
                work = self.mig_dir(mig) / "work"
                self.lazy_dumps[mig] = runtime.checkpoint_lazy(name, images, work, self.page_server(mig))
                if scan is not None:
                    self.freeze_scans[mig] = scan.result()
        else:
            runtime.checkpoint(name, images, self.mig_dir(mig) / "work")
        return {"pause_s": t_frozen - t0, "dump_s": time.monotonic() - t_frozen, "image_bytes": _du(images)}

    def page_server(self, mig: str) -> str:
        return page_server(mig, self.cfg.overlay_ip)

    def _stop_lazy_dump(self, mig: str, name: str) -> None:
        """End a post-copy page server (and the CRIU dump it belongs to). The frozen tasks it held stay
        frozen in their cgroup, so a rollback can still thaw them."""
        proc = self.lazy_dumps.pop(mig, None)
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            netlock.clear_criu_lock(self.netns(name))

    def held_segments(self, mig: str) -> list[bytes]:
        """What the frozen source's lock has dropped so far (clients waiting on their back-off)."""
        holdback = self.source_holdbacks.get(mig)
        return holdback.snapshot() if holdback else []

    def hold(self, mig: str, packets: list[bytes]) -> int:
        """Target side: replay these at the restore too."""
        holdback = self.holdbacks.get(mig)
        if holdback is None:
            raise SkyferryError(f"migration {mig}: not prepared on {self.cfg.name}")
        holdback.add(packets)
        return len(packets)

    def stream_out(self, mig: str, name: str, stats: wire.StreamStats) -> Iterator[bytes]:
        images = self.mig_dir(mig) / "images"
        if not images.exists():
            raise SkyferryError(f"migration {mig}: no checkpoint of {name!r} on {self.cfg.name}")
        return wire.encode({"images": images, **self.rt(name).payload(name)}, stats)

    def precopy(
        self,
        mig: str,
        name: str,
        send: Callable[[Iterable[bytes]], Any],
        send_fs: Callable[[Iterable[bytes]], Any],
        policy: ConvergencePolicy,
    ) -> dict[str, Any]:
        """Rounds while the container runs, until the policy stops them: memory (`send`) and then the
        files of its rootfs and volumes (`send_fs`). A repeated call starts a fresh session (the target
        resets)."""
        runtime = self.rt(name)
        state = runtime.state(name)
        if state is None or state["status"] != "running":
            raise SkyferryError(f"container {name!r} is not running on {self.cfg.name}")
        engine = self.engines[mig] = SourceEngine(int(state["pid"]))
        tracker = self.trackers[mig] = FsTracker(runtime.payload(name))
        _prewarm(self.mig_dir(mig) / "images", _tree_rss(int(state["pid"])))
        fs_rounds = []
        while True:
            send(engine.round())
            fs = FsStats()
            send_fs(tracker.round(fs))
            fs_rounds.append(fs.as_dict())
            decision = policy.decide(engine.history)
            if decision.stop:
                break
        return {
            "rounds": [r.as_dict() for r in engine.history],
            "fs_rounds": fs_rounds,
            "stop": decision.reason,
            "why": decision.detail,
        }

    def fs_final_out(self, mig: str, name: str, stats: FsStats) -> Iterator[bytes] | None:
        """The files changed since the last round, read while the container is frozen (None without
        rounds: then the payload travels whole)."""
        tracker = self.trackers.get(mig)
        if tracker is None:
            return None
        state = self.rt(name).state(name) or {}
        pids = _tree(int(state["pid"])) if state.get("pid") else []
        return tracker.final(stats, pids=pids)

    def final_out(self, mig: str, name: str) -> tuple[str, Iterable[bytes], Any] | None:
        """The pre-copy final delta from the checkpoint, and the stream it goes to: the pages the target
        lacks ("precopy-final"), or after a lazy dump the clean map ("lazy-final"). None without
        pre-copy rounds: then everything travels."""
        engine = self.engines.get(mig)
        if engine is None:
            return None
        images = self.mig_dir(mig) / "images"
        if mig in self.freeze_scans:
            transfer = hybrid.lazy_final(engine, images, self.freeze_scans[mig])
            return "lazy-final", transfer, transfer.stats
        transfer = engine.final(images)
        return "precopy-final", transfer, transfer.stats

    def rollback_source(self, mig: str, name: str) -> dict[str, Any]:
        """Resume the frozen source: unlock its network, thaw it. Safe to call at any point before confirm."""
        state = self._state(name)
        if state is None:
            raise SkyferryError(f"container {name!r} is gone from {self.cfg.name}; cannot resume it here")
        self._stop_lazy_dump(mig, name)
        netlock.unlock(self.netns(name))
        if state["status"] == "paused":
            self.rt(name).resume(name)
        # Clients whose packets the lock dropped have backed off; hand them to the thawed container now.
        holdback = self.source_holdbacks.pop(mig, None)
        replayed = holdback.replay() if holdback else 0
        self.engines.pop(mig, None)
        self.trackers.pop(mig, None)
        self.freeze_scans.pop(mig, None)
        self._wipe(mig)
        return {**self.info(name), "replayed": replayed}

    def confirm_source(self, mig: str, name: str) -> dict[str, Any]:
        """The target runs and is routed: end the frozen copy and everything it held here. After a
        post-copy restore, first wait until the target has fetched every page from our page server."""
        waited = 0.0
        proc = self.lazy_dumps.get(mig)
        if proc is not None:
            faults.act(self.cfg.state_root, "lose-page-server", lambda: os.killpg(proc.pid, signal.SIGKILL))
            t0 = time.monotonic()
            try:
                rc = proc.wait(timeout=POSTCOPY_TIMEOUT)
            except subprocess.TimeoutExpired:
                rc = None
            waited = time.monotonic() - t0
            self.lazy_dumps.pop(mig, None)
            if rc != 0:
                self._stop_lazy_dump(mig, name)
                raise SkyferryError(
                    f"post-copy of {name!r}: the source's page server ended before the target had every page "
                    f"({'timeout' if rc is None else f'exit {rc}'})",
                    hint=f"the copy on the target is missing memory and cannot continue; see {self.mig_dir(mig)}",
                )
        for runtime in self.runtimes.values():
            if runtime.owns(name):
                runtime.remove(name)
        attach.detach(self.netns(name))
        self.engines.pop(mig, None)
        self.trackers.pop(mig, None)
        self.freeze_scans.pop(mig, None)
        holdback = self.source_holdbacks.pop(mig, None)
        if holdback is not None:
            holdback.close()
        self._wipe(mig)
        return {"postcopy_s": waited}

    # --- target side of a migration --------------------------------------------------------------

    def prepare(self, mig: str, spec: ContainerSpec) -> None:
        """The same netns and IP as on the source, locked inbound (from the cutover on, before the
        restore, traffic arrives here, and an empty netns would answer it with RSTs), and an empty bundle."""
        runtime = self.engine(spec)
        if self._state(spec.name) is not None:
            raise SkyferryError(f"a container named {spec.name!r} already runs on {self.cfg.name}")
        # No host route yet: clients on this very host keep reaching the source until the cutover.
        attach.attach(self.netns(spec.name), spec.ip, route=False, mtu=self.cfg.mtu)
        netlock.lock(self.netns(spec.name), inbound_only=True)
        if mig not in self.holdbacks:
            self.holdbacks[mig] = Holdback(self.netns(spec.name), spec.ip)
        runtime.prepare(spec, self.netns_path(spec.name))
        self.mig_dir(mig).mkdir(parents=True, exist_ok=True)

    def receive(self, mig: str, name: str, body: BinaryIO) -> wire.StreamStats:
        """Stop-copy: the whole CRIU image and the payload (rootfs, volumes) in one stream."""
        dirs = dict(self.rt(name).payload(name))  # raises unless prepared
        images = self.mig_dir(mig) / "images"
        wire.wipe(images)
        stats = wire.StreamStats()
        wire.decode(body, {"images": images, **dirs}, stats)
        return stats

    def precopy_reset(self, mig: str, name: str) -> None:
        """A fresh store for a new pre-copy session (an earlier one for this migration is dropped)."""
        self.rt(name).payload(name)  # prepared?
        old = self.stores.pop(mig, None)
        if old is not None:
            old.close()
        self.stores[mig] = TargetStore(self.mig_dir(mig) / "store")
        self.appliers[mig] = FsApplier(self.rt(name).payload(name))

    def precopy_apply(self, mig: str, body: BinaryIO) -> dict[str, Any]:
        store = self._store(mig)
        return store.apply(iter(lambda: body.read(wire.CHUNK), b"")).as_dict()

    def fs_apply(self, mig: str, body: BinaryIO) -> dict[str, Any]:
        applier = self.appliers.get(mig)
        if applier is None:
            raise SkyferryError(f"migration {mig}: no file-system rounds on {self.cfg.name} (agent restarted?)")
        return applier.apply(body).as_dict()

    def precopy_build(self, mig: str, body: BinaryIO) -> dict[str, Any]:
        """The final delta: builds the restorable image, whose `parent` is the store."""
        images = self.mig_dir(mig) / "images"
        wire.wipe(images)
        return self._store(mig).build_image(iter(lambda: body.read(wire.CHUNK), b""), images).as_dict()

    def lazy_final_accept(self, mig: str, body: BinaryIO) -> dict[str, Any]:
        """Hybrid: the lazy dump's files and the clean map, checked against the store."""
        images = self.mig_dir(mig) / "images"
        wire.wipe(images)
        stats, self.clean_maps[mig] = hybrid.accept_lazy_final(
            self._store(mig), iter(lambda: body.read(wire.CHUNK), b""), images
        )
        return stats.as_dict()

    def _store(self, mig: str) -> TargetStore:
        if mig not in self.stores:
            raise SkyferryError(f"migration {mig}: no pre-copy store on {self.cfg.name} (agent restarted?)",
                                hint="the migration rolls back; run it again")  # fmt: skip
        return self.stores[mig]

    def restore(self, mig: str, name: str, page_server: str | None = None) -> dict[str, Any]:
        """Restore, then open the netns: from here on the container is live on this host.

        CRIU resumes the tasks only once the whole restore succeeded, so a failed restore never ran the
        copy and rolling back stays safe. The netns opens right after, so the restored process's first
        replies go out instead of being dropped (which would make its sockets back off for seconds).
        """
        runtime = self.rt(name)
        state = runtime.state(name)
        t0 = time.monotonic()
        if state is None or state["status"] != "running":
            # Right after a failed attempt CRIU can hit "Can't fork for PID: File exists" until the old
            # PID is reaped; one retry after a short wait covers it.
            for attempt in (1, 2):
                try:
                    images, work = self.mig_dir(mig) / "images", self.mig_dir(mig) / f"work{attempt}"
                    if page_server:
                        self._ready_pager(mig, page_server, work)
                        t_pager = time.monotonic()
                        runtime.restore_lazy(name, images, work)
                    else:
                        runtime.restore(name, images, work)
                    break
                except SkyferryError:
                    self._stop_pager(mig)
                    if attempt == 2 or runtime.state(name) is not None:
                        raise
                    time.sleep(0.2)
        restored = time.monotonic()
        netlock.unlock(self.netns(name))
        holdback = self.holdbacks.pop(mig, None)
        replayed = holdback.replay() if holdback else 0
        timings = {"restore_s": restored - t0, "unlock_s": time.monotonic() - restored}
        if page_server and state is None:
            timings["pager_wait_s"] = t_pager - t0
        return {**timings, "replayed": replayed}

    def start_pager(self, mig: str, page_server: str) -> None:
        """Start the page-server proxy and CRIU's lazy-pages daemon as soon as the images are here
        (during the transfer), so that the restore inside the freeze only restores."""
        if mig not in self.pagers:
            self.pagers[mig] = self._pool.submit(self._new_pager, mig, page_server, self.mig_dir(mig) / "work1")

    def _ready_pager(self, mig: str, page_server: str, work: Path) -> None:
        """A running pager for a restore in `work`: the one started early if it came up there, else a new one."""
        early = self.pagers.get(mig)
        if early is not None:
            pager = _started(early)
            if pager is not None and pager.alive() and pager.work == work:
                return
            self._stop_pager(mig)
        ready: Future[Pager] = Future()
        ready.set_result(self._new_pager(mig, page_server, work))
        self.pagers[mig] = ready

    def _new_pager(self, mig: str, page_server: str, work: Path) -> Pager:
        """Clean pages (hybrid's map; none in post-copy) from the store, the rest prefetched from the
        source's page server, so the daemon never waits a WAN round trip per fault (see lazyproxy.py)."""
        if mig not in self.stores:  # post-copy: the proxy keeps what it fetches in a fresh store
            self.stores[mig] = TargetStore(self.mig_dir(mig) / "store")
        clean = self.clean_maps.get(mig, {})
        images = self.mig_dir(mig) / "images"
        return Pager(self._store(mig), clean, images, page_server, self.cfg.overlay_ip, work)

    def _stop_pager(self, mig: str) -> dict[str, Any]:
        early = self.pagers.pop(mig, None)
        pager = _started(early) if early is not None else None  # let it finish starting before stopping it
        return pager.stop() if pager is not None else {}

    def set_route(self, name: str, present: bool) -> None:
        """This host's /32 route to the container's netns (the cutover adds it on the target). Removing
        it is a no-op once the container is gone (a rollback may have removed it already)."""
        if not present and not any(r.owns(name) for r in self.runtimes.values()):
            return
        attach.set_route(self.netns(name), self.rt(name).spec(name).ip, present)

    def abort_target(self, mig: str, name: str) -> None:
        """Undo prepare/receive/restore: nothing of the container stays on the target. Refused once the
        copy here is live (running, netns open): it may have talked, so the source's copy is stale."""
        state = self._state(name)
        if state is not None and state["status"] == "running" and not netlock.is_locked(self.netns(name)):
            raise SkyferryError(
                f"{name!r} is live on {self.cfg.name}; the older source copy must not come back",
                hint="finish the migration instead: skyferry migrations resume ID",
            )
        for runtime in self.runtimes.values():
            if runtime.owns(name):
                runtime.remove(name)
        attach.detach(self.netns(name))
        self._drop_store(mig)
        self._wipe(mig)

    def finish_target(self, mig: str) -> dict[str, Any]:
        """Drop what the migration left here; after a post-copy restore, once every page has arrived."""
        early = self.pagers.pop(mig, None)
        pager = _started(early) if early is not None else None
        rc, lazy = pager.finish(POSTCOPY_TIMEOUT) if pager is not None else (0, {})
        self._drop_store(mig)
        self._wipe(mig)
        if rc != 0:
            why = f": {lazy['error']}" if lazy.get("error") else ""
            raise SkyferryError(
                f"post-copy: the lazy-pages daemon ended before every page arrived ({rc=}){why}; the restored "
                "copy faults on the pages it never got",
                hint="post-copy cannot survive losing the source; see the restore logs in the host's logs/",
            )
        return lazy

    def _drop_store(self, mig: str) -> None:
        self._stop_pager(mig)
        self.clean_maps.pop(mig, None)
        store = self.stores.pop(mig, None)
        if store is not None:
            store.close()
        holdback = self.holdbacks.pop(mig, None)
        if holdback is not None:
            holdback.close()
        self.appliers.pop(mig, None)

    def shutdown(self) -> None:
        """Remove this host's tmpfs images and empty cgroup parents (the agent is stopping)."""
        shutil.rmtree(self.images_root, ignore_errors=True)


def _started(future: Future[Pager]) -> Pager | None:
    """The pager once it has started; None if starting it failed (the restore then starts another)."""
    try:
        return future.result()
    except SkyferryError:
        return None


def _tree(pid: int) -> list[int]:
    """A process and all its descendants."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except FileNotFoundError:
            continue
    return found


def _tree_rss(pid: int) -> int:
    """Resident bytes of a process and its descendants: about what a full dump will write."""
    total = 0
    for p in _tree(pid):
        try:
            status = Path(f"/proc/{p}/status").read_text()
        except FileNotFoundError:
            continue
        total += next((int(ln.split()[1]) * 1024 for ln in status.splitlines() if ln.startswith("VmRSS:")), 0)
    return total


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
