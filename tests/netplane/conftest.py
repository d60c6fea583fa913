"""Local meshes for netplane tests: always brought down, then checked for anything left behind."""

import ipaddress
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from pyroute2 import IPRoute
from skyferry.netplane import netns, wg
from skyferry.netplane.mesh import Mesh
from skyferry.netplane.wan import WanSpec
from skyferry.providers.local import UNDERLAY, LocalProvider


def leftovers(run_id: str, cidr: str = "100.64.0.0/16") -> list[str]:
    """Every trace of mesh `run_id` on this machine: namespaces, sockets, processes, root interfaces/routes."""
    found = [f"netns {p.name}" for p in netns.RUN_DIR.glob(f"{run_id}-*")] if netns.RUN_DIR.exists() else []
    found += [f"socket {p}" for p in wg.SOCKET_DIR.glob(f"{run_id}-*")] if wg.SOCKET_DIR.exists() else []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(run_id.encode() in a for a in argv) and b"pytest" not in b" ".join(argv):
            found.append(f"process {proc.name}: {b' '.join(argv).decode(errors='replace')}")
    with IPRoute() as ipr:
        found += [f"root link {n}" for n in (link.get("ifname") for link in ipr.get_links()) if run_id in n]
        for r in ipr.get_routes(family=2, table=254):
            dst = r.get("RTA_DST")
            if dst and any(ipaddress.ip_address(dst) in ipaddress.ip_network(n) for n in (cidr, UNDERLAY)):
                found.append(f"root route {dst}/{r['dst_len']}")
    return found


@contextmanager
def mesh_up(state: Path, run_id: str, count: int, wan: str | None = None, cidr: str | None = None) -> Iterator[Mesh]:
    provider = LocalProvider(state, cidr=cidr, wan_spec=WanSpec.parse(wan) if wan else None)
    try:
        mesh, created = provider.up(count, run_id)
        assert created
        yield mesh
    finally:
        provider.down()


@pytest.fixture
def local_mesh(state: Path, run_id: str) -> Iterator[Callable[..., Mesh]]:
    """`local_mesh(count, wan=..., cidr=...)` builds a mesh named run_id; it is removed even if the test fails."""
    stack: list[contextmanager] = []

    def make(count: int, wan: str | None = None, cidr: str | None = None) -> Mesh:
        cm = mesh_up(state, run_id, count, wan, cidr)
        mesh = cm.__enter__()
        stack.append(cm)
        return mesh

    try:
        yield make
    finally:
        for cm in reversed(stack):
            cm.__exit__(None, None, None)
        assert leftovers(run_id) == []
