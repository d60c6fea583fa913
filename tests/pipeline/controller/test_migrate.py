"""Live migration end to end on real local hosts: runc, CRIU, wireguard-go, network namespaces.

One mesh of three hosts serves the whole module; every test starts its own counter container with a
client on local-3 that fails on any lost or repeated request, and removes the container afterwards.
"""

import io
import json
import os
import re
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from kit import imagescan
from kit.mesh import counter_and_client, local_mesh, lose_source_during_lazy_phase, where
from skyferry.netplane import netns
from skyferry.netplane.errors import NetplaneError
from skyferry.netplane.mesh import Mesh
from skyferry.pipeline.agent import settle
from skyferry.pipeline.controller import agentctl, containers, migration
from skyferry.pipeline.controller.journal import Journal
from skyferry.pipeline.controller.registry import Registry
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.hostapi.layout import AGENT_PORT, IMAGES_TMPFS
from skyferry.pipeline.runtimes.runc import Runc
from skyferry.pipeline.scenarios import demo as scenario

pytestmark = [pytest.mark.integration, pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]
SKYFERRY = str(Path(sys.executable).parent / "skyferry")


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Mesh]]:
    with local_mesh(tmp_path_factory) as made:
        yield made


@pytest.fixture
def counter(mesh: tuple[Path, Mesh], tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[dict]:
    """A counter container on local-1 and a client on local-3 holding one connection to it."""
    with counter_and_client(mesh, tmp_path, request) as made:
        yield made


def host_containers(state: Path, m: Mesh, host: str) -> list[str]:
    return [c["name"] for c in agentctl.client(state, m, host).call("GET", "/v1/containers")]


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SKYFERRY, *args], capture_output=True, text=True, env={**os.environ, **(env or {})})


def _cgroups(pid: int) -> set[str]:
    """The cgroup path of `pid` in every hierarchy it is in (v1's several, or v2's one)."""
    return {line.split(":", 2)[2] for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines()}


def test_migration_keeps_ip_and_connection_there_and_back(counter: dict) -> None:
    state, name, m = counter["state"], counter["name"], counter["mesh"]
    assert _cgroups(where(state, name)["pid"]) == {f"/skyferry/{m.name}/local-1/{name}"}  # control
    report = migration.migrate(state, name, "local-2")
    assert report["state"] == "done" and report["freeze_ms"] > 0 and report["bytes_wire"] > 0
    assert report["mode_requested"] == "auto" and report["mode"] in ("precopy", "hybrid")  # the default
    assert list(report["stages_s"]) == [s.name for s in migration.plan("auto", report["mode"])]
    assert report["rounds"] and report["bytes_at_freeze"] < report["rounds"][0]["bytes_out"]
    parts = report["freeze_parts_ms"]  # where the freeze went: its parts add up to it
    assert parts["dump"] > 0 and parts["restore"] > 0 and all(v >= 0 for v in parts.values()), parts
    assert abs(sum(parts.values()) - report["freeze_ms"]) < 2, (parts, report["freeze_ms"])
    now = where(state, name)
    assert (now["host"], now["ip"], now["state"]) == ("local-2", counter["ip"], "running")
    # CRIU leaves cgroups alone (manage-cgroups=ignore): the tasks are in runc's cgroup of the target.
    assert _cgroups(now["pid"]) == {f"/skyferry/{m.name}/local-2/{name}"}
    assert name not in host_containers(state, m, "local-1")
    assert not netns.exists(f"{m.name}-local-1-{name}"), "the source's netns must be gone after confirm"
    assert Mesh.load(state).homes[counter["ip"]] == "local-2"
    # CRIU took skyferry's options from the bundle's criu.conf (runc's org.criu.config) on both ends: the
    # agent's own nftables lock stands in for CRIU's, which cost ~75 ms of iptables in each restore, and
    # CRIU mounted no cgroup hierarchy to walk.
    for host, log in (("local-1", "work-dump.log"), ("local-2", "work1-restore.log")):
        text = (Path(m.hosts[host].state_root) / "logs" / report["id"] / log).read_text()
        assert f"values from {m.hosts[host].state_root}/containers/{name}/criu.conf" in text, host
        assert "cg: adding cgroup" not in text and "cg: Preparing cgroups yard" not in text, host

    # The target restored as the transfer's last request arrived: the controller never asked it to.
    assert _restore_rode_on_the_transfer(state, m, "local-2", report["id"])
    # After a pre-copy finish the final deltas left as the checkpoint answered, while the controller cut
    # over, not with the transfer's call (which then only handed over the segments and the restore order);
    # a hybrid finish sends its final with the transfer (SourceSession.send_finals).
    ahead = _transfer_done(state, report["id"]).get("finals_ahead_s")
    assert ahead is not None and ahead > 0 if report["mode"] == "precopy" else ahead is None, (report["mode"], ahead)

    client = counter["client"]
    client.wait_for(client.progress() + 5)  # the same connection carries requests after the move
    back = migration.migrate(state, name, "local-1", mode="stop-copy")
    assert back["state"] == "done" and back["rounds"] == []
    assert "finals_ahead_s" not in _transfer_done(state, back["id"]), "control: stop-copy's one stream waits"
    assert _restore_rode_on_the_transfer(state, m, "local-1", back["id"])
    client.wait_for(client.progress() + 5)
    seen = client.stop()
    assert seen["survived"], seen["errors"]
    assert where(state, name)["host"] == "local-1"
    assert not list(Path("/dev/shm/skyferry", m.name).rglob("*.img")), "checkpoint images must be wiped"


