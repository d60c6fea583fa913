"""Scenario pieces shared by `skyferry demo`, the end-to-end tests and the benchmark.

A local mesh with agents, the counter workload in a container, and a client in another host's
namespace that proves the connection survived with no request lost or repeated.
"""

import json
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from skyferry.netplane import netns
from skyferry.netplane.mesh import Mesh
from skyferry.netplane.wan import WanSpec
from skyferry.pipeline.controller import agentctl, containers, provision
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.hostapi.spec import HOST_PROGRAMS
from skyferry.pipeline.scenarios import workload_counter
from skyferry.providers.local import LocalProvider

PORT = 9000
PYTHON = "/usr/bin/python3"  # the host's python; a container sees it only when it asks for HOST_PROGRAMS


def mesh_up(state: Path, count: int, wan: str | None = None, name: str | None = None) -> Mesh:
    """Local hosts plus their agents; on any failure, everything it made is removed again."""
    provider = LocalProvider(state, wan_spec=WanSpec.parse(wan) if wan else None)
    mesh, _ = provider.up(count, name)
    try:
        agentctl.start_agents(mesh, state)
    except BaseException:
        mesh_down(state)
        raise
    return mesh


def mesh_down(state: Path) -> list[str]:
    return provision.teardown(state)


def counter_rootfs(workdir: Path) -> Path:
    """A rootfs holding just the counter service; run it with host_dirs=HOST_PROGRAMS for the host's python3."""
    rootfs = workdir / "counter-rootfs"
    (rootfs / "app").mkdir(parents=True, exist_ok=True)
    shutil.copy(workload_counter.__file__, rootfs / "app" / "counter.py")
    return rootfs


def start_counter(
    state: Path, host: str, name: str, workdir: Path, memory_mib: int = 0, dirty_mb_s: float = 0.0,
    user: tuple[int, int] = (0, 0), incompressible: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """The counter service on `host`. A machine (VM, cloud) cannot see this machine's files, so there it
    runs from its source inline, with the host's own Python; a namespace host gets a rootfs. Either way
    the container asks for the host's programs (read-only /usr), and sees nothing else of the host."""
    serve = ["serve", str(PORT)]
    if memory_mib:
        serve += ["--memory-mib", str(memory_mib), "--dirty-mb-s", str(dirty_mb_s)]
        serve += ["--incompressible"] if incompressible else []
    if Mesh.load(state).host(host).netns is None:
        source = Path(workload_counter.__file__).read_text()
        args = [PYTHON, "-c", source, *serve]
        return containers.run(state, host, name, args, user=user, host_dirs=list(HOST_PROGRAMS))
    args, rootfs = [PYTHON, "/app/counter.py", *serve], counter_rootfs(workdir)
    return containers.run(state, host, name, args, rootfs=rootfs, user=user, host_dirs=list(HOST_PROGRAMS))


@dataclass
class CounterClient:
    """The counter client, running in a host's network namespace as a process we own."""

    host_netns: str
    ip: str
    workdir: Path
    interval: float = 0.05
    timeout: float = 60.0  # the longest wait for one answer before the client gives up
    proc: subprocess.Popen[bytes] | None = None

    @property
    def out(self) -> Path:
        return self.workdir / f"client-{self.ip}.json"

    @property
    def stop_file(self) -> Path:
        return self.workdir / f"client-{self.ip}.stop"

    def start(self, timeout: float = 15.0) -> "CounterClient":
        self.stop_file.unlink(missing_ok=True)
        self.out.unlink(missing_ok=True)
        argv = [PYTHON, workload_counter.__file__, "client", self.ip, str(PORT), "--interval", str(self.interval),
                "--out", str(self.out), "--stop-file", str(self.stop_file), "--timeout", str(self.timeout)]  # fmt: skip
        self.progress_file.unlink(missing_ok=True)
        self.proc = subprocess.Popen(netns.command(self.host_netns, argv), stdin=subprocess.DEVNULL, close_fds=True)
        self.wait_for(1, timeout)
        return self

    @property
    def progress_file(self) -> Path:
        return Path(f"{self.out}.progress")

    def progress(self) -> int:
        """Requests answered so far, on the one connection."""
        try:
            return int(self.progress_file.read_text() or 0)
        except FileNotFoundError:
            return 0

    def wait_for(self, requests: int, timeout: float = 15.0) -> None:
        """Block until `requests` have been answered; raises if the client died or got stuck."""
        deadline = time.monotonic() + timeout
        while self.progress() < requests:
            if (self.proc is not None and self.proc.poll() is not None) or time.monotonic() > deadline:
                self.stop()
                raise SkyferryError(f"the counter client stalled talking to {self.ip}: {self.result()}")
            time.sleep(0.02)

    def stop(self) -> dict[str, Any]:
        self.stop_file.touch()
        if self.proc is not None:
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.result()

    def result(self) -> dict[str, Any]:
        if not self.out.exists():
            return {"survived": False, "errors": ["client wrote no result"], "requests": 0, "max_gap_ms": None}
        return json.loads(self.out.read_text())


def check_memory(host_netns: str, ip: str) -> dict[str, Any]:
    """The counter's own verdict on its memory, asked from a host's netns: {"pages", "bad", "first_bad"}."""
    argv = [PYTHON, workload_counter.__file__, "check", ip, str(PORT)]
    proc = subprocess.run(netns.command(host_netns, argv), capture_output=True, text=True, timeout=120)
    if not proc.stdout.strip():
        raise SkyferryError(f"the counter at {ip} gave no memory check: {proc.stderr.strip()}")
    return json.loads(proc.stdout)
