"""The host an agent runs on: its containers, and the live migration sessions that act on them.

Container operations are idempotent, so a controller that crashed and resumed can call them again. Each
migration that passes through this host has a session object holding all of its state here: a
`SourceSession` (pipeline/agent/source.py) or a `TargetSession` (pipeline/agent/target.py), registered
in `sources` / `targets` on first use and dropped by the session's own `close()`. Checkpoint images live
on tmpfs only (they hold every secret in the container's memory) and are wiped when the migration ends
either way.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from skyferry.netplane import attach
from skyferry.pipeline.agent import dnat, facts, netlock, preflight
from skyferry.pipeline.agent.bulk import BulkSlots
from skyferry.pipeline.agent.containerlock import ContainerLock
from skyferry.pipeline.agent.freeze import Freezes
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.files import wire
from skyferry.pipeline.hostapi import privdir
from skyferry.pipeline.hostapi.layout import IMAGES_TMPFS
from skyferry.pipeline.hostapi.publish import PublicPort
from skyferry.pipeline.hostapi.spec import IMPORTS, ContainerSpec
from skyferry.pipeline.runtimes.protocol import Runtime, runtimes
from skyferry.pipeline.runtimes.throttle import Throttles

STARTUP_GRACE = 0.5  # seconds a new container must keep running for `run` to call it started


@dataclass(frozen=True)
class HostConfig:
    name: str
    mesh: str
    state_root: Path
    overlay_ip: str
    mtu: int = 1420
    wg_interface: str = "skyferry"  # this host's WireGuard interface, which only its own agent configures


class Session(Protocol):
    """What the host knows of a session: the container it moves, and that it can be closed. (The session
    modules import this one, not the other way round, so each keeps its own type and the layers stay
    acyclic.)"""

    name: str

    def close(self) -> None: ...


S = TypeVar("S", bound=Session)


class Host:
    def __init__(self, cfg: HostConfig) -> None:
        self.cfg = cfg
        self.runtimes = runtimes(cfg.state_root, f"/skyferry/{cfg.mesh}/{cfg.name}")
        self.images_root = IMAGES_TMPFS / cfg.mesh / cfg.name
        self.sources: dict[str, Session] = {}  # by migration id: SourceSession
        self.targets: dict[str, Session] = {}  # by migration id: TargetSession
        self.freezes = Freezes(cfg.state_root)  # the source's freeze records, which its watchdog bounds
        self.throttles = Throttles(cfg.state_root)  # auto-converge: the CPU limits to write back
        self.bulk = BulkSlots(self.freezes.frozen)  # pre-copy first rounds streaming at once
        self.fork_marks: dict[str, preflight.ForkMark] = {}  # by container: where auto's rounds count forks from
        self.pool = ThreadPoolExecutor(4, thread_name_prefix="pager")  # target sessions start pagers here
        self._locks: dict[str, ContainerLock] = {}
        self._guard = threading.Lock()

    def session(self, sessions: dict[str, Session], kind: Callable[[Host, str, str], S], mig: str, name: str) -> S:
        """The live session of migration `mig` in `sessions` (`sources` or `targets`), or a new one (first
        use, or after an agent restart: then whatever the old one held is gone and the steps say so)."""
        with self._guard:  # a stream and the restore waiting for it look their session up at once
            session = sessions.get(mig)
            if session is None:
                session = sessions[mig] = kind(self, mig, name)
        if session.name != name:
            raise SkyferryError(f"migration {mig} moves {session.name!r} here, not {name!r}")
        return session  # type: ignore[return-value]  # `sessions` holds only `kind`'s sessions

    def lock(self, name: str) -> ContainerLock:
        """One operation at a time per container (and so per migration session), or its streams."""
        with self._guard:
            return self._locks.setdefault(name, ContainerLock())

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

    def state(self, name: str) -> dict[str, Any] | None:
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

    def bind(self, mig: str, peer: str) -> None:
        """Migration `mig` takes streams from host `peer` only (the controller names it at prepare). Kept in
        the state root, so an agent restart does not forget who may send them; `wipe` drops it."""
        path = self._binding(mig)
        path.parent.mkdir(mode=0o700, exist_ok=True)
        path.write_text(peer)

    def peer(self, mig: str) -> str | None:
        """The host bound to migration `mig` here, or None: this host was never prepared for it."""
        path = self._binding(mig)
        return path.read_text() if path.exists() else None

    def _binding(self, mig: str) -> Path:
        return self.cfg.state_root / "bindings" / mig

    def wipe(self, mig: str) -> None:
        """Remove a migration's images (they hold the container's memory) and its peer binding, keeping
        CRIU's logs, which do not, in <state_root>/logs/<mig>/ for whoever investigates a failure."""
        self._binding(mig).unlink(missing_ok=True)
        src = self.mig_dir(mig)
        for log in src.glob("work*/*.log"):
            dest = self.cfg.state_root / "logs" / mig / f"{log.parent.name}-{log.name}"
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(log, dest)
        wire.wipe(src)

    def remove_if_present(self, name: str) -> None:
        """Remove container `name` from whichever engine has it, and its netns; nothing if it is gone."""
        for runtime in self.runtimes.values():
            if runtime.owns(name):
                runtime.remove(name)
        attach.detach(self.netns(name))
        dnat.unpublish(name)  # a container that left this host takes its public ports along

    # --- containers ------------------------------------------------------------------------------

    def run(self, spec: ContainerSpec) -> dict[str, Any]:
        self._confine(spec)
        runtime = self.engine(spec)
        state = self.state(spec.name)
        if state is not None:
            if state["status"] in ("running", "paused"):
                return self.info(spec.name)  # already there: idempotent
            self.rt(spec.name).remove(spec.name)
        attach.attach(self.netns(spec.name), spec.ip, mtu=self.cfg.mtu)
        try:
            runtime.run(spec, self.netns_path(spec.name))
            self._check_started(runtime, spec.name)
        except Exception:
            attach.detach(self.netns(spec.name))
            raise
        return self.info(spec.name)

    def _check_started(self, runtime: Runtime, name: str) -> None:
        """A command that dies at once (a missing file, a bad flag) fails `run` with its last log lines,
        and leaves nothing behind, rather than being reported as running."""
        deadline = time.monotonic() + STARTUP_GRACE
        while time.monotonic() < deadline:
            time.sleep(0.05)
            status = (runtime.state(name) or {}).get("status")
            if status not in ("running", "created"):
                tail = runtime.logs(name).decode(errors="replace").strip().splitlines()[-5:]
                runtime.remove(name)
                raise SkyferryError(
                    f"container {name!r} exited at once ({status or 'gone'})",
                    hint="its last log lines:\n  " + "\n  ".join(tail) if tail else "it wrote no log",
                )

    def _confine(self, spec: ContainerSpec) -> None:
        """A rootfs or image is read from this host's imports directory only (<state_root>/imports/),
        never from anywhere else a caller names: not the host's /etc, not this agent's own TLS key."""
        imports = (self.cfg.state_root / IMPORTS).resolve()
        seeds = [(f"volume seed {v}", src) for v, src in spec.seeds.items()]
        for what, path in (("rootfs", spec.rootfs), ("image", spec.image), *seeds):
            if path is not None and not Path(path).resolve().is_relative_to(imports):
                raise ValueError(f"{what} {path} is outside {imports}: put it there first (the controller does)")

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

    def preflight(self, name: str, forks: str = "now") -> list[preflight.Finding]:
        """What CRIU could not dump. The fork rate (which rules out the lazy modes) is measured over the
        next 0.5 s with `forks` "now"; with "later" only its start is marked, and auto mode's rounds count
        from it (SourceSession.precopy), so the check does not wait."""
        pid = (self.state(name) or {}).get("pid")
        if not pid:
            return []
        found = preflight.scan(pid, facts.dumps_other_users())
        if forks == "later":
            mark = preflight.fork_mark(pid)
            if mark is None:
                self.fork_marks.pop(name, None)
            else:
                self.fork_marks[name] = mark
            return found
        return found + preflight.forking(pid)

    def exec(self, name: str, argv: list[str], stdin: bytes, timeout: float) -> tuple[int, bytes, bytes]:
        """`skyferry exec`: only in a container that runs and is not frozen for a migration."""
        status = (self.state(name) or {}).get("status", "gone")
        if status != "running" or netlock.is_locked(self.netns(name)):
            raise SkyferryError(
                f"container {name!r} on {self.cfg.name} is {status}"
                + (", frozen for a migration" if status == "paused" else ""),
                hint="a migration freezes a container for under a second: try again" if status == "paused" else None,
            )
        return self.rt(name).exec(name, argv, stdin, timeout)

    def remove(self, name: str) -> None:
        self.rt(name).remove(name)
        attach.detach(self.netns(name))
        dnat.unpublish(name)

    def publish(self, name: str, ports: list[PublicPort]) -> list[dict[str, Any]]:
        """DNAT `ports` of this host's own addresses to container `name`'s /32 (only a container that is
        here: the ingress runbook calls it on the target after the move)."""
        ip = self.rt(name).spec(name).ip
        return dnat.publish(self.cfg.name, name, ip, ports, self.cfg.overlay_ip)

    def set_route(self, name: str, present: bool) -> None:
        """This host's /32 route to the container's netns (the cutover adds it on the target). Removing
        it is a no-op once the container is gone (a rollback may have removed it already)."""
        if not present and not any(r.owns(name) for r in self.runtimes.values()):
            return
        attach.set_route(self.netns(name), self.rt(name).spec(name).ip, present)

    def shutdown(self) -> None:
        """Remove this host's tmpfs images and empty cgroup parents (the agent is stopping)."""
        if privdir.verified(self.images_root, below=IMAGES_TMPFS.parent):  # never rmtree through a planted link
            shutil.rmtree(self.images_root, ignore_errors=True)
