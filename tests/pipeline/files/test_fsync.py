"""File-system rounds on real directories: deltas, deletions, damage, and a live writer frozen with SIGSTOP.

Every stream crosses as bytes only: the target's directories never read the source's.
"""

from __future__ import annotations

import hashlib
import os
import signal
import stat
import struct
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.files.applier import FsApplier
from skyferry.pipeline.files.fsync import STAGING, FsStats, FsTracker, _info, _Writer

MB = 1 << 20


def tree(root: Path) -> dict[str, tuple[object, ...]]:
    """Everything below root: type, mode, owner, mtime, xattrs, and the symlink target or size, links and sha256."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            xattrs = sorted(
                (k, os.getxattr(path, k, follow_symlinks=False)) for k in os.listxattr(path, follow_symlinks=False)
            )
            common = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns, xattrs)
            if stat.S_ISLNK(st.st_mode):
                out[str(path.relative_to(root))] = (*common, os.readlink(path))
            elif stat.S_ISREG(st.st_mode):
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                out[str(path.relative_to(root))] = (*common, st.st_size, st.st_nlink, digest)
            else:
                out[str(path.relative_to(root))] = common
    return out


def sync(tracker: FsTracker, applier: FsApplier, kind: str = "round", pids: tuple[int, ...] = ()) -> FsStats:
    stats = FsStats()
    chunks = list(tracker.final(stats, pids) if kind == "final" else tracker.round(stats))
    seen = applier.apply(chunks)
    assert (seen.sha256, seen.bytes_wire, seen.files_sent) == (stats.sha256, stats.bytes_wire, stats.files_sent)
    return stats


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path, FsTracker, FsApplier]:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    return src, dst, FsTracker({"rootfs": src}), FsApplier({"rootfs": dst})


def make_rootfs(root: Path) -> None:
    for d in ("etc", "usr/bin", "var/log", "var/lib/app/cache", "tmp"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "etc/hostname").write_text("box\n")
    (root / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    (root / "etc/empty").write_bytes(b"")
    (root / "usr/bin/tool").write_bytes(os.urandom(200_000))
    (root / "usr/bin/tool").chmod(0o4755)
    (root / "usr/bin/alias").symlink_to("tool")
    (root / "var/log/app.log").write_text("start\n" * 1000)
    for i in range(20):
        (root / f"var/lib/app/cache/{i:02}").write_bytes(os.urandom(1000 + i))
    (root / "tmp").chmod(0o1777)
    os.setxattr(root / "var/log", "user.note", b"\x00\xffbinary")
    if os.geteuid() == 0:
        os.chown(root / "etc/passwd", 1234, 5678)
        os.chown(root / "usr/bin/tool", 0, 1234)
        # A file capability (cap_net_raw, effective): chown clears it, so the target must set it after.
        os.setxattr(root / "usr/bin/tool", "security.capability", struct.pack("<5I", 0x02000001, 1 << 13, 0, 0, 0))


def test_rounds_send_only_what_changed(pair: tuple[Path, Path, FsTracker, FsApplier]) -> None:
    src, dst, tracker, applier = pair
    make_rootfs(src)
    first = sync(tracker, applier)
    assert tree(dst) == tree(src)
    assert first.files_sent == first.files_scanned - first.dirs_sent == 26
    assert first.bytes_raw > 200_000

    idle = sync(tracker, applier)
    assert (idle.files_sent, idle.bytes_raw, idle.deletions) == (0, 0, 0)
    assert idle.files_scanned == first.files_scanned

    with (src / "var/log/app.log").open("a") as f:  # append
        f.write("more\n")
    (src / "etc/hostname").chmod(0o600)  # mode only
    (src / "etc/new").write_text("new\n")  # create
    (src / "var/lib/app/cache/00").rename(src / "var/lib/app/cache/moved")  # rename
    (src / "var/lib/app/cache/01").unlink()  # delete
    (src / "usr/bin/alias").unlink()
    (src / "usr/bin/alias").symlink_to("/usr/bin/tool")  # retarget a symlink
    (src / "etc/empty2").write_bytes(b"")  # a new empty file
    delta = sync(tracker, applier)
    assert tree(dst) == tree(src)
    assert delta.files_sent == 6  # app.log, hostname, new, moved, alias, empty2
    assert delta.deletions == 2  # cache/00 (renamed away), cache/01
    assert delta.bytes_raw == (src / "var/log/app.log").stat().st_size + len("box\n") + len("new\n") + 1000


def test_deletions_and_type_changes(pair: tuple[Path, Path, FsTracker, FsApplier]) -> None:
    src, dst, tracker, applier = pair
    make_rootfs(src)
    (src / "becomes_dir").write_text("file")
    (src / "becomes_file").mkdir()
    (src / "becomes_file/child").write_text("x")
    (src / "link_becomes_file").symlink_to("etc")
    sync(tracker, applier)

    (src / "becomes_dir").unlink()
    (src / "becomes_dir").mkdir()
    (src / "becomes_dir/inner").write_text("inner")
    (src / "becomes_file/child").unlink()
    (src / "becomes_file").rmdir()
    (src / "becomes_file").write_text("now a file")
    (src / "link_becomes_file").unlink()
    (src / "link_becomes_file").write_text("plain")
    for p in sorted((src / "var/lib").rglob("*"), reverse=True):  # a whole subtree goes
        p.rmdir() if p.is_dir() else p.unlink()
    (src / "var/lib").rmdir()
    stats = sync(tracker, applier)
    assert tree(dst) == tree(src)
    assert stats.deletions == 1 + 3 + 20  # becomes_file/child; var/lib, app, cache; 20 cache files


def test_named_fifos_move_as_nodes(pair: tuple[Path, Path, FsTracker, FsApplier]) -> None:
    """CRIU reopens a FIFO a process holds by its name: the rounds make it on the target (mode, owner,
    mtime), resend it when its mode changes, delete it when it goes, and never open it (a blocking open
    of a FIFO nobody writes to would hang the round)."""
    src, dst, tracker, applier = pair
    make_rootfs(src)
    os.mkfifo(src / "var/lib/app/queue", 0o640)
    if os.geteuid() == 0:
        os.chown(src / "var/lib/app/queue", 1234, 5678)
    first = sync(tracker, applier)
    assert stat.S_ISFIFO((dst / "var/lib/app/queue").lstat().st_mode)
    assert tree(dst) == tree(src)
    assert first.files_sent == 27  # make_rootfs's 26 and the FIFO

    (src / "var/lib/app/queue").chmod(0o600)
    os.mkfifo(src / "tmp/second")
    delta = sync(tracker, applier)
    assert tree(dst) == tree(src)
    assert (delta.files_sent, delta.bytes_raw) == (2, 0)

    (src / "var/lib/app/queue").unlink()
    (src / "var/lib/app/queue").write_text("a file now")  # a FIFO replaced by a file of that name
    (src / "tmp/second").unlink()
    last = sync(tracker, applier, kind="final")
    assert tree(dst) == tree(src)
    assert last.deletions == 1 and not (dst / "tmp/second").exists()


def test_hard_links_stay_links(pair: tuple[Path, Path, FsTracker, FsApplier]) -> None:
    src, dst, tracker, applier = pair
    make_rootfs(src)
    (src / "usr/bin/tool2").hardlink_to(src / "usr/bin/tool")
    (src / "etc/tool3").hardlink_to(src / "usr/bin/tool")
    first = sync(tracker, applier)
    assert (
        first.bytes_raw
        == sum(p.stat().st_size for p in src.rglob("*") if p.is_file() and not p.is_symlink()) - 2 * 200_000
    )
    assert tree(dst) == tree(src)
    assert (dst / "usr/bin/tool").stat().st_ino == (dst / "etc/tool3").stat().st_ino

    with (src / "etc/tool3").open("r+b") as f:  # a write through one name changes all three
        f.write(b"patched")
    again = sync(tracker, applier)
    assert (again.files_sent, again.bytes_raw) == (3, 200_000)
    (src / "usr/bin/tool2").unlink()  # the others' link count (ctime) changes: they are sent again, once
    last = sync(tracker, applier)
    assert (last.files_sent, last.bytes_raw, last.deletions) == (2, 200_000, 1)
    assert tree(dst) == tree(src)


def test_big_file_rewritten_in_the_middle_is_resent(pair: tuple[Path, Path, FsTracker, FsApplier]) -> None:
    src, dst, tracker, applier = pair
    block = os.urandom(MB)
    with (src / "big").open("wb") as f:
        for i in range(50):
            f.write(block[i:] + block[:i])
    (src / "small").write_text("unchanged")
    first = sync(tracker, applier)
    assert first.bytes_raw == 50 * MB + len("unchanged")

    with (src / "big").open("r+b") as f:  # same size, same inode: only mtime and contents change
        f.seek(25 * MB + 123)
        f.write(b"rewritten in the middle")
    second = sync(tracker, applier)
    assert (second.files_sent, second.bytes_raw) == (1, 50 * MB)
    assert tree(dst) == tree(src)


def test_file_modified_or_truncated_while_read_is_resent(pair: tuple[Path, Path, FsTracker, FsApplier]) -> None:
    src, dst, tracker, applier = pair
    (src / "big").write_bytes(os.urandom(20 * MB))
    sync(tracker, applier)

    for change in ("overwrite", "truncate"):
        (src / "big").write_bytes(os.urandom(20 * MB))  # changed: round n sends it
        stats = FsStats()
        chunks: list[bytes] = []
        for chunk in tracker.round(stats):
            chunks.append(chunk)
            if stats.bytes_wire > 4 * MB and change:
                # Mid-read: the first megabytes are already in the stream.
                if change == "overwrite":
                    with (src / "big").open("r+b") as f:
                        f.write(b"changed after it was read")
                else:
                    os.truncate(src / "big", 5 * MB)
                change = ""
        assert not change, "the round never yielded mid-file"
        applier.apply(chunks)
        assert tree(dst) != tree(src)  # the target got what was read, not what the file became
        again = sync(tracker, applier)
        assert again.files_sent == 1
        assert tree(dst) == tree(src)
        assert sync(tracker, applier).files_sent == 0


def test_volumes_are_more_directories(tmp_path: Path) -> None:
    dirs = {"rootfs": tmp_path / "src-rootfs", "data": tmp_path / "src-data"}
    dest = {"rootfs": tmp_path / "dst-rootfs", "data": tmp_path / "dst-data"}
    make_rootfs(dirs["rootfs"])
    dirs["data"].mkdir()
    (dirs["data"] / "db").write_bytes(os.urandom(10_000))
    tracker, applier = FsTracker(dirs), FsApplier(dest)
    sync(tracker, applier)
    (dirs["data"] / "db").write_bytes(os.urandom(10_000))
    assert sync(tracker, applier).files_sent == 1
    assert all(tree(dest[k]) == tree(dirs[k]) for k in dirs)
    with pytest.raises(SkyferryError, match="directories"):
        FsApplier({"rootfs": dest["rootfs"]}).apply(list(FsTracker(dirs).round(FsStats())))
    (dirs["data"] / "db").unlink()
    dirs["data"].rmdir()
    with pytest.raises(SkyferryError, match="missing"):  # not "everything in it was deleted"
        list(tracker.round(FsStats()))
    assert (dest["data"] / "db").exists()


def damaged(stream: bytes) -> Iterator[tuple[str, bytes]]:
    for pos in [0, 9, 14, 100, len(stream) // 3, len(stream) // 2, len(stream) - 40, len(stream) - 33, len(stream) - 1]:
        flipped = bytearray(stream)
        flipped[pos] ^= 0x10
        yield f"flip@{pos}", bytes(flipped)
    for cut in (5, 20, len(stream) // 2, len(stream) - 33, len(stream) - 1):
        yield f"cut@{cut}", stream[:cut]
    yield "trailing", stream + b"x"


def test_damaged_streams_change_nothing(pair: tuple[Path, Path, FsTracker, FsApplier]) -> None:
    src, dst, tracker, applier = pair
    make_rootfs(src)
    sync(tracker, applier)
    before = tree(dst)
    (src / "etc/hostname").write_text("renamed-box\n")
    (src / "usr/bin/tool").write_bytes(os.urandom(300_000))
    (src / "etc/passwd").unlink()
    stream = b"".join(tracker.round(FsStats()))
    for what, bad in damaged(stream):
        with pytest.raises(SkyferryError):
            applier.apply([bad[i : i + 4096] for i in range(0, len(bad), 4096)])
        assert tree(dst) == before, what
        assert not list(dst.glob(f"{STAGING}*")), what
    applier.apply([stream])  # the intact stream still applies: refusals left the sequence alone
    assert tree(dst) == tree(src)


def test_a_lost_round_needs_a_full_round(pair: tuple[Path, Path, FsTracker, FsApplier]) -> None:
    src, dst, tracker, applier = pair
    make_rootfs(src)
    sync(tracker, applier)
    (src / "etc/hostname").write_text("lost\n")
    list(tracker.round(FsStats()))  # sent in full, never applied
    (dst / "stray").write_text("left by an earlier attempt")
    with pytest.raises(SkyferryError, match="out of sequence") as err:
        applier.apply(tracker.round(FsStats()))
    assert "reset" in (err.value.hint or "")
    tracker.reset()
    full = sync(tracker, applier)
    assert full.files_sent == 26
    assert tree(dst) == tree(src)  # the stray file is gone too


def test_a_failed_commit_needs_a_full_round(pair: tuple[Path, Path, FsTracker, FsApplier]) -> None:
    src, dst, tracker, applier = pair
    make_rootfs(src)
    time.sleep(0.05)  # past the clock tick: the round records var/log as settled and will not resend it
    sync(tracker, applier)
    for p in (dst / "var/log").iterdir():  # the target's tree changed behind the applier's back
        p.unlink()
    (dst / "var/log").rmdir()
    with (src / "var/log/app.log").open("a") as f:
        f.write("more\n")
    (src / "etc/hostname").write_text("changed\n")
    with pytest.raises(SkyferryError, match="failed") as err:
        applier.apply(tracker.round(FsStats()))
    assert "reset" in (err.value.hint or "")
    (src / "etc/new").write_text("new\n")
    with pytest.raises(SkyferryError, match="out of sequence"):  # half-applied: only a full round will do
        applier.apply(tracker.round(FsStats()))
    tracker.reset()
    sync(tracker, applier)
    assert tree(dst) == tree(src)


def crafted(entries: list[tuple[tarfile.TarInfo, bytes]], deleted: list[list[str]] | None = None) -> bytes:
    stats = FsStats()
    out = _Writer(stats, 1)
    manifest = {"kind": "round", "session": "s", "seq": 1, "full": False, "dirs": ["rootfs"], "deleted": deleted or []}
    parts = [out.head(manifest)]
    for info, data in entries:
        parts += list(out.add(info, data))
    return b"".join(parts + list(out.close()))


def test_paths_that_escape_are_refused(tmp_path: Path) -> None:
    dst, outside = tmp_path / "dst", tmp_path / "outside"
    dst.mkdir()
    outside.mkdir()
    (dst / "link").symlink_to(outside)
    (outside / "keep").write_text("keep")
    applier = FsApplier({"rootfs": dst})
    hardlink = _info("rootfs/h", tarfile.LNKTYPE)
    hardlink.linkname = "../outside/keep"
    device = _info("rootfs/dev", tarfile.CHRTYPE)
    block = _info("rootfs/blk", tarfile.BLKTYPE)
    symlink = _info("rootfs/d", tarfile.SYMTYPE, link=str(outside / "keep"))
    bad_streams = {
        "dotdot": crafted([(_info("rootfs/../outside/x", tarfile.REGTYPE), b"x")]),
        "through symlink": crafted([(_info("rootfs/link/x", tarfile.REGTYPE), b"x")]),
        "absolute": crafted([(_info("rootfs//etc/x", tarfile.REGTYPE), b"x")]),
        "other dir": crafted([(_info("volume/x", tarfile.REGTYPE), b"x")]),
        "hard link": crafted([(hardlink, b"")]),
        "device": crafted([(device, b"")]),
        "block device": crafted([(block, b"")]),
        "fifo through symlink": crafted([(_info("rootfs/link/fifo", tarfile.FIFOTYPE), b"")]),
        "duplicate": crafted([(symlink, b""), (_info("rootfs/d", tarfile.REGTYPE), b"x")]),
        "delete outside": crafted([], deleted=[["rootfs", "../outside/keep"]]),
        "delete through symlink": crafted([], deleted=[["rootfs", "link/keep"]]),
    }
    for what, stream in bad_streams.items():
        with pytest.raises(SkyferryError):
            applier.apply([stream])
        assert sorted(p.name for p in outside.iterdir()) == ["keep"], what
        assert sorted(p.name for p in dst.iterdir()) == ["link"], what


def test_a_symlink_on_the_target_is_replaced_not_followed(pair: tuple[Path, Path, FsTracker, FsApplier]) -> None:
    src, dst, tracker, applier = pair
    outside = src.parent / "outside"
    outside.mkdir()
    dst.mkdir()
    (dst / "etc").symlink_to(outside)  # left on the target; the source has a real directory there
    make_rootfs(src)
    sync(tracker, applier)
    assert list(outside.iterdir()) == []
    assert tree(dst) == tree(src)


WRITER = r"""
import mmap, os, random, sys, time
rootfs, data = sys.argv[1], sys.argv[2]
os.makedirs(f"{rootfs}/var/spool", exist_ok=True)
log = open(f"{rootfs}/var/log/app.log", "a", buffering=1)      # held open for the whole run
with open(f"{data}/mapped.bin", "wb") as f:
    f.truncate(1 << 20)
