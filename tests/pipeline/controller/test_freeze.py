"""The freeze bound and stopped tasks, on real local hosts (runc, CRIU, wireguard-go, namespaces).

Each test runs the counter service with a second task beside it (a `sleep`) on local-1, and a client on
local-3 that fails on any lost or repeated answer. A stopped task is the real reproducer of a hung
checkpoint: CRIU's PTRACE_SEIZE of a stopped task in a frozen cgroup never returns. Before the freeze the
check stage refuses such a container; a task that stops after the check (the fault drill
`stop-task:checkpoint` stops the sleep right before the pause) hangs the checkpoint for real, and the
source's watchdog must end it within the bound: kill the stuck runc/CRIU, thaw, roll back. Waits are
"eventually, within a generous deadline", never timings.
"""

import functools
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from kit import wait
from kit.mesh import local_mesh
from skyferry.netplane.mesh import Mesh
from skyferry.pipeline import proctree
from skyferry.pipeline.controller import agentctl, containers, migration
from skyferry.pipeline.controller.journal import Journal
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.hostapi.spec import HOST_PROGRAMS
from skyferry.pipeline.scenarios import demo as scenario

pytestmark = [pytest.mark.integration, pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]
eventually = functools.partial(wait.eventually, timeout=90.0)  # a generous deadline, not a measurement
SKYFERRY = str(Path(sys.executable).parent / "skyferry")
SRC, DST, CLIENT = "local-1", "local-2", "local-3"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Mesh]]:
    with local_mesh(tmp_path_factory, prefix="z") as made:
        yield made


@pytest.fixture
def workload(mesh: tuple[Path, Mesh], tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[dict]:
    """The counter on local-1 with a `sleep` task beside it, and a client on local-3."""
    state, m = mesh
    name = "fz-" + re.sub(r"[^a-z0-9]+", "-", request.node.name.lower().removeprefix("test_"))[-24:].strip("-")
    rootfs = scenario.counter_rootfs(tmp_path)
    serve = f"sleep 1000000 & exec {scenario.PYTHON} /app/counter.py serve {scenario.PORT}"
    info = containers.run(state, SRC, name, ["/bin/sh", "-c", serve], rootfs=rootfs, host_dirs=list(HOST_PROGRAMS))
    client = scenario.CounterClient(m.hosts[CLIENT].netns or "", info["ip"], tmp_path).start()
    faults = Path(m.hosts[SRC].state_root) / "faults"
    try:
        yield {"state": state, "mesh": m, "name": name, "client": client, "faults": faults}
    finally:
        faults.unlink(missing_ok=True)
        client.stop()
        containers.remove(state, name)


def on(c: dict, host: str) -> list[dict]:
    found = agentctl.client(c["state"], c["mesh"], host).call("GET", "/v1/containers")
    return [x for x in found if x["name"] == c["name"]]


def sleep_task(c: dict) -> int:
    """The host pid of the container's `sleep` (the counter is its init)."""
    init = on(c, SRC)[0]["pid"]
    tasks = proctree.descendants(init)
    assert len(tasks) == 2, tasks
    return tasks[-1]


def running_once_on_source(c: dict) -> None:
    """Exactly one copy, on the source, thawed and unlocked; none on the target; the client got every
    answer on its one connection and still gets more."""
    assert on(c, DST) == []
    (here,) = on(c, SRC)
    assert here["state"] == "running" and not here["frozen_for_migration"], here
    client = c["client"]
    client.wait_for(client.progress() + 3)
    seen = client.stop()
    assert seen["survived"], seen["errors"]


def group_members(pgid: int) -> list[int]:
    members = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                stat = (proc / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[2]) == pgid:
                members.append(int(proc.name))
    return members


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SKYFERRY, *args], capture_output=True, text=True, env={**os.environ, **(env or {})})


