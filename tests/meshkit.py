"""A real local mesh (namespaces, wireguard-go, agents) for a test module, removed even on failure."""

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from skyferry.netplane.mesh import Mesh
from skyferry.pipeline import demo as scenario


@contextmanager
def local_mesh(
    tmp_path_factory: pytest.TempPathFactory, count: int = 3, prefix: str = "t", wan: str | None = None
) -> Iterator[tuple[Path, Mesh]]:
    """Hosts local-1..local-COUNT with their agents, under a private state dir that SKYFERRY_STATE
    points at while the block runs (the CLI and the agents read it)."""
    state = tmp_path_factory.mktemp("state")
    state.chmod(0o700)
    old = os.environ.get("SKYFERRY_STATE")
    os.environ["SKYFERRY_STATE"] = str(state)
    try:
        yield state, scenario.mesh_up(state, count, wan, name=prefix + os.urandom(2).hex())
    finally:
        scenario.mesh_down(state)
        if old is None:
            os.environ.pop("SKYFERRY_STATE", None)
        else:
            os.environ["SKYFERRY_STATE"] = old
