"""The VM session's last tests, in this order: they end it. A target VM is lost mid-migration (vm-2 stays
dead), the WAN relay is measured between the VMs (it takes their WireGuard down to use port 51820), and
`hosts down` must leave nothing behind. The file name sorts after every other VM test module.
"""

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from kit.net import leftovers
from kit.vms import WAN_RTT, Session, containers_on, counter_client, vm_integration
from skyferry.netplane import netns, store
from skyferry.netplane.mesh import Mesh
from skyferry.pipeline.controller import migration
from skyferry.pipeline.controller.journal import Journal
from skyferry.pipeline.controller.registry import Registry
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.scenarios import demo as scenario
from skyferry.providers import vm


@pytest.fixture
def controller(vms: Session, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setenv("SKYFERRY_STATE", str(vms.state))
    return tmp_path


def _running(pid: int | None) -> bool:
    """Alive and not a zombie: a QEMU whose `hosts up` has exited is reaped by init, in its own time."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class TestLast:
    pytestmark = vm_integration

    def test_a_lost_target_vm_leaves_the_container_running_once(self, vms: Session, controller: Path) -> None:
        """kill -9 of the target's QEMU while the source is checkpointing: the migration fails and the
        container runs on the source, exactly once, not frozen. (vm-2 stays dead.)"""
        info = scenario.start_counter(vms.state, "vm-1", "lost", controller)
        client = counter_client(vms.state, info["ip"], controller)
        errors: list[BaseException] = []

        def run() -> None:
            try:
                migration.migrate(vms.state, "lost", "vm-2", mode="stop-copy")
            except BaseException as exc:
                errors.append(exc)

        mover = threading.Thread(target=run)
        try:
            client.wait_for(client.progress() + 3, timeout=60)
            mover.start()
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                migs = [m for m in Journal(vms.state).all() if m.container == "lost"]
                if migs and Journal(vms.state).stage_status(migs[-1].id).get("checkpoint"):
                    break
                time.sleep(0.05)
            pid = vm.record(vms.state, "vm-2").pid  # type: ignore[union-attr]
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            mover.join(timeout=900)
            assert not mover.is_alive()
            client.wait_for(client.progress() + 3, timeout=120)
        finally:
            seen = client.stop()
        assert errors and isinstance(errors[0], SkyferryError), errors
        print(f"target lost: {errors[0]}")
        assert "Rolled back: lost runs on vm-1" in str(errors[0])
        live = containers_on(vms.state, "vm-1", "lost")
        assert [(c["state"], c["frozen_for_migration"]) for c in live] == [("running", False)]
        assert Registry(vms.state).get("lost").host == "vm-1"
        assert seen["survived"], seen

    def test_b_relay_pair_delays_udp_between_the_vms(self, vms: Session) -> None:
        """vm-1 -> relay port of (vm-1, vm-2) -> vm-2 and back adds the WAN's rtt to the direct round trip."""
        mesh = Mesh.load(vms.state)
        assert mesh.wan is not None
        port = mesh.wan.relay_ports[mesh.wan.pair("vm-1", "vm-2")]
        for name in ("vm-1", "vm-2"):
            assert mesh.peer_endpoint(mesh.host(name), mesh.controller).startswith("198.18.0.1:")
            assert mesh.wan.pair(name, "local-1") in mesh.wan.relay_ports
        # WireGuard may hold port 51820 if the user-data brought it up; the relay pairs that port.
        for name in ("vm-1", "vm-2"):
            vms.sh(name, "ip link del skyferry 2>/dev/null; true")
        echo = (
            "import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('0.0.0.0', 51820)); "
            "s.settimeout(120)\nfor _ in range(40):\n d, a = s.recvfrom(2048); s.sendto(d, a)"
        )
        vms.sh("vm-2", f'nohup python3 -c "{echo}" >/dev/null 2>&1 &')
        probe = (
            "import json, socket, time; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
            "s.bind(('0.0.0.0', 51820)); s.settimeout(5); r={}\n"
            f"for key, dst in (('relay', ('198.18.0.1', {port})), ('direct', ('198.18.0.102', 51820))):\n"
            " t=[]\n for i in range(8):\n  a=time.monotonic(); s.sendto(b'x', dst); s.recvfrom(64); "
            "t.append(time.monotonic()-a)\n r[key]=min(t)\nprint(json.dumps(r))"
        )
        time.sleep(5)  # the echo server's python starts slowly under TCG
        done = vms.sh("vm-1", f'python3 -c "{probe}"')
        assert done.returncode == 0, done.stderr
        rtt = json.loads(done.stdout)
        print(f"UDP round trip vm-1 -> vm-2: {rtt}")
        extra = rtt["relay"] - rtt["direct"]
        assert 0.9 * WAN_RTT <= extra <= WAN_RTT + 0.5, rtt
        tc = subprocess.run(
            ["tc", "-n", f"{vms.run}-wan", "qdisc", "show", "dev", f"{vms.run}-vm-1"], capture_output=True, text=True
        )
        assert "tbf" in tc.stdout and "100Mbit" in tc.stdout, tc.stdout

    def test_c_down_leaves_nothing(self, vms: Session) -> None:
        recs = vm.records(vms.state)
        assert len(recs) == 2
        started = time.monotonic()
        done = vms.json("hosts", "down")
        print(f"hosts down: {time.monotonic() - started:.1f} s, removed {done['removed']}")
        assert any(r.startswith("process") and "QEMU vm-1" in r for r in done["removed"]), done
        for rec in recs:
            assert not _running(rec.pid), f"QEMU {rec.pid} still runs"
            assert not Path(rec.dir).exists()
        assert not netns.exists(f"{vms.run}-wan")
        assert not (vms.state / "vm").exists()
        assert leftovers(vms.run) == []
        with store.transaction(vms.state, write=False) as conn:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            for table in ("vm_hosts", "vm_relays", "mesh", "mesh_hosts"):
                if table in tables:
                    assert conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == 0, table
