"""Agent-owned directories in a world-writable place, and files read from a container's rootfs: a planted
symlink or someone else's directory is refused, never followed. Each refusal has its positive control."""

import os
from pathlib import Path

import pytest
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.hostapi import privdir

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (ownership checks)")


@pytest.fixture
def shm(tmp_path: Path) -> Path:
    """A stand-in for /dev/shm: world-writable and sticky."""
    base = tmp_path / "shm"
    base.mkdir()
    base.chmod(0o1777)
    return base


def test_directories_are_made_0700_and_owned_by_root(shm: Path) -> None:
    path = privdir.ensure(shm / "skyferry" / "mesh" / "host", below=shm)
    for step in (shm / "skyferry", shm / "skyferry" / "mesh", path):
        st = step.lstat()
        assert st.st_mode & 0o777 == 0o700 and st.st_uid == 0, (step, oct(st.st_mode))
    assert privdir.verified(path, below=shm)
    assert not privdir.verified(shm / "skyferry" / "other", below=shm)  # absent: nothing to remove


def test_a_planted_symlink_is_refused_and_its_target_untouched(shm: Path, tmp_path: Path) -> None:
    victim = tmp_path / "etc"
    (victim / "mesh" / "host").mkdir(parents=True)
    (victim / "mesh" / "host" / "passwd").write_text("root:x:0:0\n")
    (shm / "skyferry").symlink_to(victim)
    with pytest.raises(SkyferryError, match="symlink"):
        privdir.ensure(shm / "skyferry" / "mesh" / "host", below=shm)
    with pytest.raises(SkyferryError, match="symlink"):
        privdir.verified(shm / "skyferry" / "mesh" / "host", below=shm)
    assert (victim / "mesh" / "host" / "passwd").read_text() == "root:x:0:0\n"
    assert (shm / "skyferry").is_symlink()


def test_another_users_directory_is_refused(shm: Path) -> None:
    planted = shm / "skyferry"
    planted.mkdir(mode=0o777)
    os.chown(planted, 65534, 65534)
    with pytest.raises(SkyferryError, match="owned by uid 65534"):
        privdir.ensure(planted / "mesh", below=shm)
    assert not (planted / "mesh").exists()


def test_our_own_loose_directory_is_tightened(shm: Path) -> None:
    """What an older agent left (0755, root's): safe to keep, once only root can enter it."""
    (shm / "skyferry").mkdir(mode=0o755)
    privdir.ensure(shm / "skyferry" / "m", below=shm)
    assert (shm / "skyferry").stat().st_mode & 0o777 == 0o700


def test_read_beneath_reads_a_plain_file_and_follows_no_symlink(tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    (rootfs / ".skyferry").mkdir(parents=True)
    host_file = tmp_path / "shadow"
    host_file.write_text("host secret\n")
    log = rootfs / ".skyferry" / "app.log"
    log.write_text("hello\n")
    assert privdir.read_beneath(rootfs, ".skyferry/app.log") == b"hello\n"  # positive control
    log.unlink()
    assert privdir.read_beneath(rootfs, ".skyferry/app.log") is None
    log.symlink_to(host_file)
    with pytest.raises(SkyferryError, match="symlink"):
        privdir.read_beneath(rootfs, ".skyferry/app.log")
    log.unlink()
    (rootfs / ".skyferry").rmdir()
    (rootfs / ".skyferry").symlink_to(tmp_path)  # the directory on the way, not only the file
    (tmp_path / "app.log").write_text("host log\n")
    with pytest.raises(SkyferryError, match="symlink"):
        privdir.read_beneath(rootfs, ".skyferry/app.log")


def test_read_beneath_refuses_fifos_and_hard_links(tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    (rootfs / ".skyferry").mkdir(parents=True)
    os.mkfifo(rootfs / ".skyferry" / "app.log")  # reading it would block the agent forever
    with pytest.raises(SkyferryError, match="not a plain file"):
        privdir.read_beneath(rootfs, ".skyferry/app.log")
    (rootfs / ".skyferry" / "app.log").unlink()
    outside = tmp_path / "host-file"
    outside.write_text("host\n")
    os.link(outside, rootfs / ".skyferry" / "app.log")
    with pytest.raises(SkyferryError, match="not a plain file"):
        privdir.read_beneath(rootfs, ".skyferry/app.log")
    with pytest.raises(ValueError):
        privdir.read_beneath(rootfs, "../host-file")
