"""A real local mesh (namespaces, wireguard-go, agents) for a test module, removed even on failure; and the
checks that several test modules run on one."""

import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from skyferry.netplane.mesh import Mesh
from skyferry.pipeline.controller import agentctl, containers, migration
from skyferry.pipeline.controller.journal import Journal
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.runtimes import children
from skyferry.pipeline.scenarios import demo as scenario


def left_in_cgroup(mesh: Mesh, host: str, name: str) -> list[str]:
    """The tasks still in container `name`'s cgroup on `host` (the agent's runc prefix), runc knowing it or not."""
    return tasks_in(f"skyferry/{mesh.name}/{host}/{name}")


def tasks_in(rel: str) -> list[str]:
    """The tasks in cgroup `rel` (as /proc/PID/cgroup names it), whatever engine put them there."""
    rel = rel.strip("/")
    v1 = not (children.CGROUP / "cgroup.controllers").exists()
    procs = (children.CGROUP / "pids" / rel if v1 else children.CGROUP / rel) / "cgroup.procs"
    return procs.read_text().split() if procs.exists() else []


def cgroup_dirs(rel: str) -> list[Path]:
    """Cgroup `rel`'s directories that exist: one per controller hierarchy on cgroup v1 (runc and Podman's
    cgroupfs driver make it in each), the one on v2."""
    root = children.CGROUP
    hierarchies = [root] if (root / "cgroup.controllers").exists() else sorted(h for h in root.iterdir() if h.is_dir())
    return [h / rel.strip("/") for h in hierarchies if (h / rel.strip("/")).is_dir()]


@contextmanager
def mesh_in(state: Path, count: int = 3, prefix: str = "t", wan: str | None = None) -> Iterator[Mesh]:
    """Hosts local-1..local-COUNT with their agents under `state`, which SKYFERRY_STATE points at while
    the block runs (the CLI and the agents read it); torn down whatever happens."""
    state.chmod(0o700)
    old = os.environ.get("SKYFERRY_STATE")
    os.environ["SKYFERRY_STATE"] = str(state)
    name = prefix + os.urandom(2).hex()
    try:
        yield scenario.mesh_up(state, count, wan, name=name)
    finally:
        scenario.mesh_down(state)
        if old is None:
            os.environ.pop("SKYFERRY_STATE", None)
        else:
            os.environ["SKYFERRY_STATE"] = old
    # Outside the `finally`: a failed block's own error comes first. Empty parents are the teardown's to
    # remove, so what stays holds tasks: a container the test left running, or a killed restore's task.
    left = cgroup_dirs(f"skyferry/{name}")
    assert not left, f"mesh {name} left cgroups behind: {[str(d) for d in left]}"


@contextmanager
def local_mesh(
    tmp_path_factory: pytest.TempPathFactory, count: int = 3, prefix: str = "t", wan: str | None = None
) -> Iterator[tuple[Path, Mesh]]:
    """`mesh_in` a fresh private state dir; yields (state, mesh)."""
    state = tmp_path_factory.mktemp("state")
    with mesh_in(state, count, prefix, wan) as mesh:
        yield state, mesh


@contextmanager
def counter_and_client(
    mesh: tuple[Path, Mesh],
    workdir: Path,
    request: pytest.FixtureRequest,
    run: Callable[[Path, str], dict[str, Any]] | None = None,
    **options: Any,
) -> Iterator[dict[str, Any]]:
    """A counter container on local-1 named for the test, started by `run(state, name)` (by default the
    demo's counter with `options`), and a client on local-3 holding one connection to it. Yields its name,
    ip, client, state and mesh; the client stops and the container goes whatever happens."""
    state, m = mesh
    name = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[-30:].strip("-")
    try:
        info = run(state, name) if run else scenario.start_counter(state, "local-1", name, workdir, **options)
        client = scenario.CounterClient(m.hosts["local-3"].netns or "", info["ip"], workdir).start()
        try:
            yield {"name": name, "ip": info["ip"], "client": client, "state": state, "mesh": m}
        finally:
            client.stop()
    finally:
        containers.remove(state, name)


def where(state: Path, name: str) -> dict[str, Any]:
    """The controller's row of container `name`."""
    return {r["name"]: r for r in containers.live(state)}[name]


def lose_source_during_lazy_phase(state: Path, mesh: Mesh, name: str, mode: str) -> None:
    """Migrate `name` local-1 -> local-2 in a lazy mode while the link to the source's page server dies
    (the drill cuts it 64 KiB into the pages, so the restore or the lazy phase after it fails, as the
    daemon's first faults fall): the loss must be detected and said plainly, the copy on the target
    stopped before it runs on missing pages, and the frozen source thawed: the container ends up running
    once, on local-1."""
    faults = Path(mesh.hosts["local-1"].state_root) / "faults"
    faults.write_text("lose-page-server\n")
    try:
        with pytest.raises(SkyferryError, match=f"(?i)rolled back: {name} runs on local-1") as failure:
            migration.migrate(state, name, "local-2", mode=mode)
    finally:
        faults.unlink()
    assert re.search("failed at restore|post-copy lost its page source", str(failure.value)), failure.value
    assert Journal(state).all()[-1].state == "rolled-back"
    placed = {c["name"]: c for c in containers.live(state)}[name]
    assert (placed["host"], placed["state"]) == ("local-1", "running")
    assert name not in [c["name"] for c in agentctl.client(state, mesh, "local-2").call("GET", "/v1/containers")]
    assert not left_in_cgroup(mesh, "local-2", name), "the stopped copy's tasks still live on local-2"
