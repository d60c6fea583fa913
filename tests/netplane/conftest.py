"""Local meshes for netplane tests: always brought down, then checked for anything left behind."""

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from kit.net import leftovers, mesh_up
from skyferry.netplane.mesh import Mesh


@pytest.fixture
def local_mesh(state: Path, run_id: str) -> Iterator[Callable[..., Mesh]]:
    """`local_mesh(count, wan=..., cidr=...)` builds a mesh named run_id; it is removed even if the test fails."""
    with ExitStack() as stack:

        def make(count: int, wan: str | None = None, cidr: str | None = None) -> Mesh:
            return stack.enter_context(mesh_up(state, run_id, count, wan, cidr))

        yield make
    assert leftovers(run_id) == []
