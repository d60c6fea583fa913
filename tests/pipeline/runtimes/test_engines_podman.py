"""Podman containers migrate live between local hosts: real Podman, runc, CRIU, wireguard-go.

Each host has its own Podman store below its state root (pipeline/runtimes/podman.py). The container is a busybox
TCP counter imported from a rootfs tarball made here (no registry); a client on local-3 holds one TCP
connection to it and fails on any lost or repeated request. Everything is removed afterwards.
"""

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from kit import imagescan, selfmove
from kit.mesh import counter_and_client, local_mesh, tasks_in, where
from skyferry.netplane.mesh import Mesh
from skyferry.pipeline.controller import agentctl, containers, migration
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.hostapi.layout import IMAGES_TMPFS
from skyferry.pipeline.runtimes import engines
from skyferry.pipeline.runtimes.podman import Podman
from skyferry.pipeline.runtimes.throttle import CpuFiles

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.skipif(shutil.which("podman") is None, reason="podman is not installed (scripts/bootstrap-host.sh)"),
]


def podman_of(m: Mesh, host: str) -> Podman:
    """The Podman adapter of `host`, as its agent builds it, for looking inside that host's store."""
    return Podman(Path(m.hosts[host].state_root), f"/skyferry/{m.name}/{host}")


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Mesh]]:
    with local_mesh(tmp_path_factory) as (state, m):
        try:
            yield state, m
        finally:
            for host in m.hosts:
                podman_of(m, host).destroy()  # containers, overlay and shm mounts, store, runroot


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return engines.counter_image(tmp_path_factory.mktemp("image") / "counter-rootfs.tar")


@pytest.fixture
def counter(mesh: tuple[Path, Mesh], image: Path, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[dict]:
    """A Podman counter container on local-1 and a client on local-3 holding one connection to it."""

    def run(state: Path, name: str) -> dict:
        return containers.run(state, "local-1", f"podman:{name}", engines.COUNTER_ARGS, image=image)

    with counter_and_client(mesh, tmp_path, request, run) as made:
        yield made


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(Path(sys.executable).parent / "skyferry"), *args], capture_output=True, text=True)


def test_podman_container_migrates_live_there_and_back(counter: dict) -> None:
    state, name, m, client = counter["state"], counter["name"], counter["mesh"], counter["client"]
    assert where(state, name)["runtime"] == "podman"
    client.wait_for(5)
    before = client.progress()

    report = migration.migrate(state, containers.resolve(state, f"podman:{name}"), "local-2", mode="stop-copy")
    assert report["state"] == "done" and report["bytes_wire"] > 0
    print(f"\npodman 1 -> 2: freeze {report['freeze_ms']} ms, {report['bytes_wire']} B, {report['stages_s']}")
    now = where(state, name)
    assert (now["host"], now["ip"], now["state"], now["runtime"]) == ("local-2", counter["ip"], "running", "podman")
    assert name not in podman_of(m, "local-1").names(), "the source's container must be gone after confirm"
    client.wait_for(client.progress() + 5)  # the same connection, the same per-connection counter
    # The writable layer moved: lines written before the move are in the target's copy.
    served = cli("exec", f"podman:{name}", "--", "cat", "/app/served").stdout.split()
    assert str(before) in served[::2], "the writable layer must move with the container"
    assert "seed" not in cli("exec", name, "--", "ls", "/app").stdout.split(), "and its whiteouts too"

    # Back through the CLI, named the way an operator names it: podman:NAME picks stop-copy by itself.
    proc = cli("migrate", f"podman:{name}", "--to", "local-1", "--json")
    assert proc.returncode == 0, proc.stderr
    back = json.loads(proc.stdout)
    assert (back["state"], back["mode"]) == ("done", "stop-copy")
    print(f"podman 2 -> 1: freeze {back['freeze_ms']} ms, {back['bytes_wire']} B, {back['stages_s']}")
    client.wait_for(client.progress() + 5)
    seen = client.stop()
    assert seen["survived"], seen["errors"]
    print(f"client: {seen['requests']} requests on one connection, max gap {seen['max_gap_ms']} ms")
    listed = {r["name"]: r for r in json.loads(cli("ps", "--json").stdout)}
    assert (listed[name]["host"], listed[name]["runtime"], listed[name]["state"]) == ("local-1", "podman", "running")
    assert name not in podman_of(m, "local-2").names()
    assert not list(Path("/dev/shm/skyferry", m.name).rglob("checkpoint.tar")), "exports must be wiped"


def test_the_podman_container_cgroup_is_below_the_hosts_prefix_and_throttleable(counter: dict) -> None:
    """Auto-converge's throttle finds a Podman container's cgroup by asking the kernel (cgroupfs driver here:
    our --cgroup-parent, then Podman's own name for it) and can read its CPU limit there."""
    m, name = counter["mesh"], counter["name"]
    cgroup = podman_of(m, "local-1").cgroup(name)
    assert cgroup.startswith(f"/skyferry/{m.name}/local-1/podman/"), cgroup
    files = CpuFiles.of(cgroup)
    assert files.usage_s() > 0 and files.period_us() > 0


