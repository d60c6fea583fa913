"""One session of real VMs for every VM test: a local mesh with one namespace host (local-1) on an
emulated WAN, and two VMs (vm-1, vm-2) joined through provision's token path, booted once under nice
(TCG here). Everything carries the run's unique mesh id; `hosts down` runs even on failure.

Modules use it in file order: tests/providers/test_vm.py checks the guests, test_vm_mesh.py migrates
between them, then test_vm_provider.py checks the provider and test_vm_zz_last.py ends the session (it
takes the VMs' WireGuard down, then the session, and checks nothing is left).
"""

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from skyferry.netplane.mesh import Mesh
from skyferry.pipeline.controller import agentctl
from skyferry.pipeline.scenarios import demo as scenario
from skyferry.providers import vm

SKYFERRY = str(Path(sys.executable).parent / "skyferry")
WAN_RTT = 0.1  # large enough to stand out of TCG's timing noise

vm_integration = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.skipif(not shutil.which(vm.qemu.QEMU), reason="needs QEMU (make host)"),
    pytest.mark.timeout(3000),
]


class Session:
    def __init__(self, run: str, state: Path) -> None:
        self.run, self.state = run, state
        self.env = {**os.environ, "SKYFERRY_STATE": str(state)}

    def cli(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run([SKYFERRY, *args], capture_output=True, text=True, env=self.env, timeout=timeout)

    def json(self, *args: str, timeout: float = 600) -> dict:  # type: ignore[type-arg]
        done = self.cli(*args, "--json", timeout=timeout)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout)

    def sh(self, host: str, script: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return self.cli("hosts", "exec", host, "--", "sh", "-c", script, timeout=timeout)


def vm_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Session]:
    """The body of the session fixture `vms` (tests/providers/conftest.py)."""
    run = "v" + secrets.token_hex(2)
    state = tmp_path_factory.mktemp("vmstate")
    s = Session(run, state)
    try:
        up = s.json("hosts", "up", "--local", "--count", "1", "--name", run, "--wan", f"rate=100mbit,rtt={WAN_RTT:g}s")
        assert up["created"]
        started = time.monotonic()
        done = s.cli("hosts", "up", "--vm", "--count", "2", "--json", timeout=2400)
        assert done.returncode == 0, done.stderr[-4000:]
        s.up_result = json.loads(done.stdout)  # type: ignore[attr-defined]
        s.up_stderr = done.stderr  # type: ignore[attr-defined]
        s.boot_s = time.monotonic() - started  # type: ignore[attr-defined]
        yield s
    finally:
        s.cli("hosts", "down", timeout=300)
        shutil.rmtree(state, ignore_errors=True)


def containers_on(state: Path, host: str, name: str) -> list[dict[str, Any]]:
    mesh = Mesh.load(state)
    return [c for c in agentctl.client(state, mesh, host).call("GET", "/v1/containers") if c["name"] == name]


def counter_client(state: Path, ip: str, workdir: Path) -> scenario.CounterClient:
    netns = Mesh.load(state).host("local-1").netns
    assert netns is not None
    return scenario.CounterClient(netns, ip, workdir).start()
