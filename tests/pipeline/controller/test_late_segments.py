"""Client segments in flight towards the frozen source when the cutover moves their route arrive there up to
one WAN hop later, after the source handed over what its lock had dropped. Right after the restore the
source hands those over as well, and the live target delivers them at once (pipeline/agent/holdback.py).

Real runc, CRIU, wireguard-go and namespaces, on a 100 ms WAN (50 ms a hop); a sender on local-3 writes a
request every 2 ms on one connection without waiting for the answers, so segments are always in flight."""

import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kit.mesh import counter_and_client, local_mesh
from skyferry.netplane.mesh import Mesh
from skyferry.netplane.netns import in_netns
from skyferry.pipeline.controller import migration
from skyferry.pipeline.controller.journal import Journal
from skyferry.pipeline.scenarios.demo import PORT

pytestmark = [pytest.mark.integration, pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Mesh]]:
    with local_mesh(tmp_path_factory, prefix="l", wan="rate=1gbit,rtt=100ms") as made:
        yield made


class Pipelined:
    """Requests every 2 ms on one connection from `netns`, the answers read as they come and checked."""

    def __init__(self, netns: str, ip: str) -> None:
        with in_netns(netns):
            self.sock = socket.create_connection((ip, PORT), timeout=20)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(None)
        self.stop, self.sent, self.answered, self.errors = threading.Event(), 0, 0, []
        self.threads = [threading.Thread(target=f, daemon=True) for f in (self._send, self._read)]
        for t in self.threads:
            t.start()

    def _send(self) -> None:
        while not self.stop.is_set():
            self.sock.sendall(b"%d\n" % (self.sent + 1))
            self.sent += 1
            time.sleep(0.002)

    def _read(self) -> None:
        with self.sock.makefile("rb") as f:
            while self.answered < self.sent or not self.stop.is_set():
                reply = f.readline().split()
                expected = [b"%d" % (self.answered + 1)] * 2
                if reply != expected:
                    self.errors.append(f"answer {self.answered + 1}: {reply!r}")
                    return
                self.answered += 1

    def finish(self) -> None:
        self.stop.set()
        self.threads[0].join()
        self.threads[1].join(timeout=30)
        self.sock.close()


def test_segments_that_reach_the_source_after_its_hand_over_are_delivered(
    mesh: tuple[Path, Mesh], tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    with counter_and_client(mesh, tmp_path, request) as c:
        state, m = c["state"], c["mesh"]
        sender = Pipelined(m.hosts["local-3"].netns or "", c["ip"])
        try:
            time.sleep(1.0)  # a steady stream, and its round trips measured
            report = migration.migrate(state, c["name"], "local-2", mode="precopy")
            time.sleep(1.0)
        finally:
            sender.finish()
        client = c["client"].stop()
    assert report["state"] == "done", report
    confirm = [t for t in Journal(state).transitions(report["id"]) if t["stage"] == "confirm"][-1]["detail"]
    # Segments did reach the source after its hand-over (a hop is 50 ms, and the hand-over follows the
    # cutover within a few), and were passed on once the target had restored.
    assert confirm["segments_late"] >= 1, confirm
    assert sender.errors == [] and sender.answered == sender.sent > 500, (sender.errors, sender.sent)
    assert client["survived"] and client["errors"] == [], client
