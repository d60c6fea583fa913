"""Test cutover on real local hosts: a clone restored on the target in an isolated netns, checked, discarded.

The source keeps running (same pid, its client's connection alive); the target ends with no clone, no
netns and no images; routes, registry and journal never change.
"""

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from kit.runbook import COUNTER_CHECK, cli, client, counter, local_mesh
from skyferry.netplane import netns
from skyferry.netplane.mesh import Mesh
from skyferry.pipeline.controller import agentctl, containers
from skyferry.pipeline.controller.journal import Journal
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.runbooks import testcutover

pytestmark = [pytest.mark.integration, pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """3 hosts; a counter on local-1 with a client on local-3 holding one connection all module long."""
    work = tmp_path_factory.mktemp("work")
    with local_mesh(tmp_path_factory.mktemp("state"), 3) as mesh:
        state = mesh.state
        assert state is not None
        info = counter(state, "local-1", "web", work)
        watcher = client(mesh, "local-3", info["ip"], work)
        try:
            yield {"state": state, "mesh": mesh, "ip": info["ip"], "client": watcher}
        finally:
            watcher.stop()
            containers.remove(state, "web")


def target_is_clean(state: Path, mesh: Mesh, host: str) -> None:
    names = [c["name"] for c in agentctl.client(state, mesh, host).call("GET", "/v1/containers")]
    assert names == [], f"{host} still runs {names}"
    assert not netns.exists(f"{mesh.name}-{host}-web.test"), "the clone's netns must be gone"
    assert not list(Path("/dev/shm/skyferry", mesh.name, host).rglob("*.img")), "clone images must be wiped"
    assert not (Path(mesh.hosts[host].state_root) / "containers" / "web.test").exists(), "bundle must be gone"


def test_a_healthy_clone_passes_and_nothing_changes(served: dict) -> None:
    state, mesh, watcher = served["state"], served["mesh"], served["client"]
    homes, migrations = Mesh.load(state).homes, len(Journal(state).all())
    pid = agentctl.client(state, mesh, "local-1").call("GET", "/v1/containers/web")["pid"]

    report = testcutover.run(state, "web", "local-2", COUNTER_CHECK)

    assert report["passed"], json.dumps(report, indent=1)
    assert report["health"]["running"] and report["health"]["rc"] == 0
    assert report["source_untouched"] and report["target_clean"]
    assert report["bytes_wire"] > 0 and report["pause_s"] > 0
    now = agentctl.client(state, mesh, "local-1").call("GET", "/v1/containers/web")
    assert (now["pid"], now["state"], now["frozen_for_migration"]) == (pid, "running", False)
    assert Mesh.load(state).homes == homes, "a test cutover must not move any route"
    assert len(Journal(state).all()) == migrations, "a test cutover is not a migration"
    target_is_clean(state, mesh, "local-2")
    progress = watcher.progress()
    watcher.wait_for(progress + 5)  # the source's client keeps talking on its one connection


def test_a_failing_check_is_reported_and_the_clone_still_goes(served: dict) -> None:
    state, mesh = served["state"], served["mesh"]
    proc = cli("migrate", "web", "--to", "local-2", "--test", "--check", "echo broken >&2; exit 3", "--json")
    assert proc.returncode == 1, proc.stderr
    report = json.loads(proc.stdout)
    assert not report["passed"] and report["health"]["rc"] == 3
    assert "exit 3" in report["error"] and "broken" in report["error"]
    assert report["source_untouched"] and report["target_clean"]
    target_is_clean(state, mesh, "local-2")


def test_cli_passes_and_bad_input_is_refused(served: dict) -> None:
    state, mesh, watcher = served["state"], served["mesh"], served["client"]
    ok = cli("migrate", "web", "--to", "local-2", "--test", "--check", COUNTER_CHECK, "--json")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    passed = json.loads(ok.stdout)
    assert passed["passed"] and json.loads((Path(passed["report_dir"]) / "summary.json").read_text())["passed"]
    with pytest.raises(SkyferryError, match="runs on local-1"):
        testcutover.run(state, "web", "local-1")
    refused = cli("migrate", "web", "--to", "local-2", "--check", "true")
    assert refused.returncode == 2 and "--check only applies to a test cutover" in refused.stderr
    target_is_clean(state, mesh, "local-2")
    seen = watcher.stop()
    assert seen["survived"], seen["errors"]