def test_bad_input_leaves_the_podman_container_running(counter: dict) -> None:
    state, name, client = counter["state"], counter["name"], counter["client"]
    with pytest.raises(SkyferryError, match="unknown container 'nope'"):
        containers.resolve(state, "podman:nope")
    with pytest.raises(SkyferryError, match=f"container '{name}' runs in podman, not docker"):
        containers.resolve(state, f"docker:{name}")
    with pytest.raises(SkyferryError, match="unknown runtime 'lxc'"):
        containers.resolve(state, f"lxc:{name}")
    with pytest.raises(SkyferryError, match="a podman container needs --image"):
        containers.run(state, "local-2", "podman:noimage", ["true"])
    bad = cli("run", "--host", "local-2", "--name", "x", "--runtime", "lxc", "--", "true")
    assert bad.returncode == 2 and "unknown runtime 'lxc'" in bad.stderr and "Traceback" not in bad.stderr
    refused = cli("migrate", f"podman:{name}", "--to", "local-2", "--mode", "precopy")
    assert refused.returncode == 2 and "podman containers do not migrate by precopy" in refused.stderr
    assert "Traceback" not in refused.stderr
    client.wait_for(client.progress() + 3)
    assert where(state, name)["state"] == "running" and where(state, name)["host"] == "local-1"
    seen = client.stop()
    assert seen["survived"], seen["errors"]


def test_a_failed_transfer_thaws_the_frozen_podman_source(counter: dict) -> None:
    """The source refuses to send after its checkpoint (an injected fault): the frozen source runs on, once."""
    state, name, m, client = counter["state"], counter["name"], counter["mesh"], counter["client"]
    faults = Path(m.hosts["local-1"].state_root) / "faults"
    faults.write_text("transfer\n")
    try:
        with pytest.raises(SkyferryError, match=r"failed at transfer.*Rolled back"):
            migration.migrate(state, name, "local-2", mode="stop-copy")
    finally:
        faults.unlink()
    assert where(state, name)["host"] == "local-1" and where(state, name)["state"] == "running"
    assert name not in podman_of(m, "local-2").names()
    client.wait_for(client.progress() + 3)
    seen = client.stop()
    assert seen["survived"], seen["errors"]