def _transfer_done(state: Path, mig_id: str) -> dict:
    (done,) = [t for t in Journal(state).transitions(mig_id) if (t["stage"], t["status"]) == ("transfer", "done")]
    return done["detail"]


def _restore_rode_on_the_transfer(state: Path, m: Mesh, target: str, mig_id: str) -> bool:
    """The journal's restore came with the transfer's answer, and the target's agent served no restore
    request of its own (the positive control: it logs the hold that carried it)."""
    done = [t for t in Journal(state).transitions(mig_id) if t["stage"] == "restore" and t["status"] == "done"]
    log = (Path(m.hosts[target].state_root) / "agent.log").read_text(errors="replace")
    assert f"POST /v1/migrations/{mig_id}/hold" in log, "the agent log names every request"
    return (
        len(done) == 1
        and done[0]["detail"]["with_transfer"]
        and done[0]["detail"]["restore_s"] > 0
        and f"/v1/migrations/{mig_id}/restore" not in log
    )


@pytest.mark.parametrize("mode", ["precopy", "hybrid", "postcopy"])
def test_restore_failure_rolls_back_to_the_source(counter: dict, mode: str) -> None:
    """Also in the lazy modes, whose source serves pages until the target hangs up: the target's pager
    is already connected when the restore fails, and undoing it must not end the frozen source."""
    state, name, m = counter["state"], counter["name"], counter["mesh"]
    faults = Path(m.hosts["local-2"].state_root) / "faults"
    faults.write_text("restore\n")
    try:
        with pytest.raises(SkyferryError, match=r"failed at restore.*Rolled back"):
            migration.migrate(state, name, "local-2", mode=mode)
    finally:
        faults.unlink()
    now = where(state, name)
    assert (now["host"], now["state"]) == ("local-1", "running")
    assert name not in host_containers(state, m, "local-2")
    assert not netns.exists(f"{m.name}-local-2-{name}")
    assert Journal(state).all()[-1].state == "rolled-back"
    seen = counter["client"].stop()
    assert seen["survived"], seen["errors"]


@pytest.mark.parametrize("crash_after", ["precopy", "checkpoint", "transfer", "cutover", "restore"])
def test_controller_crash_then_resume(counter: dict, crash_after: str) -> None:
    state, name = counter["state"], counter["name"]
    proc = cli("migrate", name, "--to", "local-2", "--json", env={"SKYFERRY_CRASH_AFTER": crash_after})
    assert proc.returncode == 137, proc.stderr
    mig = Journal(state).active_for(name)
    assert mig is not None and mig.state == "running"
    # Before the checkpoint: not frozen yet; after the transfer, which carries the restore: live on the target.
    frozen = crash_after in ("checkpoint", "cutover")
    assert where(state, name)["state"] == ("frozen (migrating)" if frozen else "running")
    resumed = cli("migrations", "resume", mig.id, "--json")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["state"] == "done"
    assert where(state, name)["host"] == "local-2"
    seen = counter["client"].stop()
    assert seen["survived"], seen["errors"]


@pytest.mark.parametrize("crash_after", ["prepare", "checkpoint", "cutover"])
def test_controller_crash_then_rollback(counter: dict, crash_after: str) -> None:
    state, name, m = counter["state"], counter["name"], counter["mesh"]
    proc = cli("migrate", name, "--to", "local-2", env={"SKYFERRY_CRASH_AFTER": crash_after})
    assert proc.returncode == 137, proc.stderr
    mig = Journal(state).active_for(name)
    assert mig is not None
    undone = cli("migrations", "rollback", mig.id, "--json")
    assert undone.returncode == 0, undone.stderr
    assert json.loads(undone.stdout)["state"] == "rolled-back"
    now = where(state, name)
    assert (now["host"], now["state"]) == ("local-1", "running")
    assert name not in host_containers(state, m, "local-2")
    assert Mesh.load(state).homes[counter["ip"]] == "local-1"
    seen = counter["client"].stop()
    assert seen["survived"], seen["errors"]
    again = cli("migrations", "rollback", mig.id, "--json")  # idempotent
    assert again.returncode == 0 and json.loads(again.stdout)["state"] == "rolled-back"


