"""`skyferry exit --plan` on real local hosts: "cloud A" is local-1 and local-2, "cloud B" local-3 and
local-4; the clients of every container live on local-5 and must keep their one connection throughout.

A 2-wave plan is interrupted right after wave 1 (the controller process dies), run again, and must then
finish wave 2 and decommission cloud A without migrating anything of wave 1 a second time.
"""

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from kit.runbook import COUNTER_CHECK, cli, client, counter, local_mesh, remove_all
from skyferry.netplane.mesh import Mesh
from skyferry.pipeline.controller import agentctl
from skyferry.pipeline.controller.journal import Journal
from skyferry.pipeline.controller.registry import Registry
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.runbooks import exitplan

pytestmark = [pytest.mark.integration, pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]
CLOUD_A, CLOUD_B = ("local-1", "local-2"), ("local-3", "local-4")
PLAN = """
name: leave-a
source: {hosts: [local-1, local-2]}
target: {provider: local, hosts: [local-3, local-4]}
waves:
  - name: first
    containers: [x1, x2]
    check: CHECK
  - name: second
    containers: [x3]
after: decommission
""".replace("CHECK", json.dumps(COUNTER_CHECK))  # a JSON string is a YAML string


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    with local_mesh(tmp_path_factory.mktemp("state"), 5) as m:
        yield m


@pytest.fixture
def fleet(mesh: Mesh, tmp_path: Path) -> Iterator[dict]:
    state = mesh.state
    assert state is not None
    clients = {}
    for name, host in (("x1", "local-1"), ("x2", "local-2"), ("x3", "local-1")):
        info = counter(state, host, name, tmp_path)
        clients[name] = client(mesh, "local-5", info["ip"], tmp_path)
    try:
        yield {"state": state, "mesh": mesh, "clients": clients, "plan": tmp_path / "plan.yaml"}
    finally:
        for c in clients.values():
            c.stop()
        remove_all(state)
        agentctl.start_agents(mesh, state)  # decommissioned hosts get their agents back for the next test


def test_two_waves_crash_between_them_and_resume(fleet: dict) -> None:
    state, mesh, plan = fleet["state"], fleet["mesh"], fleet["plan"]
    plan.write_text(PLAN)

    dry = cli("exit", "--plan", str(plan), "--dry-run", "--json")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    steps = {s["step"]: s for s in json.loads(dry.stdout)["steps"]}
    assert set(steps["wave:first"]["moves"]) == {"x1", "x2"} and set(steps["wave:first"]["moves"].values()) <= set(
        CLOUD_B
    )
    assert all(Registry(state).get(n).host in CLOUD_A for n in ("x1", "x2", "x3")), "a dry run moves nothing"

    crashed = cli("exit", "--plan", str(plan), "--json", env={"SKYFERRY_CRASH_AFTER": "wave:first"})
    assert crashed.returncode == 137, crashed.stdout + crashed.stderr
    assert {n: Registry(state).get(n).host in CLOUD_B for n in ("x1", "x2", "x3")} == {
        "x1": True, "x2": True, "x3": False,
    }  # fmt: skip
    first_ids = {m.container: m.id for m in Journal(state).all()}

    resumed = cli("exit", "--plan", str(plan), "--json")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    summary = json.loads(resumed.stdout)
    status = {s["step"]: s["status"] for s in summary["steps"]}
    assert status == {"provision": "skipped", "wave:first": "skipped", "wave:second": "done", "decommission": "done"}
    second = next(s for s in summary["steps"] if s["step"] == "wave:second")
    assert [t["passed"] for t in second["tests"]] == [True], "wave 2 was test-cut before its cutover"
    assert [h["ok"] for h in second["health"]] == [True]
    migrations = [(m.container, m.state) for m in Journal(state).all()]
    assert sorted(migrations) == [("x1", "done"), ("x2", "done"), ("x3", "done")], "nothing migrated twice"
    assert {m.container: m.id for m in Journal(state).all() if m.container != "x3"} == first_ids

    on_b = {  # cloud A's agents are gone now (decommissioned): ask cloud B
        c["name"]: host
        for host in CLOUD_B
        for c in agentctl.client(state, mesh, host).call("GET", "/v1/containers")
        if c["state"] == "running"
    }
    assert sorted(on_b) == ["x1", "x2", "x3"], "each runs exactly once, on cloud B"
    for host in CLOUD_A:
        with pytest.raises(SkyferryError, match="unreachable"):
            agentctl.client(state, mesh, host).call("GET", "/v1/facts", retry_for=0.2)
    for name, c in fleet["clients"].items():
        result = c.stop()
        assert result["survived"], (name, result["errors"])

    again = cli("exit", "--plan", str(plan), "--json")  # a finished plan is a no-op
    assert again.returncode == 0, again.stdout + again.stderr
    assert {s["status"] for s in json.loads(again.stdout)["steps"]} == {"skipped"}


