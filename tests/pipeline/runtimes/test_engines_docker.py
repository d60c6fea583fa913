"""Docker containers migrate live between local hosts: real dockerd/containerd, runc, CRIU, wireguard-go.

local-1 and local-2 each get a private dockerd (own data root, exec root, socket; inside the host's netns,
no iptables, no ip forwarding, no bridge), started and stopped here. local-3 holds the counter client;
local-3 and local-4 have no Docker (one test gives local-4 a dockerd without experimental features).
The container is a busybox TCP counter imported from a rootfs tarball made here (no registry).
Everything, daemons included, is removed afterwards.
"""

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from kit import imagescan, selfmove
from kit.mesh import counter_and_client, local_mesh, where
from skyferry.netplane.mesh import Mesh
from skyferry.pipeline.controller import containers, migration
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.hostapi.layout import IMAGES_TMPFS
from skyferry.pipeline.runtimes import engines
from skyferry.pipeline.runtimes.docker import Docker
from skyferry.pipeline.runtimes.throttle import CpuFiles
from skyferry.pipeline.scenarios import demo as scenario

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.skipif(
        shutil.which("dockerd") is None, reason="docker.io is not installed (scripts/bootstrap-host.sh)"
    ),
]
KEY = Path("/etc/docker/key.json")  # dockerd 20.10 writes its trust key here whatever its data root


def docker_of(m: Mesh, host: str) -> Docker:
    """The Docker adapter of `host`, as its agent builds it."""
    return Docker(Path(m.hosts[host].state_root), f"/skyferry/{m.name}/{host}")


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Mesh]]:
    key_existed = KEY.exists()
    daemons: list[engines.DockerDaemon] = []
    with local_mesh(tmp_path_factory, count=4) as (state, m):
        try:
            for host in ("local-1", "local-2"):
                daemons.append(docker_of(m, host).daemon(m.hosts[host].netns).start())
            yield state, m
        finally:
            for daemon in daemons:
                daemon.stop()
            if not key_existed:
                KEY.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return engines.counter_image(tmp_path_factory.mktemp("image") / "counter-rootfs.tar")


@pytest.fixture
def counter(mesh: tuple[Path, Mesh], image: Path, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[dict]:
    """A Docker counter container on local-1 and a client on local-3 holding one connection to it."""

    def run(state: Path, name: str) -> dict:
        return containers.run(state, "local-1", name, engines.COUNTER_ARGS, image=image, runtime="docker")

    with counter_and_client(mesh, tmp_path, request, run) as made:
        yield made


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(Path(sys.executable).parent / "skyferry"), *args], capture_output=True, text=True)


def test_docker_container_migrates_live_there_and_back(counter: dict) -> None:
    state, name, m, client = counter["state"], counter["name"], counter["mesh"], counter["client"]
    assert where(state, name)["runtime"] == "docker"
    client.wait_for(5)
    before = client.progress()

    report = migration.migrate(state, containers.resolve(state, f"docker:{name}"), "local-2", mode="stop-copy")
    assert report["state"] == "done" and report["bytes_wire"] > 0
    print(f"\ndocker 1 -> 2: freeze {report['freeze_ms']} ms, {report['bytes_wire']} B, {report['stages_s']}")
    now = where(state, name)
    assert (now["host"], now["ip"], now["state"], now["runtime"]) == ("local-2", counter["ip"], "running", "docker")
    assert name not in docker_of(m, "local-1").names(), "the source's container must be gone after confirm"
    client.wait_for(client.progress() + 5)  # the same connection, the same per-connection counter
    served = cli("exec", f"docker:{name}", "--", "cat", "/app/served").stdout.split()
    assert str(before) in served[::2], "the writable layer must move with the container"
    assert "seed" not in cli("exec", name, "--", "ls", "/app").stdout.split(), "and its whiteouts too"

    # Back through the CLI, named the way an operator names it: docker:NAME picks stop-copy by itself.
    proc = cli("migrate", f"docker:{name}", "--to", "local-1", "--json")
    assert proc.returncode == 0, proc.stderr
    back = json.loads(proc.stdout)
    assert (back["state"], back["mode"]) == ("done", "stop-copy")
    print(f"docker 2 -> 1: freeze {back['freeze_ms']} ms, {back['bytes_wire']} B, {back['stages_s']}")
    client.wait_for(client.progress() + 5)
    seen = client.stop()
    assert seen["survived"], seen["errors"]
    print(f"client: {seen['requests']} requests on one connection, max gap {seen['max_gap_ms']} ms")
    listed = {r["name"]: r for r in json.loads(cli("ps", "--json").stdout)}
    assert (listed[name]["host"], listed[name]["runtime"], listed[name]["state"]) == ("local-1", "docker", "running")
    assert name not in docker_of(m, "local-2").names()
    assert not engines.RUNC_CONF.exists() or engines.MARK not in engines.RUNC_CONF.read_text()
    leftovers = list((docker_of(m, "local-1").home / "tmp").glob("ctrd-checkpoint*"))
    assert not leftovers, f"containerd's checkpoint copies must be cleaned: {leftovers}"


def test_the_docker_container_cgroup_is_below_the_hosts_prefix_and_throttleable(counter: dict) -> None:
    """Auto-converge's throttle finds a Docker container's cgroup by asking the kernel (cgroupfs driver here:
    our --cgroup-parent, then the container's ID) and can read its CPU limit there."""
    m, name = counter["mesh"], counter["name"]
    cgroup = docker_of(m, "local-1").cgroup(name)
    assert cgroup.startswith(f"/skyferry/{m.name}/local-1/docker/"), cgroup
    files = CpuFiles.of(cgroup)
    assert files.usage_s() > 0 and files.period_us() > 0