def test_a_stopped_task_is_refused_before_the_freeze(workload: dict) -> None:
    c = workload
    task = sleep_task(c)
    os.kill(task, signal.SIGSTOP)
    try:
        eventually("the task is stopped", lambda: proctree.stopped([task]) != [])
        with pytest.raises(SkyferryError, match="CRIU cannot checkpoint") as refused:
            migration.migrate(c["state"], c["name"], DST)
        assert f"(pid {task}) is stopped" in str(refused.value) and "kill -CONT" in (refused.value.hint or "")
        mig = Journal(c["state"]).all()[-1]
        statuses = Journal(c["state"]).stage_status(mig.id)
        assert mig.state == "rolled-back" and "checkpoint" not in statuses, (mig.state, statuses)
        assert proctree.stopped([task]) != [], "the refusal left the stopped task alone"
    finally:
        os.kill(task, signal.SIGCONT)
    # Positive control: continued, the same container moves.
    assert migration.migrate(c["state"], c["name"], DST)["state"] == "done"
    assert on(c, SRC) == [] and on(c, DST)[0]["state"] == "running"


def test_a_hung_checkpoint_is_killed_and_thawed_at_the_bound(workload: dict) -> None:
    """The sleep stops right before the pause (after the check): CRIU's dump hangs in its PTRACE_SEIZE.
    With --freeze-timeout 3 the source's watchdog kills that CRIU, thaws the container
    and the migration rolls back, saying the freeze bound was hit."""
    c = workload
    task = sleep_task(c)
    c["faults"].write_text("stop-task:checkpoint\n")
    proc = cli("migrate", c["name"], "--to", DST, "--freeze-timeout", "3")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "the freeze bound (3 s) was hit" in proc.stderr, proc.stderr
    killed = re.search(r"process group (\d+)", proc.stderr)
    assert killed, f"the error names the stuck runc it killed: {proc.stderr}"
    eventually("the stuck runc/CRIU is gone", lambda: group_members(int(killed.group(1))) == [])
    mig = Journal(c["state"]).all()[-1]
    statuses = Journal(c["state"]).stage_status(mig.id)
    assert mig.state == "rolled-back" and statuses["checkpoint"] == "undone", (mig.state, statuses)
    assert "restore" not in statuses
    running_once_on_source(c)
    assert proctree.stopped([task]) != [], "the task the workload stopped stays stopped, and present"


def test_a_hung_restore_is_killed_at_the_bound_and_the_source_thaws(workload: dict) -> None:
    """The target's restore hangs (the drill `stop-engine:restore` stops its runc and CRIU the moment they
    start). With --freeze-timeout 5 the target kills its restore at the bound, the source's watchdog fences
    the target and thaws, and the migration rolls back: one copy, on the source; nothing on the target."""
    c = workload
    dst_faults = Path(c["mesh"].hosts[DST].state_root) / "faults"
    dst_faults.write_text("stop-engine:restore\n")
    try:
        proc = cli("migrate", c["name"], "--to", DST, "--mode", "precopy", "--freeze-timeout", "5")
    finally:
        dst_faults.unlink(missing_ok=True)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "freeze bound" in proc.stderr and "restore" in proc.stderr, proc.stderr
    killed = re.search(r"process group (\d+)", proc.stderr)
    assert killed, f"the error names the stopped restore it killed: {proc.stderr}"
    eventually("the stopped runc/CRIU is gone", lambda: group_members(int(killed.group(1))) == [])
    mig = Journal(c["state"]).all()[-1]
    statuses = Journal(c["state"]).stage_status(mig.id)
    # Once in a full run (2026-12-04, under the VM tests' load) the checkpoint's undo never finished and
    # the migration ended "failed"; not reproduced in five runs since, three beside two CPU burners. The
    # CLI's own account says which step refused, should it happen again.
    assert mig.state == "rolled-back", (mig.state, statuses, proc.stderr)
    assert statuses["restore"] == "undone" and statuses["checkpoint"] == "undone", statuses
    running_once_on_source(c)
    # Positive control: without the drill the same container moves.
    assert migration.migrate(c["state"], c["name"], DST, mode="precopy")["state"] == "done"
    assert on(c, SRC) == [] and on(c, DST)[0]["state"] == "running"