def test_bad_plans_are_refused_before_anything_moves(fleet: dict) -> None:
    state, plan, text = fleet["state"], fleet["plan"], PLAN.replace("name: leave-a", "name: leave-b")
    migrations = len(Journal(state).all())
    plan.write_text(text.replace("[local-1, local-2]", "[local-1, local-9]"))
    proc = cli("exit", "--plan", str(plan))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "source.hosts[1]: unknown host 'local-9'" in proc.stderr
    plan.write_text(text.replace("containers: [x3]", "containers: [x3, x1]"))
    as_json = cli("exit", "--plan", str(plan), "--json")
    assert as_json.returncode == 2
    assert "waves[1].containers[1]: container 'x1' is already in wave 'first'" in json.loads(as_json.stdout)["error"]
    assert exitplan.Steps(state, "leave-b").all() == {}, "a refused plan records no progress"
    (Path(mesh_root(fleet, "local-3")) / "capacity.json").write_text('{"memory_mib": 1}')
    try:
        plan.write_text(text.replace("local-3, local-4", "local-3"))
        with pytest.raises(SkyferryError, match=r"target\.hosts: not enough memory on the targets: .* has 1 MiB"):
            exitplan.run(state, plan)
    finally:
        (Path(mesh_root(fleet, "local-3")) / "capacity.json").unlink()
    assert all(Registry(state).get(n).host in CLOUD_A for n in ("x1", "x2", "x3"))
    assert len(Journal(state).all()) == migrations, "a refused plan migrates nothing"


def mesh_root(fleet: dict, host: str) -> str:
    return fleet["mesh"].hosts[host].state_root


def test_a_crash_inside_a_wave_is_finished_from_the_journal(fleet: dict) -> None:
    state, plan = fleet["state"], fleet["plan"]
    plan.write_text(PLAN.replace("name: leave-a", "name: leave-c").replace("[x1, x2]", "[x1]").replace(
        "containers: [x3]", "containers: [x2]").replace("after: decommission", "after: keep"))  # fmt: skip
    before = len(Journal(state).all())
    crashed = cli("exit", "--plan", str(plan), "--json", env={"SKYFERRY_CRASH_AFTER": "checkpoint"})
    assert crashed.returncode == 137, crashed.stdout + crashed.stderr
    half = Journal(state).active_for("x1")
    assert half is not None, "x1 was frozen mid-migration when the controller died"

    resumed = cli("exit", "--plan", str(plan), "--json")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    status = {s["step"]: s["status"] for s in json.loads(resumed.stdout)["steps"]}
    assert status == {"provision": "skipped", "resume:x1": "done", "wave:first": "done", "wave:second": "done"}
    assert [m.id for m in Journal(state).all()[before:] if m.container == "x1"] == [half.id], "resumed, not redone"
    assert Registry(state).get("x1").host in CLOUD_B and Registry(state).get("x2").host in CLOUD_B
    for name in ("x1", "x2"):
        result = fleet["clients"][name].stop()
        assert result["survived"], (name, result["errors"])
