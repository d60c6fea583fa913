"""What a real agent keeps on disk: its tmpfs directories are root's, 0700, and no symlink; and a container
that turns its log into a symlink to a host file gets the agent to read nothing through it."""

import os
import secrets
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kit.mesh import local_mesh
from skyferry.netplane.mesh import Mesh
from skyferry.pipeline.controller import containers
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.hostapi.layout import IMAGES_TMPFS
from skyferry.pipeline.scenarios import demo as scenario

pytestmark = [pytest.mark.integration, pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Mesh]]:
    with local_mesh(tmp_path_factory, count=1, prefix="p") as made:
        yield made


def test_the_agents_tmpfs_directories_are_roots_and_0700(mesh: tuple[Path, Mesh]) -> None:
    _, m = mesh
    for path in (IMAGES_TMPFS, IMAGES_TMPFS / m.name, IMAGES_TMPFS / m.name / "local-1"):
        st = path.lstat()
        assert stat.S_ISDIR(st.st_mode) and st.st_uid == 0 and st.st_mode & 0o777 == 0o700, (path, oct(st.st_mode))


def _python(code: str) -> list[str]:
    return [scenario.PYTHON, "-c", code]


def test_a_log_symlinked_to_a_host_file_is_not_followed(mesh: tuple[Path, Mesh], tmp_path: Path) -> None:
    state, m = mesh
    canary = tmp_path / "host-secret"
    canary.write_text(f"host secret {secrets.token_hex(8)}\n")
    rootfs = scenario.counter_rootfs(tmp_path)
    plain = "import time; print('hello from plain', flush=True); time.sleep(600)"
    hostile = (
        "import os, time; print('hello from hostile', flush=True); "
        f"os.symlink({str(canary)!r}, '/.skyferry/app.new'); os.replace('/.skyferry/app.new', '/.skyferry/app.log'); "
        "time.sleep(600)"
    )
    containers.run(state, "local-1", "plainlog", _python(plain), rootfs=rootfs)
    containers.run(state, "local-1", "hostilelog", _python(hostile), rootfs=rootfs)
    try:
        deadline = time.monotonic() + 30
        while b"hello from plain" not in containers.logs(state, "plainlog") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert b"hello from plain" in containers.logs(state, "plainlog"), "positive control: logs are read"
        link = Path(m.hosts["local-1"].state_root)
        links = list(link.rglob("hostilelog/rootfs/.skyferry/app.log"))
        while not (links and links[0].is_symlink()) and time.monotonic() < deadline:
            time.sleep(0.2)
            links = list(link.rglob("hostilelog/rootfs/.skyferry/app.log"))
        assert links and links[0].is_symlink(), "the container replaced its log with a symlink"
        with pytest.raises(SkyferryError, match="symlink; not followed") as refused:
            containers.logs(state, "hostilelog")
        assert canary.read_text() not in str(refused.value)
    finally:
        containers.remove(state, "plainlog")
        containers.remove(state, "hostilelog")
