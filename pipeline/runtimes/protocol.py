"""The runtime adapter protocol: what the host agent needs from a container engine.

One adapter per engine (runc here; Podman and Docker beside it), engine quirks kept inside it, in the
spirit of p.haul's per-container-type adapters. The agent's migration flow is the same for all:
checkpoint leaves the container frozen; `payload` names the directories that travel with the CRIU
images (rootfs, writable layer, engine metadata); `prepare` on the target returns where they land.
"""

import shutil
from pathlib import Path
from typing import Any, Protocol

from skyferry.pipeline.hostapi.spec import ContainerSpec
from skyferry.pipeline.runtimes.docker import DOCKER, Docker
from skyferry.pipeline.runtimes.podman import PODMAN, Podman
from skyferry.pipeline.runtimes.runc import Runc


class Runtime(Protocol):
    name: str
    # What this engine can do, declared by the adapter and reported in the agent's /v1/facts, so the
    # controller learns it from the host rather than from code it must not load. Pre-copy reads the live
    # memory and builds CRIU images beside the engine; only runc restores straight from such a directory,
    # so Podman and Docker (through their own CLIs) move by stop-copy. The first mode is the default.
    modes: tuple[str, ...]
    # Whether pre-copy rounds may be CRIU pre-dumps (`pre_dump`, then `checkpoint(..., parent=)` on the
    # last one) where the kernel tracks soft-dirty pages; reported in /v1/facts beside the modes.
    pre_dumps: bool

    def owns(self, name: str) -> bool:
        """True if this engine on this host has a container `name` (running or not)."""
        ...

    def names(self) -> list[str]: ...

    def spec(self, name: str) -> ContainerSpec: ...

    def state(self, name: str) -> dict[str, Any] | None:
        """{"status": "running" | "paused" | "stopped" | "created", "pid": int} or None if unknown."""
        ...

    def run(self, spec: ContainerSpec, netns_path: str) -> None: ...

    def logs(self, name: str) -> bytes: ...

    def exec(self, name: str, argv: list[str], stdin: bytes, timeout: float) -> tuple[int, bytes, bytes]:
        """Run `argv` in the running container as the engine's own exec does (its namespaces, cgroup,
        capabilities and seccomp): (exit code, stdout, stderr)."""
        ...

    def cgroup(self, name: str) -> str:
        """The running container's cgroup, as /proc/PID/cgroup names it (what throttle.CpuFiles takes)."""
        ...

    def pause(self, name: str) -> None: ...

    def resume(self, name: str) -> None: ...

    def started(self, name: str) -> list[int]:
        """The process groups of engine commands this host started for `name` that a step still waits on
        (a hung checkpoint or restore), and only those: what the freeze watchdog kills."""
        ...

    def checkpoint(self, name: str, images: Path, work: Path, parent: str | None = None) -> None:
        """Dump a paused container into `images`; it must stay paused (frozen) afterwards. `parent` (only
        where `pre_dumps`): the last pre-dump, relative to `images`; unchanged pages stay there."""
        ...

    def checkpoint_ahead(self, name: str, ready: bool = True) -> None:
        """Start now, outside the freeze, what the next `checkpoint` of `name` needs (`ready`), or let it
        go unused. Engines with nothing to start ahead do nothing."""
        ...

    def pre_dump(self, name: str, images: Path, parent: str | None, work: Path) -> None:
        """Only where `pre_dumps`: the running container's memory into `images` (it keeps running), only
        the pages written since the pre-dump `parent` (relative to `images`) when one is given."""
        ...

    def payload(self, name: str) -> dict[str, Path]:
        """Directories that travel with the images, by archive name (same names on both sides)."""
        ...

    def prepare(self, spec: ContainerSpec, netns_path: str) -> None:
        """Target side: everything but the payload, so that `payload(name)` then names where it lands."""
        ...

    def restore(self, name: str, images: Path, work: Path) -> None: ...

    def remove(self, name: str) -> None:
        """Kill (even when frozen) and delete the container and its files; idempotent."""
        ...


def runtimes(state_root: Path, cgroup_prefix: str) -> dict[str, Runtime]:
    """The engines this host can use, by name: runc always, Podman and Docker where installed.

    Docker's daemon is this host's own (pipeline/runtimes/docker.py); until it runs, the adapter lists nothing
    and refuses to run or receive a container with a clear error.
    """
    found: dict[str, Runtime] = {"runc": Runc(state_root, cgroup_prefix)}
    if shutil.which(PODMAN):
        found["podman"] = Podman(state_root, cgroup_prefix)
    if shutil.which(DOCKER) and shutil.which("dockerd"):
        found["docker"] = Docker(state_root, cgroup_prefix)
    return found