def test_a_failed_transfer_thaws_the_frozen_docker_source(counter: dict) -> None:
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
    assert name not in docker_of(m, "local-2").names()
    assert not docker_of(m, "local-2").holds_netns(name), "the target's netns holder must be gone"
    client.wait_for(client.progress() + 3)
    seen = client.stop()
    assert seen["survived"], seen["errors"]


def test_target_without_docker_is_refused_and_the_source_runs_on(counter: dict) -> None:
    state, name, m, client = counter["state"], counter["name"], counter["mesh"], counter["client"]
    with pytest.raises(SkyferryError, match=r"failed at prepare.*no Docker daemon for this host"):
        migration.migrate(state, name, "local-4", mode="stop-copy")
    assert where(state, name)["host"] == "local-1" and where(state, name)["state"] == "running"
    with pytest.raises(SkyferryError, match="unknown container 'nope'"):
        containers.resolve(state, "docker:nope")
    with pytest.raises(SkyferryError, match=f"container '{name}' runs in docker, not podman"):
        containers.resolve(state, f"podman:{name}")
    client.wait_for(client.progress() + 3)
    seen = client.stop()
    assert seen["survived"], seen["errors"]
    assert not docker_of(m, "local-4").staging.exists() or not any(docker_of(m, "local-4").staging.iterdir())


def test_docker_without_checkpoint_support_is_refused_before_the_freeze(
    mesh: tuple[Path, Mesh], image: Path, tmp_path: Path
) -> None:
    """local-4 gets a dockerd without experimental features: its containers run but cannot checkpoint."""
    state, m = mesh
    daemon = docker_of(m, "local-4").daemon(m.hosts["local-4"].netns, experimental=False).start()
    try:
        info = containers.run(state, "local-4", "docker:nockpt", engines.COUNTER_ARGS, image=image)
        client = scenario.CounterClient(m.hosts["local-3"].netns or "", info["ip"], tmp_path).start()
        try:
            with pytest.raises(SkyferryError, match="cannot checkpoint: experimental features are off"):
                migration.migrate(state, "nockpt", "local-2", mode="stop-copy")
            assert where(state, "nockpt")["host"] == "local-4" and where(state, "nockpt")["state"] == "running"
            assert "nockpt" not in docker_of(m, "local-2").names()
            client.wait_for(client.progress() + 3)
            seen = client.stop()
            assert seen["survived"], seen["errors"]
        finally:
            client.stop()
            containers.remove(state, "nockpt")
    finally:
        daemon.stop()


def image_roots(state: Path, m: Mesh) -> list[Path]:
    """Everywhere a checkpoint image could land: every host's state root (the engine's data root, exec root
    and containerd's TMPDIR, the adapter's staging, the logs), the controller's state, the migrations' tmpfs."""
    return imagescan.distinct([state, IMAGES_TMPFS / m.name, *(Path(h.state_root) for h in m.hosts.values())])


def test_no_checkpoint_image_on_persistent_disk(counter: dict) -> None:
    """During and after a Docker migration, every CRIU image (or archive of them) is on tmpfs; then none is
    left at all. Seeing Docker's and containerd's own copies on tmpfs is the positive control."""
    state, name, m = counter["state"], counter["name"], counter["mesh"]
    roots = image_roots(state, m)
    with imagescan.Watcher(roots) as watch:
        report = migration.migrate(state, name, "local-2", mode="stop-copy")
    assert report["state"] == "done"
    assert imagescan.on_disk(watch.seen) == [], "checkpoint images on persistent disk"
    engine_copies = [p for p in watch.seen if "/docker/data/" in str(p) or "/docker/tmp/" in str(p)]
    assert engine_copies, f"the watcher must see Docker's own copies ({watch.polls} polls): {sorted(watch.seen)}"
    assert any(IMAGES_TMPFS in p.parents for p in watch.seen), "and the migration's images"
    assert imagescan.images(roots) == {}, "every image is wiped after the migration"


def _damage(images: Path) -> None:
    """Overwrite a core image: CRIU's restore then fails."""
    next(images.glob("core-*.img")).write_bytes(b"damaged" * 64)


def test_a_failed_docker_restore_leaves_no_image_anywhere(counter: dict) -> None:
    """CRIU fails inside `docker start --checkpoint` (a damaged core image, after Docker and containerd
    made their copies): no image on disk during it, none anywhere after it, no mount left behind."""
    state, name, m = counter["state"], counter["name"], counter["mesh"]
    host = docker_of(m, "local-1")
    mig = IMAGES_TMPFS / m.name / f"imgtest-{os.urandom(3).hex()}"
    roots = image_roots(state, m)
    try:
        with imagescan.Watcher(roots) as watch:
            selfmove.up_to_restore(host, "docker", name, f"/run/netns/{m.name}-local-1-{name}", mig, _damage)
            with pytest.raises(SkyferryError, match="start --checkpoint failed"):
                host.restore(name, mig / "images", mig / "work")
        assert imagescan.on_disk(watch.seen) == [], "checkpoint images on persistent disk"
        assert [p for p in watch.seen if "/docker/data/containers/" in str(p)], "the bind mount was seen"
        with open("/proc/self/mountinfo") as f:
            assert "/checkpoints/" not in f.read(), "the checkpoint folder's bind mount must be gone"
    finally:
        shutil.rmtree(mig, ignore_errors=True)
    assert imagescan.images(roots) == {}, "nothing left once the migration's tmpfs dir is wiped"