@pytest.mark.parametrize(
    ("stage", "host", "stalled", "then"),
    [("precopy", "local-2", "precopy-round", "resume"), ("precopy", "local-2", "precopy-round", "rollback"),
     ("checkpoint", "local-1", "checkpoint", "resume"), ("checkpoint", "local-1", "checkpoint", "rollback"),
     ("transfer", "local-2", "precopy-final", "resume"), ("prepare", "local-2", "prepare", "resume"),
     ("prepare", "local-2", "prepare", "rollback"), ("confirm", "local-1", "confirm", "resume"),
     ("cleanup", "local-2", "cleanup", "resume"), ("cutover", "local-3", "peers", "resume"),
     ("cutover", "local-3", "peers", "rollback"), ("check", "local-2", "facts", "resume"),
     ("check", "local-2", "facts", "rollback")],
)  # fmt: skip
def test_controller_killed_inside_a_stage(counter: dict, stage: str, host: str, stalled: str, then: str) -> None:
    """The controller dies inside a stage while its agents still work for it (an agent holds the step or
    its stream back a second: the `stall` drill); `migrations resume` or `rollback` then ends it with the
    container running once, its client's connection alive."""
    state, name, m = counter["state"], counter["name"], counter["mesh"]
    faults = Path(m.hosts[host].state_root) / "faults"
    faults.write_text(f"stall:{stalled}\n")
    try:
        proc = cli("migrate", name, "--to", "local-2", env={"SKYFERRY_CRASH_DURING": f"{stage}:0.3"})
        assert proc.returncode == 137, proc.stderr
        mig = Journal(state).active_for(name)
        assert mig is not None and Journal(state).stage_status(mig.id)[stage] == "started", "killed inside it"
        ended = cli("migrations", then, mig.id, "--json")
        assert ended.returncode == 0, ended.stderr
    finally:
        faults.unlink(missing_ok=True)
    home = "local-2" if then == "resume" else "local-1"
    assert json.loads(ended.stdout)["state"] == ("done" if then == "resume" else "rolled-back")
    now = where(state, name)
    assert (now["host"], now["state"]) == (home, "running")
    assert host_containers(state, m, home).count(name) == 1
    assert name not in host_containers(state, m, "local-1" if home == "local-2" else "local-2")
    seen = counter["client"].stop()
    assert seen["survived"], seen["errors"]


def test_rollback_is_refused_after_the_point_of_no_return(counter: dict) -> None:
    state, name = counter["state"], counter["name"]
    proc = cli("migrate", name, "--to", "local-2", env={"SKYFERRY_CRASH_AFTER": "restore"})
    assert proc.returncode == 137
    mig = Journal(state).active_for(name)
    assert mig is not None
    refused = cli("migrations", "rollback", mig.id)
    assert refused.returncode == 2 and "point of no return" in refused.stderr
    assert where(state, name)["host"] == "local-2"
    assert cli("migrations", "resume", mig.id).returncode == 0
    seen = counter["client"].stop()
    assert seen["survived"], seen["errors"]


def test_bad_input_changes_nothing(counter: dict) -> None:
    state, name = counter["state"], counter["name"]
    with pytest.raises(SkyferryError, match="unknown container 'nope'"):
        migration.migrate(state, "nope", "local-2")
    with pytest.raises(NetplaneError, match="unknown host 'local-9'"):
        migration.migrate(state, name, "local-9")
    with pytest.raises(SkyferryError, match="already runs on local-1"):
        migration.migrate(state, name, "local-1")
    with pytest.raises(SkyferryError, match="bad container name"):
        containers.run(state, "local-2", "Bad/Name", ["true"])
    proc = cli("migrate", name, "--to", "local-9")
    assert proc.returncode == 2 and "unknown host 'local-9'" in proc.stderr and "Traceback" not in proc.stderr
    assert where(state, name)["host"] == "local-1" and where(state, name)["state"] == "running"
    seen = counter["client"].stop()
    assert seen["survived"], seen["errors"]


