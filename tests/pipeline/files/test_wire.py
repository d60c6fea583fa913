"""The stop-copy stream's unpacking (wire.decode) keeps every entry inside its directory, even when a
peer sends the same name twice (a symlink out, then a file) or a hard link through a symlink."""

import io
import os
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.files import wire
from skyferry.pipeline.hostapi.framing import FrameWriter


def _entry(tar: tarfile.TarFile, name: str, kind: str = "file", target: str = "", data: bytes = b"") -> None:
    info = tarfile.TarInfo(name)
    kinds = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "sym": tarfile.SYMTYPE, "hard": tarfile.LNKTYPE,
             "fifo": tarfile.FIFOTYPE, "chr": tarfile.CHRTYPE}  # fmt: skip
    info.type = kinds[kind]
    info.linkname, info.size, info.mode = target, len(data), 0o755 if kind == "dir" else 0o644
    tar.addfile(info, io.BytesIO(data))


def _stream(entries: list[tuple]) -> tuple[bytes, bytes]:
    """A stream as a peer could send it, and its bare tar."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in entries:
            _entry(tar, *entry)
    writer = FrameWriter(wire.FORMAT, wire.ZSTD_LEVEL)
    return writer.head("image") + writer.frame(wire.DATA, buf.getvalue()) + writer.end({"bytes_raw": 0}), buf.getvalue()


@pytest.fixture
def canary(tmp_path: Path) -> Path:
    (tmp_path / "canary").mkdir()
    (tmp_path / "canary" / "secret").write_bytes(b"host secret")
    return tmp_path / "canary"


def test_a_repeated_name_never_writes_through_the_first_ones_symlink(tmp_path: Path, canary: Path) -> None:
    stream, bare = _stream([("rootfs/a", "sym", str(canary / "secret")), ("rootfs/a", "file", "", b"pwned")])
    naive = tmp_path / "naive"
    with tarfile.open(fileobj=io.BytesIO(bare)) as tar:
        tar.extractall(naive)  # the positive control: plain tarfile writes through the link
    assert (canary / "secret").read_bytes() == b"pwned"
    (canary / "secret").write_bytes(b"host secret")

    wire.decode(io.BytesIO(stream), {"rootfs": tmp_path / "dst"}, wire.StreamStats())
    assert (canary / "secret").read_bytes() == b"host secret"
    assert (tmp_path / "dst/a").read_bytes() == b"pwned" and not (tmp_path / "dst/a").is_symlink()


def test_a_hard_link_through_a_symlink_is_refused(tmp_path: Path, canary: Path) -> None:
    stream, _ = _stream([("rootfs/l", "sym", str(canary)), ("rootfs/h", "hard", "rootfs/l/secret")])
    with pytest.raises(SkyferryError, match="would reach outside"):
        wire.decode(io.BytesIO(stream), {"rootfs": tmp_path / "dst"}, wire.StreamStats())
    assert (canary / "secret").stat().st_nlink == 1, "no link to the host file may exist"


def test_a_plain_stream_unpacks_in_full(tmp_path: Path) -> None:
    entries = [("rootfs/d", "dir"), ("rootfs/d/f", "file", "", b"data"), ("rootfs/d/s", "sym", "f")]
    stream, _ = _stream(entries)
    wire.decode(io.BytesIO(stream), {"rootfs": tmp_path / "dst"}, wire.StreamStats())
    assert (tmp_path / "dst/d/s").read_bytes() == b"data" and (tmp_path / "dst/d/s").is_symlink()


def test_a_named_fifo_crosses_as_a_node(tmp_path: Path) -> None:
    """Stop-copy carries a FIFO in the rootfs as its node (mode, owner): CRIU reopens it by name."""
    src = tmp_path / "src"
    (src / "run").mkdir(parents=True)
    os.mkfifo(src / "run/queue", 0o620)
    if os.geteuid() == 0:
        os.chown(src / "run/queue", 1234, 5678)
    sent = wire.StreamStats()
    stream = b"".join(wire.encode({"rootfs": src}, sent))
    got = wire.StreamStats()
    wire.decode(io.BytesIO(stream), {"rootfs": tmp_path / "dst"}, got)
    before, after = (src / "run/queue").lstat(), (tmp_path / "dst/run/queue").lstat()
    assert stat.S_ISFIFO(after.st_mode) and got.sha256 == sent.sha256
    assert (after.st_mode, after.st_uid, after.st_gid) == (before.st_mode, before.st_uid, before.st_gid)


def test_a_fifo_through_a_symlink_and_devices_are_refused(tmp_path: Path, canary: Path) -> None:
    stream, _ = _stream([("rootfs/l", "sym", str(canary)), ("rootfs/l/fifo", "fifo")])
    with pytest.raises(SkyferryError, match="would reach outside"):
        wire.decode(io.BytesIO(stream), {"rootfs": tmp_path / "dst"}, wire.StreamStats())
    stream, _ = _stream([("rootfs/null", "chr")])
    with pytest.raises(SkyferryError, match="refusing tar entry"):
        wire.decode(io.BytesIO(stream), {"rootfs": tmp_path / "dst2"}, wire.StreamStats())
    assert sorted(p.name for p in canary.iterdir()) == ["secret"]


def test_hard_links_in_a_rootfs_cross_as_links(tmp_path: Path) -> None:
    """An image's rootfs has hard links (perl, perl5.36.0); the tar names the target by its archive name
    (`rootfs/usr/bin/perl`), which the target resolves inside its own rootfs."""
    src = tmp_path / "src"
    (src / "usr/bin").mkdir(parents=True)
    (src / "usr/bin/perl").write_bytes(b"#!perl")
    os.link(src / "usr/bin/perl", src / "usr/bin/perl5.36.0")
    stream = b"".join(wire.encode({"rootfs": src}, wire.StreamStats()))
    wire.decode(io.BytesIO(stream), {"rootfs": tmp_path / "dst"}, wire.StreamStats())
    perl, versioned = (tmp_path / "dst/usr/bin/perl").stat(), (tmp_path / "dst/usr/bin/perl5.36.0").stat()
    assert perl.st_ino == versioned.st_ino and perl.st_nlink == 2
    assert (tmp_path / "dst/usr/bin/perl5.36.0").read_bytes() == b"#!perl"


def test_a_hard_link_into_another_directory_is_refused(tmp_path: Path) -> None:
    stream, _ = _stream([("rootfs/f", "file", "", b"x"), ("data/h", "hard", "rootfs/f")])
    with pytest.raises(SkyferryError, match="across directories"):
        wire.decode(io.BytesIO(stream), {"rootfs": tmp_path / "r", "data": tmp_path / "d"}, wire.StreamStats())


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount")
def test_wipe_detaches_what_a_killed_criu_left_mounted(tmp_path: Path) -> None:
    """A killed CRIU's cgroup yard stays mounted in its work dir; wipe must not walk into it."""
    work = tmp_path / "mig" / "work1"
    yard = work / ".criu.cgyard.x"
    yard.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "none", str(yard)], check=True)
    (yard / "inside").write_text("a file of another file system")
    assert wire.mounts_below(tmp_path / "mig") == [str(yard)]  # positive control: the mount is seen
    wire.wipe(tmp_path / "mig")
    assert not os.path.ismount(yard) and not (tmp_path / "mig").exists()
    assert wire.mounts_below(tmp_path) == []
