"""Auto mode and `migrate --estimate` end to end on real local hosts: runc, CRIU, wireguard-go, namespaces.

Which mode auto picks depends on what the rounds measure on this machine, so the tests check that it
picked one it may, said why, and journalled it (nothing here is timed); and that an estimate leaves no
trace: the container runs on, the journal keeps nothing, the target holds nothing.
"""

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from kit.mesh import counter_and_client, local_mesh, where
from skyferry.netplane import netns
from skyferry.netplane.mesh import Mesh
from skyferry.pipeline.controller import agentctl, freezecost, migration
from skyferry.pipeline.controller.journal import Journal
from skyferry.pipeline.hostapi.layout import IMAGES_TMPFS

pytestmark = [pytest.mark.integration, pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]
SKYFERRY = str(Path(sys.executable).parent / "skyferry")


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Mesh]]:
    with local_mesh(tmp_path_factory, prefix="ta") as made:
        yield made


@pytest.fixture
def counter(mesh: tuple[Path, Mesh], tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[dict]:
    """A counter container on local-1 (8 MiB it keeps dirtying) and a client on local-3 holding one
    connection to it."""
    with counter_and_client(mesh, tmp_path, request, memory_mib=8, dirty_mb_s=1) as made:
        yield made


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SKYFERRY, *args], capture_output=True, text=True, env={**os.environ, **(env or {})})


def test_auto_picks_a_mode_says_why_and_learns_the_pair(counter: dict) -> None:
    state, name = counter["state"], counter["name"]
    proc = cli("migrate", name, "--to", "local-2", "--json")  # no --mode: auto
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["state"] == "done" and report["mode_requested"] == "auto"
    assert report["mode"] in ("precopy", "hybrid")
    assert "--max-freeze 300 ms" in report["mode_reason"], report["mode_reason"]
    assert report["max_freeze_ms"] == 300 and report["predicted_freeze_ms"] > 0 and report["freeze_ms"] > 0
    assert set(report["stages_s"]) == {s.name for s in migration.plan("auto", report["mode"])}  # JSON: sorted
    assert report["rounds"] and report["precopy_stop"]
    # the choice is journalled with the rounds, so a resumed migration takes the same way
    precopy = next(t for t in Journal(state).transitions(report["id"]) if t["stage"] == "precopy" and t["detail"])
    assert precopy["detail"]["finish"] == report["mode"]
    assert set(precopy["detail"]["predicted"]) == {"stop-copy", "precopy", "hybrid", "postcopy"}
    # the pair's fixed cost is now measured, not the model's default
    assert report["mode"] in freezecost.fixed_ms(state, "local-1", "local-2")
    assert where(state, name)["host"] == "local-2"
    client = counter["client"]
    client.wait_for(client.progress() + 5)
    # an explicit mode is still obeyed, and says so
    back = migration.migrate(state, name, "local-1", mode="precopy", max_freeze_ms=5000)
    assert (back["mode"], back["mode_requested"], back["mode_reason"]) == ("precopy", "precopy", "--mode precopy")
    assert back["max_freeze_ms"] == 5000
    seen = client.stop()
    assert seen["survived"], seen["errors"]


def test_estimate_changes_nothing(counter: dict) -> None:
    state, name, m = counter["state"], counter["name"], counter["mesh"]
    journalled = [mig.id for mig in Journal(state).all()]
    on_target = Path(IMAGES_TMPFS, m.name, "local-2")
    before = sorted(p.name for p in on_target.iterdir()) if on_target.exists() else []
    proc = cli("migrate", name, "--to", "local-2", "--estimate", "--json")
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout)
    assert set(found["modes"]) == {"stop-copy", "precopy", "hybrid", "postcopy"}
    for mode, p in found["modes"].items():
        assert p["freeze_ms"] > 0 and p["total_s"] > 0 and p["bytes_wire"] > 0, mode
        assert p["available"], mode  # runc between two local hosts can do every mode
    assert found["modes"]["postcopy"]["lazy_bytes"] >= 8 << 20  # every page after the restore
    assert len(found["rounds"]) == 2 and found["measured"]["dirty_rate"] is not None
    assert found["auto"]["mode"] in ("precopy", "hybrid") and found["auto"]["mode_reason"]
    # nothing changed: still running on the source, nothing journalled, nothing on the target
    now = where(state, name)
    assert (now["host"], now["state"]) == ("local-1", "running")
    assert [mig.id for mig in Journal(state).all()] == journalled
    assert name not in [c["name"] for c in agentctl.client(state, m, "local-2").call("GET", "/v1/containers")]
    assert not netns.exists(f"{m.name}-local-2-{name}")
    assert sorted(p.name for p in on_target.iterdir()) == before if on_target.exists() else not before
    table = cli("migrate", name, "--to", "local-2", "--estimate")  # the same, for a person
    assert table.returncode == 0 and "auto would pick" in table.stdout, table.stderr
    assert where(state, name)["host"] == "local-1"
    seen = counter["client"].stop()
    assert seen["survived"], seen["errors"]


def test_an_estimate_whose_controller_died_is_cleared_by_rollback(counter: dict) -> None:
    state, name, m = counter["state"], counter["name"], counter["mesh"]
    crashed = cli("migrate", name, "--to", "local-2", "--estimate", env={"SKYFERRY_CRASH_AFTER": "precopy"})
    assert crashed.returncode == 137, crashed.stderr
    left = Journal(state).active_for(name)
    assert left is not None and left.mode == "estimate"  # it holds the container: no migration meanwhile
    assert cli("migrate", name, "--to", "local-2").returncode == 2
    assert cli("migrations", "resume", left.id).returncode == 2  # an estimate is never finished
    undone = cli("migrations", "rollback", left.id, "--json")
    assert undone.returncode == 0 and json.loads(undone.stdout)["state"] == "rolled-back", undone.stderr
    assert Journal(state).active_for(name) is None and left.id not in [mig.id for mig in Journal(state).all()]
    assert where(state, name)["host"] == "local-1" and where(state, name)["state"] == "running"
    assert not netns.exists(f"{m.name}-local-2-{name}")
    assert not Path(IMAGES_TMPFS, m.name, "local-2", left.id).exists()
    seen = counter["client"].stop()
    assert seen["survived"], seen["errors"]
