"""Helpers for the runbook tests (tests/test_runbook_*.py): a local mesh per module, counter containers
with labels, and what each host's agent really runs. Imported as a module, never through conftest."""

import os
import subprocess
import sys
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from skyferry.netplane.mesh import Mesh
from skyferry.pipeline.controller import agentctl, containers
from skyferry.pipeline.hostapi.spec import HOST_PROGRAMS
from skyferry.pipeline.scenarios import demo as scenario

from kit.mesh import mesh_in

SKYFERRY = str(Path(sys.executable).parent / "skyferry")
# Run in the container's (or clone's) netns by the agent: one request on a new connection to the counter.
COUNTER_CHECK = (
    f"{scenario.PYTHON} -c \"import os,socket; s=socket.create_connection((os.environ['SKYFERRY_IP'],"
    f"{scenario.PORT}),3); s.sendall(b'7\\n'); assert s.recv(64).startswith(b'7 1'), 'bad answer'\""
)


def local_mesh(state: Path, count: int) -> AbstractContextManager[Mesh]:
    """A mesh of `count` local hosts with agents, in its own state dir; removed whatever happens."""
    return mesh_in(state, count, prefix="r")


def counter(
    state: Path, host: str, name: str, workdir: Path, labels: dict[str, str] | None = None, memory_mib: int = 0
) -> dict[str, Any]:
    args = [scenario.PYTHON, "/app/counter.py", "serve", str(scenario.PORT)]
    if memory_mib:
        args += ["--memory-mib", str(memory_mib)]
    rootfs = scenario.counter_rootfs(workdir)
    return containers.run(state, host, name, args, rootfs=rootfs, labels=labels, host_dirs=list(HOST_PROGRAMS))


def client(mesh: Mesh, host: str, ip: str, workdir: Path) -> scenario.CounterClient:
    return scenario.CounterClient(mesh.hosts[host].netns or "", ip, workdir).start()


def running(state: Path, mesh: Mesh) -> dict[str, list[str]]:
    """Container name -> every host whose agent runs it (must be exactly one host each)."""
    seen: dict[str, list[str]] = {}
    for host in mesh.hosts:
        for c in agentctl.client(state, mesh, host).call("GET", "/v1/containers"):
            if c["state"] == "running":
                seen.setdefault(c["name"], []).append(host)
    return seen


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SKYFERRY, *args], capture_output=True, text=True, env={**os.environ, **(env or {})})


def remove_all(state: Path) -> None:
    for row in containers.live(state):
        containers.remove(state, row["name"])
