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
from kit.mesh import local_mesh, lose_source_during_lazy_phase
from skyferry.netplane import netns
from skyferry.netplane.errors import NetplaneError
from skyferry.netplane.mesh import Mesh
from skyferry.pipeline.controller import agentctl, containers, migration
from skyferry.pipeline.controller.journal import Journal
from skyferry.pipeline.controller.registry import Registry
from skyferry.pipeline.errors import SkyferryError
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
    state, m = mesh
    name = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[-30:].strip("-")
    info = scenario.start_counter(state, "local-1", name, tmp_path)
    client = scenario.CounterClient(m.hosts["local-3"].netns or "", info["ip"], tmp_path).start()
    try:
        yield {"name": name, "ip": info["ip"], "client": client, "state": state, "mesh": m}
    finally:
        client.stop()
        containers.remove(state, name)


def where(state: Path, name: str) -> dict:
    return {r["name"]: r for r in containers.live(state)}[name]


def host_containers(state: Path, m: Mesh, host: str) -> list[str]:
    return [c["name"] for c in agentctl.client(state, m, host).call("GET", "/v1/containers")]


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SKYFERRY, *args], capture_output=True, text=True, env={**os.environ, **(env or {})})


def test_migration_keeps_ip_and_connection_there_and_back(counter: dict) -> None:
    state, name, m = counter["state"], counter["name"], counter["mesh"]
    report = migration.migrate(state, name, "local-2")
    assert report["state"] == "done" and report["freeze_ms"] > 0 and report["bytes_wire"] > 0
    assert report["mode"] == "precopy"  # the default
    assert list(report["stages_s"]) == ["check", "prepare", "precopy", "checkpoint", "transfer", "cutover",
                                        "restore", "confirm", "cleanup"]  # fmt: skip
    assert report["rounds"] and report["bytes_at_freeze"] < report["rounds"][0]["bytes_out"]
    now = where(state, name)
    assert (now["host"], now["ip"], now["state"]) == ("local-2", counter["ip"], "running")
    assert name not in host_containers(state, m, "local-1")
    assert not netns.exists(f"{m.name}-local-1-{name}"), "the source's netns must be gone after confirm"
    assert Mesh.load(state).homes[counter["ip"]] == "local-2"

    client = counter["client"]
    client.wait_for(client.progress() + 5)  # the same connection carries requests after the move
    back = migration.migrate(state, name, "local-1", mode="stop-copy")
    assert back["state"] == "done" and back["rounds"] == []
    client.wait_for(client.progress() + 5)
    seen = client.stop()
    assert seen["survived"], seen["errors"]
    assert where(state, name)["host"] == "local-1"
    assert not list(Path("/dev/shm/skyferry", m.name).rglob("*.img")), "checkpoint images must be wiped"


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
    frozen = crash_after in ("checkpoint", "transfer", "cutover")  # before: not yet; after restore: the target
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
    assert list(report["stages_s"]) == ["check", "prepare", "checkpoint", "transfer", "cutover", "restore",
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


def test_image_container_through_the_cli(mesh: tuple[Path, Mesh], tmp_path: Path) -> None:
    """`run --image` (a docker-save tarball of busybox), `ps --json`, `logs`, a migration, `rm` twice."""
    layer = tmp_path / "layer.tar"
    with tarfile.open(layer, "w") as tar:
        tar.add("/bin/busybox", arcname="bin/busybox")
        for applet in ("sh", "sleep", "echo"):
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
