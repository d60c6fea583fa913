"""`skyferry evacuate` on real local hosts: 4 hosts, local-1 emptied onto local-2 and local-3, clients on local-4.

Every container must end up running exactly once with its client's one connection intact, also when one
migration fails in the middle (rolled back, the rest finish; a re-run moves it) and when the controller
crashes mid-evacuation (a re-run finishes that migration from the journal, then the rest).
"""

import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from kit.runbook import cli, client, counter, local_mesh, remove_all, running
from skyferry.netplane import routes
from skyferry.netplane.ipam import Ipam
from skyferry.netplane.mesh import Mesh
from skyferry.pipeline.controller import agentctl
from skyferry.pipeline.controller.journal import Journal
from skyferry.pipeline.controller.registry import Registry
from skyferry.pipeline.runbooks import evacuate

pytestmark = [pytest.mark.integration, pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]
TARGETS = ("local-2", "local-3")


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    with local_mesh(tmp_path_factory.mktemp("state"), 4) as m:
        yield m


@pytest.fixture
def fleet(mesh: Mesh, tmp_path: Path) -> Iterator[dict]:
    """Counters on local-1 (priorities set by the test), each with a client on local-4."""
    state = mesh.state
    assert state is not None
    made: dict = {"state": state, "mesh": mesh, "clients": {}}

    def start(name: str, priority: int) -> None:
        info = counter(state, "local-1", name, tmp_path, labels={"priority": str(priority)})
        made["clients"][name] = client(mesh, "local-4", info["ip"], tmp_path)

    made["start"] = start
    try:
        yield made
    finally:
        for c in made["clients"].values():
            c.stop()
        remove_all(state)


def all_alive(fleet: dict) -> None:
    """Each client gets answers on its one connection (wait_for raises if a client died or stalled)."""
    for c in fleet["clients"].values():
        c.wait_for(c.progress() + 3)


def exactly_once_on_targets(fleet: dict, names: list[str]) -> None:
    seen = running(fleet["state"], fleet["mesh"])
    for name in names:
        assert len(seen.get(name, [])) == 1 and seen[name][0] in TARGETS, f"{name} runs on {seen.get(name)}"
        assert Registry(fleet["state"]).get(name).host == seen[name][0]