mfd = os.open(f"{data}/mapped.bin", os.O_RDWR)
mapped = mmap.mmap(mfd, 1 << 20, mmap.MAP_SHARED)               # stores here leave mtime alone once dirty
blob = os.open(f"{data}/blob", os.O_RDWR | os.O_CREAT)
os.ftruncate(blob, 4 << 20)
print("ready", flush=True)
n = 0
while True:
    n += 1
    log.write(f"line {n} {time.time_ns()}\n")
    with open(f"{rootfs}/var/spool/{n:06}", "wb") as f:
        f.write(os.urandom(random.randrange(0, 5000)))
    if n > 30:
        os.unlink(f"{rootfs}/var/spool/{n - 30:06}")
    tmp = f"{rootfs}/etc/state.json.tmp"
    with open(tmp, "w") as f:
        f.write('{"n": %d}' % n)
    os.rename(tmp, f"{rootfs}/etc/state.json")
    os.pwrite(blob, os.urandom(4096), random.randrange(0, 1024) * 4096)
    mapped[(n % 256) * 4096 : (n % 256) * 4096 + 16] = n.to_bytes(16, "little")
    time.sleep(0.002)
"""


def wait_stopped(pid: int) -> None:
    for _ in range(500):
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T":
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} did not stop")


@pytest.mark.integration
def test_live_writer_then_freeze_target_equals_source(tmp_path: Path) -> None:
    src = {"rootfs": tmp_path / "src-rootfs", "data": tmp_path / "src-data"}
    dst = {"rootfs": tmp_path / "dst-rootfs", "data": tmp_path / "dst-data"}
    make_rootfs(src["rootfs"])
    src["data"].mkdir()
    tracker, applier = FsTracker(src), FsApplier(dst)
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(src["rootfs"]), str(src["data"])], stdout=subprocess.PIPE, text=True
    )
    try:
        assert writer.stdout is not None and writer.stdout.readline() == "ready\n"
        rounds = []
        for _ in range(5):
            time.sleep(0.1)
            rounds.append(sync(tracker, applier))
        assert all(r.files_sent > 0 for r in rounds[1:])  # the writer keeps changing things
        seen_after_rounds = set(tree(dst["rootfs"]))
        time.sleep(0.5)  # the last second before the freeze: the writer keeps going
        os.kill(writer.pid, signal.SIGSTOP)  # the freeze (runc pause stops the cgroup the same way)
        wait_stopped(writer.pid)
        final = sync(tracker, applier, "final", pids=(writer.pid,))
        for k in src:
            assert tree(dst[k]) == tree(src[k]), k
        assert final.files_sent > 0
        assert set(tree(dst["rootfs"])) - seen_after_rounds, "no file was created between the last round and the freeze"
        # What the frozen process holds open (CRIU checks sizes at restore) is identical on the target.
        held = [
            Path(os.readlink(fd)) for fd in Path(f"/proc/{writer.pid}/fd").iterdir() if os.readlink(fd).startswith("/")
        ]
        held = [p for p in held if p.is_file() and any(p.is_relative_to(d) for d in src.values())]
        assert {p.name for p in held} >= {"app.log", "mapped.bin", "blob"}
        for path in held:
            arc = next(k for k, d in src.items() if path.is_relative_to(d))
            twin = dst[arc] / path.relative_to(src[arc])
            assert twin.read_bytes() == path.read_bytes(), path
    finally:
        writer.kill()
        writer.wait()


MAPPER = r"""
import mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
mapped = mmap.mmap(fd, 1 << 16, mmap.MAP_SHARED)
for line in sys.stdin:                  # each line: store it at offset 0 of the shared mapping, then ack
    mapped[: len(line)] = line.encode()
    print("ok", flush=True)
