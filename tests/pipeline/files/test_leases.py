"""Files under a write lease move without breaking it: the file rounds and the stop-copy tar read them
through the holder's own open file, refuse one held write-only, and the holder keeps its lease and lives.

The holder is a real process with real leases (zdtm's `file_lease00` shape); the positive control at the
end opens a leased file plainly and shows that this breaks the lease.
"""

import io
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.files import leases, wire
from skyferry.pipeline.files.applier import FsApplier
from skyferry.pipeline.files.fsync import FsStats, FsTracker

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="leases on files of any owner need root")

# Opens each argv file (name=mode: rw, w) and takes a write lease on it, prints "ready", then on each line
# of stdin prints its leases (F_GETLEASE: 1 = F_WRLCK). SIGIO, a lease break, ends it as it would a server.
HOLDER = r"""
import fcntl, os, sys
fds = []
for arg in sys.argv[1:]:
    path, mode = arg.split("=")
    fd = os.open(path, {"rw": os.O_RDWR, "w": os.O_WRONLY}[mode])
    os.lseek(fd, 3, os.SEEK_SET)  # the movers must not move it
    fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)
    fds.append(fd)
print("ready", flush=True)
for _ in sys.stdin:
    print(" ".join(f"{fcntl.fcntl(fd, fcntl.F_GETLEASE)}@{os.lseek(fd, 0, os.SEEK_CUR)}" for fd in fds), flush=True)
"""


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    src = tmp_path / "src"
    src.mkdir()
    (src / "rw").write_bytes(b"leased and readable")
    (src / "empty").write_bytes(b"")
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, f"{src}/rw=rw", f"{src}/empty=w"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def leases_of(proc: subprocess.Popen[str]) -> str:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("\n")
    proc.stdin.flush()
    return proc.stdout.readline().strip()


def test_write_leases_lists_the_holder(holder: subprocess.Popen[str], tmp_path: Path) -> None:
    found = leases.write_leases()
    for name in ("rw", "empty"):
        st = (tmp_path / "src" / name).stat()
        assert found[(st.st_dev, st.st_ino)] == {holder.pid}


def test_rounds_and_stop_copy_read_leased_files_without_breaking_them(
    holder: subprocess.Popen[str], tmp_path: Path
) -> None:
    src = tmp_path / "src"
    (src / "plain").write_text("no lease")
    FsApplier({"rootfs": tmp_path / "dst"}).apply(list(FsTracker({"rootfs": src}).round(FsStats())))
    expected = {"rw": b"leased and readable", "empty": b"", "plain": b"no lease"}  # reading src would break them
    assert {name: (tmp_path / "dst" / name).read_bytes() for name in expected} == expected

    stream = b"".join(wire.encode({"rootfs": src}, wire.StreamStats()))
    wire.decode(io.BytesIO(stream), {"rootfs": tmp_path / "tar"}, wire.StreamStats())
    assert (tmp_path / "tar/rw").read_bytes() == b"leased and readable"

    assert holder.poll() is None, "the holder lives"
    assert leases_of(holder) == "1@3 1@3", "both leases held (F_WRLCK), the holder's offsets unmoved"

    # The positive control: a plain open, as the rounds did before, breaks the lease and ends the holder.
    with pytest.raises(BlockingIOError):
        os.open(src / "rw", os.O_RDONLY | os.O_NONBLOCK)
    assert holder.wait(timeout=10) == -signal.SIGIO


def test_a_file_leased_write_only_with_data_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "log").write_bytes(b"data only its holder may read")
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, f"{src}/log=w"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        refusal = rf"{src}/log is under a write lease of pid {proc.pid}, open write-only"
        with pytest.raises(SkyferryError, match=refusal):
            list(FsTracker({"rootfs": src}).round(FsStats()))
        with pytest.raises(SkyferryError, match="open write-only"):
            list(wire.encode({"rootfs": src}, wire.StreamStats()))
        assert leases_of(proc) == "1@3", "alive (a lease break's SIGIO ends it at once), the lease held"
    finally:
        proc.kill()
        proc.wait()
