"""The VM session's last tests, in this order: they end it. A target VM is lost mid-migration (vm-2 stays
dead), the WAN relay is timed from vm-1 to the namespace host (it takes vm-1's WireGuard down), and
`hosts down` must leave nothing behind. The file name sorts after every other VM test module.
"""

import json
import os
import signal
import subprocess
import sys
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


# Prints, as JSON, how long the relay held each probe: its arrival from vm-1 (to the relay port) to its
# departure for local-1 (from the relay port to local-1's WireGuard endpoint). Packet sockets see both ends.
SNIFF = """
import json, socket, struct, sys, time
port, target, wg = int(sys.argv[1]), socket.inet_aton(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3)); s.settimeout(30)
seen_in, seen_out = {}, {}
try:
    while len(seen_out) < 8:
        frame = s.recv(2048); now = time.monotonic()
        if frame[12:14] != b"\\x08\\x00" or frame[23] != 17: continue
        ihl = (frame[14] & 15) * 4; udp = 14 + ihl
        sport, dport = struct.unpack("!HH", frame[udp:udp + 4]); data = frame[udp + 8:]
        if not data.startswith(b"skyferry-probe-"): continue
        if dport == port: seen_in.setdefault(data, now)
        elif sport == port and frame[30:34] == target and dport == wg: seen_out.setdefault(data, now)
except TimeoutError:
    pass
print(json.dumps([seen_out[k] - seen_in[k] for k in sorted(seen_out) if k in seen_in]))
"""


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

    def test_b_relay_holds_each_datagram_half_the_wan_rtt(self, vms: Session) -> None:
        """vm-1's datagrams to the relay port of (vm-1, local-1) leave for local-1 rtt/2 later.

        Timed where the relay runs (a packet socket in the switch's netns sees each datagram arrive
        from vm-1 and leave for local-1), so a slow TCG guest cannot blur it. vm-2 is dead by now.
        """
        mesh = Mesh.load(vms.state)
        assert mesh.wan is not None and mesh.local is not None
        port = mesh.wan.relay_ports[mesh.wan.pair("vm-1", "local-1")]
        assert mesh.peer_endpoint(mesh.host("vm-1"), mesh.host("local-1")) == f"198.18.0.1:{port}"
        target, wg = mesh.host("local-1").endpoint.rsplit(":", 1)
        # The relay takes only datagrams from vm-1's WireGuard port; free it.
        vms.sh("vm-1", "ip link del skyferry 2>/dev/null; true")
        sniff = subprocess.Popen(
            ["ip", "netns", "exec", mesh.local.switch_netns, sys.executable, "-c", SNIFF, str(port), target, wg],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            time.sleep(1)
            probe = (
                "import socket, time; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
                "s.bind(('0.0.0.0', 51820))\n"
                f"for i in range(8):\n s.sendto(b'skyferry-probe-%d' % i, ('198.18.0.1', {port})); time.sleep(0.3)"
            )
            done = vms.sh("vm-1", f'python3 -c "{probe}"')
            assert done.returncode == 0, done.stderr
            out, _ = sniff.communicate(timeout=60)
        finally:
            if sniff.poll() is None:
                sniff.kill()
                sniff.wait()
        held = json.loads(out)
        print(f"relay hold per datagram, vm-1 -> local-1: {held}")
        assert len(held) >= 6, held
        assert all(WAN_RTT / 2 * 0.8 <= h <= WAN_RTT / 2 + 1.0 for h in held), held
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