def test_target_without_podman_is_refused_and_the_source_runs_on(
    counter: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """local-2's agent restarts on a PATH where every /usr/bin program but podman is: Podman is not installed."""
    state, name, m, client = counter["state"], counter["name"], counter["mesh"], counter["client"]
    bindir = tmp_path / "bin-without-podman"
    bindir.mkdir()
    for program in Path("/usr/bin").iterdir():
        if program.name != "podman":
            (bindir / program.name).symlink_to(program)
    agentctl.stop_agents(m, state, hosts=["local-2"])
    monkeypatch.setenv("PATH", f"/usr/local/sbin:/usr/local/bin:/usr/sbin:{bindir}")  # /bin is /usr/bin here
    agentctl.start_agents(m, state)
    try:
        with pytest.raises(SkyferryError, match=r"failed at prepare.*local-2 has no podman runtime"):
            migration.migrate(state, name, "local-2", mode="stop-copy")
    finally:
        agentctl.stop_agents(m, state, hosts=["local-2"])
        monkeypatch.undo()
        agentctl.start_agents(m, state)
    assert where(state, name)["host"] == "local-1" and where(state, name)["state"] == "running"
    client.wait_for(client.progress() + 3)
    seen = client.stop()
    assert seen["survived"], seen["errors"]


def image_roots(state: Path, m: Mesh) -> list[Path]:
    """Everywhere a checkpoint image could land: every host's state root (the Podman store, its tmpdir, the
    adapter's staging, the logs) and Podman runroot, the controller's state, the migrations' tmpfs."""
    hosts = [Path(h.state_root) for h in m.hosts.values()] + [podman_of(m, h).run_dir for h in m.hosts]
    return imagescan.distinct([state, IMAGES_TMPFS / m.name, *(p for p in hosts if p.exists())])


def test_no_checkpoint_image_on_persistent_disk(counter: dict) -> None:
    """During and after a Podman migration, every CRIU image (or archive of them) is on tmpfs; then none is
    left at all. Seeing Podman's own checkpoint directory, on tmpfs, is the positive control."""
    state, name, m = counter["state"], counter["name"], counter["mesh"]
    roots = image_roots(state, m)
    secret = f"shm-secret-{os.urandom(4).hex()}"
    put = cli("exec", f"podman:{name}", "--", "sh", "-c", f"echo {secret} > /dev/shm/secret")
    assert put.returncode == 0, put.stderr
    with imagescan.Watcher(roots) as watch:
        report = migration.migrate(state, name, "local-2", mode="stop-copy")
    assert report["state"] == "done"
    # The container's /dev/shm moved inside CRIU's images (its own tmpfs), never archived into the store.
    assert cli("exec", f"podman:{name}", "--", "cat", "/dev/shm/secret").stdout.strip() == secret
    assert imagescan.on_disk(watch.seen) == [], "checkpoint images on persistent disk"
    engine_copies = [p for p in watch.seen if "/overlay-containers/" in str(p)]
    assert engine_copies, f"the watcher must see Podman's own images ({watch.polls} polls): {sorted(watch.seen)}"
    assert any(IMAGES_TMPFS in p.parents for p in watch.seen), "and the migration's export"
    assert imagescan.images(roots) == {}, "every image is wiped after the migration"


def _damage(images: Path) -> None:
    """Overwrite the core image inside the checkpoint export: CRIU's restore then fails."""
    export = images / "checkpoint.tar"
    with tarfile.open(export) as tar:
        members = [(m, tar.extractfile(m).read() if m.isfile() else None) for m in tar.getmembers()]  # type: ignore[union-attr]
    with tarfile.open(export, "w", format=tarfile.PAX_FORMAT) as out:
        for member, data in members:
            if data is not None and re.fullmatch(r"(\./)?checkpoint/core-\d+\.img", member.name):
                data = b"damaged" * 64
                member.size = len(data)
            out.addfile(member, None if data is None else io.BytesIO(data))


def test_a_failed_podman_restore_leaves_no_image_anywhere(counter: dict) -> None:
    """CRIU fails inside `podman container restore` (a damaged core image, after Podman unpacked the export
    into its store): no image on disk during it, none anywhere after it, no mount left behind."""
    state, name, m = counter["state"], counter["name"], counter["mesh"]
    host = podman_of(m, "local-1")
    mig = IMAGES_TMPFS / m.name / f"imgtest-{os.urandom(3).hex()}"
    roots = image_roots(state, m)
    try:
        with imagescan.Watcher(roots) as watch:
            selfmove.up_to_restore(host, "podman", name, f"/run/netns/{m.name}-local-1-{name}", mig, _damage)
            with pytest.raises(SkyferryError, match="podman restore failed") as failed:
                host.restore(name, mig / "images", mig / "work")
            # CRIU's own first error, and its log for the journal, rather than Podman's summary
            assert failed.value.log and "--- CRIU restore.log" in failed.value.log, failed.value
            assert "Error (criu/" not in str(failed.value) and "exit status" not in str(failed.value), failed.value
        assert imagescan.on_disk(watch.seen) == [], "checkpoint images on persistent disk"
        assert [p for p in watch.seen if "/overlay-containers/" in str(p)], "Podman's unpacked images were seen"
        with open("/proc/self/mountinfo") as f:
            assert "/userdata/checkpoint" not in f.read(), "the tmpfs on Podman's checkpoint dir must be gone"
    finally:
        shutil.rmtree(mig, ignore_errors=True)
    assert imagescan.images(roots) == {}, "nothing left once the migration's tmpfs dir is wiped"


def test_a_restore_whose_podman_cli_died_leaves_no_copy_running(counter: dict) -> None:
    """The podman CLI dies while runc restores (engines.run's bound, an agent that died): conmon and runc
    go on and start the container, while Podman's record stays "created". Removing it must end that copy
    too (Podman.remove kills what is left in its cgroup), or it runs on, unknown to everyone."""
    state, name, m = counter["state"], counter["name"], counter["mesh"]
    host = podman_of(m, "local-1")
    cgroup = host.cgroup(name)  # the restored container keeps its ID, so its cgroup
    mig = IMAGES_TMPFS / m.name / f"killtest-{os.urandom(3).hex()}"
    try:
        selfmove.up_to_restore(host, "podman", name, f"/run/netns/{m.name}-local-1-{name}", mig)
        with ThreadPoolExecutor(1) as pool:
            restore = pool.submit(host.restore, name, mig / "images", mig / "work")
            # Once CRIU put the first task in the cgroup: earlier, conmon gives up with the CLI; later, Podman
            # records the container running when runc returns.
            _eventually("the restore reaches the cgroup", lambda: tasks_in(cgroup))
            ours = _children_running("podman")
            assert len(ours) == 1, ours
            os.kill(ours[0], signal.SIGKILL)
            with pytest.raises(SkyferryError, match="podman restore failed"):
                restore.result()
        assert tasks_in(cgroup), "control: the copy runs"
        assert host.state(name) == {"status": "created", "pid": 0}, "control: Podman never learnt it runs"
        containers.remove(state, name)  # the agent's DELETE: Podman.remove
        assert tasks_in(cgroup) == [], "the copy Podman forgot still runs"
    finally:
        shutil.rmtree(mig, ignore_errors=True)


def _children_running(program: str) -> list[int]:
    """This test process's children running `program` (the CLI calls the adapter makes)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            argv0 = (proc / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # not a process, or gone
        if Path(argv0).name == program and ppid == os.getpid():
            found.append(int(proc.name))
    return found


def _eventually(what: str, ok: Callable[[], object]) -> None:
    deadline = time.monotonic() + 120
    while not ok():
        assert time.monotonic() < deadline, f"not within 120 s: {what}"
        time.sleep(0.01)