def test_one_failure_rolls_back_alone_and_a_rerun_finishes(fleet: dict) -> None:
    state, mesh = fleet["state"], fleet["mesh"]
    for name, prio in (("ev-a", 1), ("ev-b", 9), ("ev-c", 5), ("ev-d", 0)):
        fleet["start"](name, prio)

    dry = cli("evacuate", "--host", "local-1", "--to", "local-2", "--to", "local-3", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    planned = json.loads(dry.stdout)["plan"]["moves"]
    assert [m["container"] for m in planned] == ["ev-b", "ev-c", "ev-a", "ev-d"], "priority first"
    assert {m["target"] for m in planned} == set(TARGETS), "placement spreads over both targets"
    assert all(Registry(state).get(n).host == "local-1" for n in fleet["clients"]), "a dry run moves nothing"

    victim, faults = "ev-c", {}

    def inject(name: str, stage: str) -> None:
        """Fail the victim's image stream into its target (checkpointed, frozen: mid-way), once; the
        others never see the fault. Armed as its checkpoint begins: after pre-copy rounds the final
        stream leaves as the checkpoint answers (stop-copy's waits for the transfer)."""
        if name != victim:
            return
        if stage == "checkpoint":
            mig = Journal(state).active_for(name)
            assert mig is not None
            faults["file"] = Path(mesh.hosts[mig.target].state_root) / "faults"
            faults["file"].write_text("receive\nprecopy-final\n")  # the final stream, stop-copy or pre-copy
        elif stage.startswith("undo") and "file" in faults:
            faults["file"].unlink(missing_ok=True)

    try:
        summary = evacuate.evacuate(state, "local-1", list(TARGETS), parallel=1, progress=inject)
    finally:
        if "file" in faults:
            faults["file"].unlink(missing_ok=True)
    assert not summary["ok"] and summary["remaining"] == [victim]
    states = {r["container"]: r["state"] for r in summary["results"]}
    assert states == {"ev-a": "done", "ev-b": "done", "ev-c": "rolled-back", "ev-d": "done"}
    error = next(r for r in summary["results"] if r["container"] == victim)["error"]
    assert "failed at transfer" in error and f"Rolled back: {victim} runs on local-1" in error
    assert running(state, mesh)[victim] == ["local-1"], "the failed one runs on its source, once"
    exactly_once_on_targets(fleet, ["ev-a", "ev-b", "ev-d"])
    all_alive(fleet)

    again = cli("evacuate", "--host", "local-1", "--to", "local-2", "--to", "local-3", "--parallel", "2",
                "--bandwidth", "1gbit", "--json")  # fmt: skip
    assert again.returncode == 0, again.stdout + again.stderr
    rerun = json.loads(again.stdout)
    assert rerun["ok"] and [r["container"] for r in rerun["results"]] == [victim], "only what was left moves"
    pace = rerun["bandwidth"]
    assert pace["budget_bps"] == 10**9 and pace["link_bps"]["1"] > 0, "its one stream measured the link"
    exactly_once_on_targets(fleet, list(fleet["clients"]))
    all_alive(fleet)
    report_dir = Path(rerun["report_dir"])
    pngs = list(report_dir.glob("*.png"))
    assert len(pngs) == 1 and pngs[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((report_dir / "summary.json").read_text())["ok"]
    nothing = cli("evacuate", "--host", "local-1", "--json")  # idempotent: an empty host is a no-op
    assert nothing.returncode == 0 and json.loads(nothing.stdout)["results"] == []
    for name, c in fleet["clients"].items():
        seen = c.stop()
        assert seen["survived"], (name, seen["errors"])


@pytest.mark.parametrize("crash", ["after the cutover", "inside the pre-copy rounds"])
def test_a_crash_mid_evacuation_resumes_from_the_journal(fleet: dict, crash: str) -> None:
    """Two migrations in flight when the controller dies (at a stage's end, or inside the rounds while the
    agents still stream for it: the targets hold a round back a second, the `stall` drill): the re-run
    finishes both, then the rest."""
    state, mesh = fleet["state"], fleet["mesh"]
    before = {m.id for m in Journal(state).all()}  # the mesh outlives each test, and the names repeat
    for name, prio in (("ev-e", 2), ("ev-f", 1), ("ev-g", 0)):
        fleet["start"](name, prio)
    stalls = [Path(mesh.hosts[t].state_root) / "faults" for t in TARGETS]
    env = {"SKYFERRY_CRASH_AFTER": "cutover"}
    if crash == "inside the pre-copy rounds":
        env = {"SKYFERRY_CRASH_DURING": "precopy:0.3"}
        for path in stalls:
            path.write_text("stall:precopy-round\n")
    try:
        crashed = cli("evacuate", "--host", "local-1", "--parallel", "2", "--json", env=env)
    finally:
        for path in stalls:
            path.unlink(missing_ok=True)
    assert crashed.returncode == 137, crashed.stderr
    half = {m.container: m.id for m in Journal(state).all() if m.state == "running"}
    assert half and set(half) <= {"ev-e", "ev-f"}, f"the two highest priorities were in flight: {half}"

    resumed = cli("evacuate", "--host", "local-1", "--to", "local-2", "--to", "local-3", "--parallel", "2", "--json")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    results = {r["container"]: r for r in json.loads(resumed.stdout)["results"]}
    assert {n: r["state"] for n, r in results.items()} == {"ev-e": "done", "ev-f": "done", "ev-g": "done"}
    for name, mig_id in half.items():
        assert results[name]["resumed"] == mig_id
        mine = [m.id for m in Journal(state).all() if m.container == name and m.id not in before]
        assert mine == [mig_id], "resumed, not redone"
    exactly_once_on_targets(fleet, ["ev-e", "ev-f", "ev-g"])
    for name, c in fleet["clients"].items():
        seen = c.stop()
        assert seen["survived"], (name, seen["errors"])


def test_concurrent_publishes_keep_every_home(mesh: Mesh) -> None:
    """Parallel migrations each publish from a Mesh they loaded earlier; none may undo another's route."""
    state = mesh.state
    assert state is not None
    ipam = Ipam(state)
    ips = [ipam.allocate(f"test:lock-{i}") for i in range(6)]
    stale = [Mesh.load(state) for _ in ips]  # all loaded before any publish, like parallel migrations
    try:
        threads = [
            threading.Thread(target=routes.publish, args=(m, ip, TARGETS[i % 2], agentctl.Pusher(state, m)))
            for i, (m, ip) in enumerate(zip(stale, ips, strict=True))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        homes = Mesh.load(state).homes
        assert {ip: homes.get(ip) for ip in ips} == {ip: TARGETS[i % 2] for i, ip in enumerate(ips)}
    finally:
        for ip in ips:
            fresh = Mesh.load(state)
            routes.withdraw(fresh, ip, agentctl.Pusher(state, fresh))
            ipam.release(ip)
    assert not set(ips) & set(Mesh.load(state).homes)