def test_target_without_criu_is_refused(counter: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    state, name, m = counter["state"], counter["name"], counter["mesh"]
    agentctl.stop_agents(m, state, hosts=["local-2"])
    monkeypatch.setenv("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")  # CRIU lives in /usr/local/sbin
    agentctl.start_agents(m, state)
    try:
        with pytest.raises(SkyferryError, match="local-2 has no CRIU"):
            migration.migrate(state, name, "local-2")
    finally:
        agentctl.stop_agents(m, state, hosts=["local-2"])
        monkeypatch.undo()
        agentctl.start_agents(m, state)
    assert where(state, name)["state"] == "running"
    assert Journal(state).all()[-1].state == "rolled-back"


def test_a_stopped_container_is_refused(mesh: tuple[Path, Mesh], tmp_path: Path) -> None:
    state, m = mesh
    scenario.start_counter(state, "local-1", "stopped", tmp_path)
    try:
        runc = Runc(Path(m.hosts["local-1"].state_root), f"/skyferry/{m.name}/local-1")
        subprocess.run(["runc", "--root", str(runc.root), "kill", "stopped", "KILL"], check=True)
        for _ in range(50):
            if (runc.state("stopped") or {}).get("status") == "stopped":
                break
            subprocess.run(["sleep", "0.1"])
        with pytest.raises(SkyferryError, match="is stopped on local-1, not running"):
            migration.migrate(state, "stopped", "local-2")
        assert Registry(state).get("stopped").host == "local-1"
    finally:
        containers.remove(state, "stopped")


def test_files_written_during_the_rounds_and_at_the_freeze_arrive(mesh: tuple[Path, Mesh], tmp_path: Path) -> None:
    """A writer appends a numbered line every 10 ms and rewrites 50 small files in a volume, before and
    during the pre-copy rounds and up to the freeze: the target's log is contiguous, the volume arrived,
    and the writer carries on."""
    state, m = mesh
    rootfs = tmp_path / "rootfs"
    (rootfs / "app").mkdir(parents=True)
    (rootfs / "app" / "writer.sh").write_text(
        'i=0; while true; do i=$((i+1)); echo "line $i" >> /data.log; echo $i > /vol/f-$((i % 50)); sleep 0.01; done\n'
    )
    containers.run(state, "local-1", "writer", ["/bin/sh", "/app/writer.sh"], rootfs=rootfs, volumes=["/vol"])
    try:
        subprocess.run(["sleep", "0.5"], check=True)
        report = migration.migrate(state, "writer", "local-2")
        assert report["state"] == "done" and report["mode"] == "precopy"
        log = Path(m.hosts["local-2"].state_root) / "containers" / "writer" / "rootfs" / "data.log"
        before = log.read_text().splitlines()
        subprocess.run(["sleep", "0.3"], check=True)
        after = log.read_text().splitlines()
        numbers = [int(line.split()[1]) for line in after]
        assert numbers == list(range(1, len(numbers) + 1)), "a line was lost or repeated"
        assert len(after) > len(before), "the restored writer carries on"
        volume = Path(m.hosts["local-2"].state_root) / "containers" / "writer" / "volumes" / "0"
        assert len(list(volume.glob("f-*"))) == 50, "the volume moved with the container"
    finally:
        containers.remove(state, "writer")


def test_postcopy_moves_a_live_connection(counter: dict) -> None:
    state, name, m = counter["state"], counter["name"], counter["mesh"]
    report = migration.migrate(state, name, "local-2", mode="postcopy")
    assert report["state"] == "done" and report["mode"] == "postcopy"
    assert list(report["stages_s"]) == ["check", "prepare", "checkpoint", "cutover", "transfer", "restore",
                                        "lazy", "confirm", "cleanup"]  # fmt: skip
    client = counter["client"]
    client.wait_for(client.progress() + 5)
    assert where(state, name)["host"] == "local-2"
    assert name not in host_containers(state, m, "local-1")
    seen = client.stop()
    assert seen["survived"], seen["errors"]


def test_postcopy_rolls_back_when_it_loses_the_source(counter: dict) -> None:
    """Post-copy cannot survive losing the source: the copy on the target lacks the pages it never got.
    The loss is detected and said plainly, the copy stopped, and the frozen source comes back."""
    lose_source_during_lazy_phase(counter["state"], counter["mesh"], counter["name"], "postcopy")


APPLETS = ("sh", "sleep", "echo", "cat", "ls", "tar", "ln", "mkdir")


def busybox_image(tmp_path: Path) -> Path:
    """A docker-save tarball of busybox with the applets the tests use."""
    layer = tmp_path / "layer.tar"
    with tarfile.open(layer, "w") as tar:
        tar.add("/bin/busybox", arcname="bin/busybox")
        for applet in APPLETS:
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type, link.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(link)
    image = tmp_path / "image.tar"
    with tarfile.open(image, "w") as tar:
        tar.add(layer, arcname="l0/layer.tar")
        manifest = json.dumps([{"Config": "c.json", "RepoTags": ["t:1"], "Layers": ["l0/layer.tar"]}]).encode()
        info = tarfile.TarInfo("manifest.json")
        info.size = len(manifest)
        tar.addfile(info, io.BytesIO(manifest))
    return image


def test_image_container_through_the_cli(mesh: tuple[Path, Mesh], tmp_path: Path) -> None:
    """`run --image` (a docker-save tarball of busybox), `ps --json`, `logs`, a migration, `rm` twice."""
    image = busybox_image(tmp_path)
    script = "i=0; while true; do i=$((i+1)); echo tick $i; sleep 0.1; done"
    started = cli(
        "run", "--host", "local-1", "--name", "bb", "--image", str(image), "--json", "--", "/bin/sh", "-c", script
    )
    assert started.returncode == 0, started.stderr
    try:
        rows = {r["name"]: r for r in json.loads(cli("ps", "--json").stdout)}
        assert rows["bb"]["host"] == "local-1" and rows["bb"]["state"] == "running"
        subprocess.run(["sleep", "0.5"], check=True)
        assert "tick 1\n" in cli("logs", "bb").stdout
        moved = cli("migrate", "bb", "--to", "local-2", "--json")
        assert moved.returncode == 0, moved.stderr
        subprocess.run(["sleep", "0.5"], check=True)
        ticks = [int(line.split()[1]) for line in cli("logs", "bb").stdout.splitlines()]
        assert ticks == list(range(1, len(ticks) + 1)), "the log moved with it and the loop carried on"
    finally:
        first, second = cli("rm", "bb", "--json"), cli("rm", "bb", "--json")
    assert json.loads(first.stdout) == {"removed": "bb"} and json.loads(second.stdout) == {"removed": None}
    assert "bb" not in {r["name"] for r in json.loads(cli("ps", "--json").stdout)}


def test_run_fails_a_command_that_exits_at_once(mesh: tuple[Path, Mesh], tmp_path: Path) -> None:
    """`run` reports a command that dies at once as failed, with its last log lines, and keeps nothing:
    the same name then runs a command that stays up (the control)."""
    image = busybox_image(tmp_path)
    died = cli("run", "--host", "local-1", "--name", "dies", "--image", str(image), "--", "/bin/sh", "-c",
               "echo \"can't open file '/app.py'\" >&2; exit 2")  # fmt: skip
    assert died.returncode != 0
    assert "exited at once" in died.stderr and "can't open file '/app.py'" in died.stderr, died.stderr
    assert "dies" not in {r["name"] for r in json.loads(cli("ps", "--json").stdout)}
    assert "dies" not in host_containers(*mesh, "local-1")
    started = cli("run", "--host", "local-1", "--name", "dies", "--image", str(image), "--json", "--", "sleep", "60")
    try:
        assert started.returncode == 0, started.stderr
        assert json.loads(started.stdout)["state"] == "running"
    finally:
        cli("rm", "dies")


USERFAULTFD = """
import ctypes, time
assert ctypes.CDLL(None).syscall(323, 1) >= 0  # userfaultfd(UFFD_USER_MODE_ONLY): CRIU cannot dump one
while True:
    time.sleep(1)
"""
TRACED = """
import ctypes, os, time
child = os.fork()
if child == 0:
    while True:
        time.sleep(1)
assert ctypes.CDLL(None).ptrace(0x4206, child, None, None) == 0  # PTRACE_SEIZE: the child is traced
while True:
    time.sleep(1)
"""


def test_a_criu_failure_names_its_cause_and_keeps_its_log(mesh: tuple[Path, Mesh], tmp_path: Path) -> None:
    """CRIU cannot dump a userfaultfd. The error names CRIU's first real error (the file), not its final
    "Dumping FAILED"; the journal keeps CRIU's log after the images are wiped."""
    state, _ = mesh
    # Docker's default seccomp profile refuses userfaultfd(2): this container runs without a filter.
    started = cli("run", "--host", "local-1", "--name", "uffd", "--host-programs", "--seccomp", "unconfined",
                  "--", "python3", "-c", USERFAULTFD)  # fmt: skip
    assert started.returncode == 0, started.stderr
    try:
        moved = cli("migrate", "uffd", "--to", "local-2", "--mode", "stop-copy", "--json")
        assert moved.returncode != 0
        error = json.loads(moved.stdout)
        assert "anon_inode:[userfaultfd]" in error["error"] and "FAILED" not in error["error"], error
        mig = Journal(state).all()[-1]
        assert error["hint"] == f"the tool's log: skyferry migrations show {mig.id}"
        assert mig.state == "rolled-back"
        shown = json.loads(cli("migrations", "show", mig.id, "--json").stdout)
        failed = [t for t in shown["transitions"] if t["status"] == "failed"]
        assert [t["stage"] for t in failed] == ["checkpoint"]
        log = failed[0]["detail"]["log"]
        assert "--- CRIU dump.log" in log and "Dumping FAILED" in log, log
        assert "Can't dump file" in cli("migrations", "show", mig.id).stdout
        spans = json.loads(cli("migrations", "show", "--json", "--timeline", mig.id).stdout)["timeline"]
        by = {sp["label"]: sp for sp in spans}
        assert by["checkpoint"]["status"] == "failed" and by["undo checkpoint"]["status"] == "undone"
        assert by["freeze"]["start_ms"] == by["checkpoint"]["start_ms"]
        assert (by["freeze"]["end_ms"], by["freeze"]["status"]) == (
            by["undo checkpoint"]["end_ms"],
            "thawed on the source",
        )
        assert (where(state, "uffd")["host"], where(state, "uffd")["state"]) == ("local-1", "running")
    finally:
        cli("rm", "uffd")


DEVICE_NODE = """
import os, stat, time
os.mknod("/held-null", stat.S_IFCHR | 0o666, os.makedev(1, 3))  # in the rootfs, which moves by file rounds
held = open("/held-null", "rb")
while True:
    time.sleep(1)
"""


def test_a_failed_hybrid_restore_names_criu_s_error(mesh: tuple[Path, Mesh]) -> None:
    """A process holding a device node it made in its rootfs: the file rounds never carry a device (the
    target makes none from a peer's stream), so CRIU's restore cannot reopen it. In hybrid mode the target's
    page source goes away with the failed restore; the error must still name CRIU's first real error, not
    the pager or the page tunnel, and the journal keeps CRIU's restore log."""
    state, _ = mesh
    started = cli("run", "--host", "local-1", "--name", "devnode", "--host-programs", "--", "python3", "-c",
                  DEVICE_NODE)  # fmt: skip
    assert started.returncode == 0, started.stderr
    try:
        moved = cli("migrate", "devnode", "--to", "local-2", "--mode", "hybrid", "--json")
        assert moved.returncode != 0
        error = json.loads(moved.stdout)["error"]
        print(error)
        cause = error.split("failed at restore", 1)[1].split("Rolled back")[0]
        assert "runc restore failed: " in cause and "held-null" in cause, error  # CRIU's line names the file
        assert "page" not in cause and "FAILED" not in cause, error
        mig = Journal(state).all()[-1]
        failed = [t for t in Journal(state).transitions(mig.id) if t["status"] == "failed"]
        assert [t["stage"] for t in failed] == ["restore"]
        assert "--- CRIU restore.log" in failed[0]["detail"]["log"], failed[0]["detail"]
        assert (where(state, "devnode")["host"], where(state, "devnode")["state"]) == ("local-1", "running")
    finally:
        cli("rm", "devnode")


def test_a_traced_task_is_refused_before_the_freeze(mesh: tuple[Path, Mesh]) -> None:
    """CRIU cannot seize a task another task traces; the check stage names it while the container runs
    (no checkpoint is tried, nothing freezes). The control: the same image without the tracer moves."""
    state, _ = mesh
    started = cli("run", "--host", "local-1", "--name", "traced", "--host-programs", "--", "python3", "-c", TRACED)
    assert started.returncode == 0, started.stderr
    try:
        moved = cli("migrate", "traced", "--to", "local-2", "--json")
        error = json.loads(moved.stdout)
        assert moved.returncode != 0 and "is traced by pid" in error["error"] and "ptrace" in error["hint"], error
        mig = Journal(state).all()[-1]
        assert [t["stage"] for t in Journal(state).transitions(mig.id) if t["status"] == "failed"] == ["check"]
        assert "checkpoint" not in Journal(state).stage_status(mig.id)
        assert (where(state, "traced")["host"], where(state, "traced")["state"]) == ("local-1", "running")
    finally:
        cli("rm", "traced")
    plain = cli(
        "run",
        "--host",
        "local-1",
        "--name",
        "untraced",
        "--host-programs",
        "--",
        "python3",
        "-c",
        TRACED.split("assert")[0] + "time.sleep(3600)",
    )
    try:
        assert plain.returncode == 0, plain.stderr
        assert cli("migrate", "untraced", "--to", "local-2").returncode == 0
    finally:
        cli("rm", "untraced")


def test_a_tree_that_forks_all_the_time_is_refused_hybrid_before_the_freeze_and_auto_moves_it_by_precopy(
    mesh: tuple[Path, Mesh], tmp_path: Path
) -> None:
    """A lazily restored child's memory is filled by CRIU's daemon too, so a tree forking all the time may
    never end the lazy phase (docs/compatibility.md). The check measures the fork rate while it runs:
    --mode hybrid is refused, nothing frozen; auto moves it by pre-copy and its report says why."""
    state, _ = mesh
    image = busybox_image(tmp_path)
    started = cli("run", "--host", "local-1", "--name", "forky", "--image", str(image), "--",
                  "/bin/sh", "-c", "while :; do sleep 0.01; done")  # fmt: skip
    assert started.returncode == 0, started.stderr
    try:
        moved = cli("migrate", "forky", "--to", "local-2", "--mode", "hybrid", "--json")
        error = json.loads(moved.stdout)
        assert moved.returncode != 0 and "cannot move by hybrid" in error["error"], error
        assert "forks" in error["error"] and "--mode precopy" in error["hint"], error
        mig = Journal(state).all()[-1]
        assert [t["stage"] for t in Journal(state).transitions(mig.id) if t["status"] == "failed"] == ["check"]
        assert "checkpoint" not in Journal(state).stage_status(mig.id)
        assert (where(state, "forky")["host"], where(state, "forky")["state"]) == ("local-1", "running")
        report = migration.migrate(state, "forky", "local-2")
        assert report["state"] == "done" and report["mode"] == "precopy", report
        assert "hybrid and postcopy ruled out" in report["mode_reason"] and "forks" in report["mode_reason"], report
        # Auto's check only marked the fork count; the rounds counted from it and took the lazy finish away.
        done = {t["stage"]: t["detail"] for t in Journal(state).transitions(report["id"]) if t["status"] == "done"}
        assert "ruled_out" not in done["check"] and "forks" in done["precopy"]["ruled_out"], done
        assert (where(state, "forky")["host"], where(state, "forky")["state"]) == ("local-2", "running")
    finally:
        cli("rm", "forky")


def test_exec_runs_inside_the_container_wherever_it_runs(mesh: tuple[Path, Mesh], tmp_path: Path) -> None:
    """`skyferry exec` sees the container's rootfs, passes stdin (-i) and the exit code, follows the
    container to another host, and kills a command that outlives --timeout."""
    image = busybox_image(tmp_path)
    started = cli("run", "--host", "local-1", "--name", "ex", "--image", str(image), "--", "sleep", "3600")
    assert started.returncode == 0, started.stderr
    try:
        listing = cli("exec", "ex", "--", "ls", "/bin")
        assert listing.returncode == 0, listing.stderr
        assert set(listing.stdout.split()) == {"busybox", *APPLETS}  # not the host's /bin
        piped = subprocess.run(
            [SKYFERRY, "exec", "-i", "ex", "--", "sh", "-c", "cat > /in; cat /in; exit 7"],
            input="through stdin\n", capture_output=True, text=True,
        )  # fmt: skip
        assert (piped.returncode, piped.stdout) == (7, "through stdin\n"), piped.stderr
        moved = json.loads(cli("migrate", "ex", "--to", "local-2", "--json").stdout)
        spans = json.loads(cli("migrations", "show", moved["id"], "--timeline", "--json").stdout)["timeline"]
        stages = [sp for sp in spans if sp["kind"] == "stage"]
        assert [sp["start_ms"] for sp in spans] == sorted(sp["start_ms"] for sp in spans)
        assert all(sp["status"] == "done" and sp["end_ms"] >= sp["start_ms"] for sp in stages)
        freeze = next(sp for sp in spans if sp["kind"] == "freeze")
        by = {sp["label"]: sp for sp in stages}
        assert freeze["end_ms"] == by["restore"]["end_ms"]
        # From the pause: the checkpoint's first moments (at most SETTLE_S) let the replies land.
        assert 0 <= freeze["start_ms"] - by["checkpoint"]["start_ms"] <= settle.SETTLE_S * 1000
        assert abs(freeze["end_ms"] - freeze["start_ms"] - moved["freeze_ms"]) < 1
        rounds = [sp for sp in spans if sp["kind"] == "round"]
        assert rounds and all(by["precopy"]["start_ms"] <= r["start_ms"] <= by["precopy"]["end_ms"] for r in rounds)
        assert "freeze" in cli("migrations", "show", moved["id"], "--timeline").stdout
        moved = json.loads(cli("exec", "--json", "ex", "--", "cat", "/in").stdout)
        assert moved == {"exit_code": 0, "stdout": "through stdin\n", "stderr": ""}
        slow = cli("exec", "--timeout", "1", "ex", "--", "sleep", "1234")
        assert slow.returncode != 0 and "ran longer than 1 s" in slow.stderr, slow.stderr
        procs = cli("exec", "ex", "--", "sh", "-c", "cat /proc/[0-9]*/cmdline")
        assert "1234" not in procs.stdout.replace("\0", " "), procs.stdout
        gone = cli("exec", "nosuch", "--", "true")
        assert gone.returncode != 0 and "nosuch" in gone.stderr
    finally:
        cli("rm", "ex")


def test_cp_in_and_out_and_a_hostile_link_stays_inside(mesh: tuple[Path, Mesh], tmp_path: Path) -> None:
    """`skyferry cp` both ways, file and directory, into a directory or under a new name; a link the
    container points at a host path is refused on the way out (the control: a plain file comes out)."""
    image = busybox_image(tmp_path)
    started = cli("run", "--host", "local-1", "--name", "cpx", "--image", str(image), "--", "sleep", "3600")
    assert started.returncode == 0, started.stderr
    try:
        (tmp_path / "conf.txt").write_text("setting=1\n")
        (tmp_path / "tree" / "sub").mkdir(parents=True)
        (tmp_path / "tree" / "sub" / "leaf.txt").write_text("leaf\n")
        assert cli("exec", "cpx", "--", "mkdir", "-p", "/etc").returncode == 0  # runc containers have their own /etc
        for src, dest in (("conf.txt", "cpx:/etc"), ("tree", "cpx:/data")):
            done = cli("cp", str(tmp_path / src), dest)
            assert done.returncode == 0, done.stderr
        assert cli("exec", "cpx", "--", "cat", "/etc/conf.txt").stdout == "setting=1\n"
        assert cli("exec", "cpx", "--", "cat", "/data/sub/leaf.txt").stdout == "leaf\n"
        out = tmp_path / "out"
        out.mkdir()
        assert cli("cp", "cpx:/data", str(out / "copy")).returncode == 0
        assert (out / "copy" / "sub" / "leaf.txt").read_text() == "leaf\n"
        assert cli("cp", "cpx:/etc/conf.txt", str(out)).returncode == 0
        assert (out / "conf.txt").read_text() == "setting=1\n"
        assert cli("exec", "cpx", "--", "ln", "-s", "/etc/shadow", "/data/evil").returncode == 0
        hostile = cli("cp", "cpx:/data", str(out / "hostile"))
        assert hostile.returncode != 0 and "refused" in hostile.stderr, hostile.stderr
        assert not (out / "hostile" / "evil").is_symlink()
        bad = cli("cp", str(tmp_path / "conf.txt"), str(out))
        assert bad.returncode != 0 and "one container path" in bad.stderr
    finally:
        cli("rm", "cpx")


def test_no_checkpoint_image_on_persistent_disk(counter: dict) -> None:
    """runc's images live in the migration's tmpfs dir only, through pre-copy rounds, a restore that fails
    (an injected fault) and one that works; then none is left. Seeing them there is the positive control."""
    state, name, m = counter["state"], counter["name"], counter["mesh"]
    roots = imagescan.distinct([state, IMAGES_TMPFS / m.name, *(Path(h.state_root) for h in m.hosts.values())])
    faults = Path(m.hosts["local-2"].state_root) / "faults"
    with imagescan.Watcher(roots) as watch:
        faults.write_text("restore\n")
        try:
            with pytest.raises(SkyferryError, match=r"failed at restore.*Rolled back"):
                migration.migrate(state, name, "local-2", mode="stop-copy")
        finally:
            faults.unlink()
        after_failure = imagescan.images(roots)
        report = migration.migrate(state, name, "local-2")
    assert report["state"] == "done" and report["mode"] == "precopy"
    assert after_failure == {}, "a failed migration's images must be wiped"
    assert imagescan.on_disk(watch.seen) == [], "checkpoint images on persistent disk"
    assert any(IMAGES_TMPFS in p.parents for p in watch.seen), f"the watcher must see them ({watch.polls} polls)"
    assert imagescan.images(roots) == {}, "every image is wiped after the migration"


def agent_connections(m: Mesh, src: str, dst: str) -> dict[int, int]:
    """The TCP connections from host `src` to `dst`'s agent: bytes acknowledged, by local port."""
    ip = m.hosts[dst].overlay_ip
    argv = ["ss", "-Htin", "state", "established", "dst", f"{ip}:{AGENT_PORT}"]
    out = subprocess.run(netns.command(m.hosts[src].netns or "", argv), capture_output=True, text=True, check=True)
    found, port = {}, None
    for line in out.stdout.splitlines():
        if line[:1].strip():  # an address line; its counters follow on an indented one
            port = int(line.split()[-2].rsplit(":", 1)[1])
        elif port is not None:
            acked = re.search(r"bytes_acked:(\d+)", line)
            found[port] = int(acked[1]) if acked else 0
    return found


def moved_over(state: Path, m: Mesh, name: str) -> int | None:
    """Migrate `name` from local-1 to local-2: the local port of the connection, still open, that its first
    round (16 MiB) went over; None if none open carried it (it was closed since)."""
    before = agent_connections(m, "local-1", "local-2")
    migration.migrate(state, name, "local-2", mode="precopy")
    after = agent_connections(m, "local-1", "local-2")
    grew = [port for port, acked in after.items() if acked - before.get(port, 0) >= 16 << 20]
    assert len(grew) <= 1, (before, after)
    return grew[0] if grew else None


def test_first_rounds_to_one_target_go_over_the_connection_the_last_one_left_unless_it_was_held_back(
    mesh: tuple[Path, Mesh], tmp_path: Path
) -> None:
    """An evacuation's rounds, one after another, move as one flow: the second migration's first round (all
    its memory) goes over the connection the first one's left open, not a new one that ramps up again. Not
    over one the target held back (its file round held the container's lock; here the `stall` drill): the
    kernel's clock of that wait would abort the connection at its next wait (hostapi/client.py)."""
    state, m = mesh
    names = ["kept-a", "kept-b", "kept-c", "kept-d"]
    try:
        for name in names:
            scenario.start_counter(state, "local-1", name, tmp_path, memory_mib=16, incompressible=True)
        migration.migrate(state, "kept-a", "local-2", mode="precopy")
        kept = agent_connections(m, "local-1", "local-2")
        assert len(kept) == 1, f"one connection stays open (the lanes went; one was warmed for round 1): {kept}"
        port = moved_over(state, m, "kept-b")
        assert port in kept, "the second round went over the connection the first left"
        (Path(m.hosts["local-2"].state_root) / "faults").write_text("stall:precopy-round\n")
        assert moved_over(state, m, "kept-c") is None, "held back a second, it was not kept"
        assert port not in agent_connections(m, "local-1", "local-2")
        assert moved_over(state, m, "kept-d") not in (None, port), "the next round went over a new one, kept"
    finally:
        for name in names:
            containers.remove(state, name)


def test_a_volume_seeded_from_a_host_directory_starts_with_its_copy(mesh: tuple[Path, Mesh], tmp_path: Path) -> None:
    """`-v HOSTDIR:PATH`: the volume starts with a copy of HOSTDIR, owned by the container's user, and
    moves with the container; the host directory is never written to, and its links stay links."""
    image = busybox_image(tmp_path)
    seed = tmp_path / "seed"
    (seed / "sub").mkdir(parents=True)
    (seed / "sub" / "greeting").write_text("hello\n")
    (seed / "shadow").symlink_to("/etc/shadow")
    try:
        mine = cli("run", "--host", "local-1", "--name", "seeded", "--image", str(image), "--user", "1000",
                   "-v", f"{seed}:/data", "--", "sleep", "3600")  # fmt: skip
        assert mine.returncode == 0, mine.stderr
        assert cli("exec", "seeded", "--", "cat", "/data/sub/greeting").stdout == "hello\n"
        wrote = cli("exec", "seeded", "--", "sh", "-c", "echo mine > /data/sub/new && cat /data/sub/new")
        assert (wrote.returncode, wrote.stdout) == (0, "mine\n"), wrote.stderr  # uid 1000 owns its volume
        leak = cli("exec", "seeded", "--", "cat", "/data/shadow")
        assert leak.returncode != 0 and "root:" not in leak.stdout  # the link resolves in the container
        assert sorted(p.name for p in seed.rglob("*")) == ["greeting", "shadow", "sub"]  # the host's is untouched
        cli("rm", "seeded")
        root = cli("run", "--host", "local-1", "--name", "seeded", "--image", str(image), "-v", f"{seed}:/data",
                   "--", "sleep", "3600")  # fmt: skip
        assert root.returncode == 0, root.stderr
        assert cli("migrate", "seeded", "--to", "local-2").returncode == 0
        assert cli("exec", "seeded", "--", "cat", "/data/sub/greeting").stdout == "hello\n"
        missing = cli(
            "run", "--host", "local-1", "--name", "unseeded", "-v", f"{tmp_path / 'nope'}:/data", "--", "true"
        )
        assert missing.returncode != 0 and "is not a directory" in missing.stderr
    finally:
        cli("rm", "seeded")
