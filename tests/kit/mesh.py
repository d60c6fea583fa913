"""A real local mesh (namespaces, wireguard-go, agents) for a test module, removed even on failure; and the
checks that several test modules run on one."""

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from skyferry.netplane.mesh import Mesh
from skyferry.pipeline.controller import migration
from skyferry.pipeline.controller.journal import Journal
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.scenarios import demo as scenario


@contextmanager
def mesh_in(state: Path, count: int = 3, prefix: str = "t", wan: str | None = None) -> Iterator[Mesh]:
    """Hosts local-1..local-COUNT with their agents under `state`, which SKYFERRY_STATE points at while
    the block runs (the CLI and the agents read it); torn down whatever happens."""
    state.chmod(0o700)
    old = os.environ.get("SKYFERRY_STATE")
    os.environ["SKYFERRY_STATE"] = str(state)
    try:
        yield scenario.mesh_up(state, count, wan, name=prefix + os.urandom(2).hex())
    finally:
        scenario.mesh_down(state)
        if old is None:
            os.environ.pop("SKYFERRY_STATE", None)
        else:
            os.environ["SKYFERRY_STATE"] = old


@contextmanager
def local_mesh(
    tmp_path_factory: pytest.TempPathFactory, count: int = 3, prefix: str = "t", wan: str | None = None
) -> Iterator[tuple[Path, Mesh]]:
    """`mesh_in` a fresh private state dir; yields (state, mesh)."""
    state = tmp_path_factory.mktemp("state")
    with mesh_in(state, count, prefix, wan) as mesh:
        yield state, mesh


def lose_source_during_lazy_phase(state: Path, mesh: Mesh, name: str, mode: str) -> None:
    """Migrate `name` local-1 -> local-2 in a lazy mode while the source's page server dies: the loss must
    be detected after the restore and said plainly, with the migration left resumable, not hidden."""
    faults = Path(mesh.hosts["local-1"].state_root) / "faults"
    faults.write_text("lose-page-server\n")
    try:
        with pytest.raises(SkyferryError, match="post-copy") as failure:
            migration.migrate(state, name, "local-2", mode=mode)
    finally:
        faults.unlink()
    assert "after the container went live on local-2" in str(failure.value)
    mig = Journal(state).all()[-1]
    assert mig.state == "running" and "page server ended" in (mig.error or ""), mig.error