def _checkpointing(root: Path, name: str) -> list[int]:
    """The CRIU dump the source agent started for `name` and waits on (its children record): a `criu
    swrk` worker that runc's checkpoint request went to (pipeline/runtimes/runcdump.py), titled by CRIU
    `criu: dump --rpc -t PID` while it dumps."""
    found = []
    for entry in (root / "children" / "runc" / name).glob("*"):
        try:
            title = Path(f"/proc/{entry.name}/cmdline").read_bytes()
        except OSError:
            continue
        if b"dump --rpc" in title:
            found.append(int(entry.name))
    return found


def _agent_pid(state: Path, host: str) -> int:
    return int(json.loads((state / agentctl.PIDS).read_text())[host])


def _kill_and_reap(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    try:
        os.waitpid(pid, 0)  # our child (start_agents ran here, or we started the CLI)
    except ChildProcessError:
        eventually(f"pid {pid} is gone", lambda: not Path(f"/proc/{pid}").exists())


def test_a_source_agent_killed_mid_freeze_thaws_the_container_when_it_restarts(workload: dict) -> None:
    """Controller and source agent both SIGKILLed while the checkpoint hangs. The restarted agent finds its
    freeze record past the deadline, kills the CRIU the dead agent left hanging, fences the target and
    thaws the container; the controller's later `migrations resume` agrees and rolls back."""
    c = workload
    state, m, name = c["state"], c["mesh"], c["name"]
    src_root = Path(m.hosts[SRC].state_root)
    c["faults"].write_text("stop-task:checkpoint\n")
    controller = subprocess.Popen([SKYFERRY, "migrate", name, "--to", DST, "--freeze-timeout", "3"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        eventually("CRIU's dump hangs", lambda: _checkpointing(src_root, name) != [])
        (stuck,) = _checkpointing(src_root, name)
        mig = Journal(state).active_for(name)
        assert mig is not None
        _kill_and_reap(controller.pid)
        _kill_and_reap(_agent_pid(state, SRC))
    finally:
        if controller.poll() is None:
            controller.kill()
            controller.wait()
    c["faults"].unlink()
    assert group_members(stuck) != [], "with its agent dead, the hung CRIU hangs on"
    agentctl.start_agents(m, state)
    eventually("the container is thawed", lambda: on(c, SRC)[0]["state"] == "running")
    eventually("the restarted agent killed the CRIU its predecessor left", lambda: group_members(stuck) == [])
    record = json.loads((src_root / "freezes" / f"{mig.id}.json").read_text())
    assert record["expired"] and "thawed by the watchdog" in record["expired"], record
    resumed = cli("migrations", "resume", mig.id)
    assert resumed.returncode == 2 and "freeze bound" in resumed.stderr, resumed.stderr
    assert Journal(state).get(mig.id).state == "rolled-back"
    assert not (src_root / "freezes" / f"{mig.id}.json").exists(), "the rollback dropped the record"
    running_once_on_source(c)


def test_a_controller_that_dies_mid_freeze_leaves_no_frozen_container(workload: dict) -> None:
    """The controller dies right after the checkpoint: nobody will drive the migration. The source's own
    watchdog thaws the container at the bound; `migrations resume` then rolls back."""
    c = workload
    state, name = c["state"], c["name"]
    proc = cli("migrate", name, "--to", DST, "--freeze-timeout", "3", env={"SKYFERRY_CRASH_AFTER": "checkpoint"})
    assert proc.returncode == 137, proc.stderr
    mig = Journal(state).active_for(name)
    assert mig is not None and on(c, SRC)[0]["state"] == "paused"
    eventually("the container is thawed", lambda: on(c, SRC)[0]["state"] == "running")
    resumed = cli("migrations", "resume", mig.id)
    assert resumed.returncode == 2 and "freeze bound" in resumed.stderr, resumed.stderr
    assert Journal(state).get(mig.id).state == "rolled-back"
    running_once_on_source(c)