"""


@pytest.mark.integration
def test_stores_to_a_shared_mapping_reach_the_final(pair: tuple[Path, Path, FsTracker, FsApplier]) -> None:
    """A store to an already-dirty mapped page leaves mtime alone; the final reads such files regardless."""
    src, dst, tracker, applier = pair
    (src / "db").write_bytes(bytes(1 << 16))
    mapper = subprocess.Popen(
        [sys.executable, "-c", MAPPER, str(src / "db")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert mapper.stdin is not None and mapper.stdout is not None

        def store(text: str) -> None:
            mapper.stdin.write(text + "\n")  # type: ignore[union-attr]
            mapper.stdin.flush()  # type: ignore[union-attr]
            assert mapper.stdout.readline() == "ok\n"  # type: ignore[union-attr]

        store("first")
        time.sleep(0.05)  # the round below sees a settled mtime (not one from its own clock tick)
        sync(tracker, applier)
        time.sleep(0.05)
        store("second, same page")
        os.kill(mapper.pid, signal.SIGSTOP)
        wait_stopped(mapper.pid)
        final = sync(tracker, applier, "final", pids=(mapper.pid,))
        assert final.files_sent == 1
        assert (dst / "db").read_bytes() == (src / "db").read_bytes()
        assert (dst / "db").read_bytes().startswith(b"second, same page")
    finally:
        mapper.kill()
        mapper.wait()
