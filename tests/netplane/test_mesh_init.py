"""`skyferry mesh init`: a controller-only mesh on "this machine" (here: a network namespace the test
makes, entered with nsenter, so nothing touches the real root namespace), idempotent, and `hosts down`
removes what it made."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from skyferry.netplane import netns, wg

pytestmark = [pytest.mark.integration, pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]
SKYFERRY = str(Path(sys.executable).with_name("skyferry"))
ENDPOINT = "192.0.2.7"  # TEST-NET-1, on the test's own netns only


def test_mesh_init_then_down(run_id: str, state: Path) -> None:
    machine, ifname = f"{run_id}-mi", f"{run_id}wg"
    netns.create(machine)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        argv = netns.command(machine, [SKYFERRY, *args])
        return subprocess.run(argv, capture_output=True, text=True, timeout=120, env=os.environ.copy())

    try:
        subprocess.run(netns.command(machine, ["ip", "addr", "add", f"{ENDPOINT}/24", "dev", "lo"]), check=True)
        first = cli("mesh", "init", "--endpoint", ENDPOINT, "--name", run_id, "--interface", ifname, "--json")
        assert first.returncode == 0, first.stderr
        info = json.loads(first.stdout)
        assert info["created"] and info["endpoint"] == f"{ENDPOINT}:51820" and info["mesh"] == run_id
        assert wg.backend_of(machine, ifname) == info["wireguard"]
        shown = wg.wg(machine, "show", ifname, "listen-port")
        assert shown.strip() == "51820"
        again = cli("mesh", "init", "--endpoint", ENDPOINT, "--name", run_id, "--interface", ifname, "--json")
        assert again.returncode == 0 and not json.loads(again.stdout)["created"]
        other = cli("mesh", "init", "--endpoint", "192.0.2.8", "--name", run_id, "--interface", ifname)
        assert other.returncode == 2 and "already recorded" in other.stderr and "Traceback" not in other.stderr
        bad = cli("mesh", "init", "--endpoint", "not-an-ip", "--name", "x" + run_id, "--interface", ifname)
        assert bad.returncode == 2 and "is not an IP address" in bad.stderr
        down = cli("hosts", "down", "--json")
        assert down.returncode == 0, down.stderr
        assert any(r == f"mesh {run_id}" for r in json.loads(down.stdout)["removed"])
        assert wg.backend_of(machine, ifname) is None and not (wg.SOCKET_DIR / f"{ifname}.sock").exists()
    finally:
        for pid in (p for p in _pids(machine)):
            os.kill(pid, 9)
        wg.remove_socket(ifname)
        netns.remove(machine)


def _pids(machine: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", machine], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]
