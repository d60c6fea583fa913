"""The stop-copy stream: a tar of named directories in DATA frames of the agents' one framing.

The source sends the whole CRIU image and the payload (rootfs, volumes) as one PAX tar, cut into DATA
frames (hostapi/framing.py: each zstd-compressed and checksummed, END pinning them all). The receiver
refuses a damaged, truncated or foreign stream, and both ends report the stream's digest as `sha256`
for the caller to compare. TLS already protects the link; the checks also catch a bug in either end.
File rounds (fsync.py) carry their tars the same way, through `ChunkSink` and `DataFile`.
"""

import io
import os
import re
import shutil
import stat
import subprocess
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.files import leases
from skyferry.pipeline.hostapi.framing import Format, FrameReader, FrameWriter

CHUNK = 1 << 20  # read size from a socket or a file
DATA_FRAME = 4 << 20  # tar bytes per DATA frame, as pre-copy's PAGE frames: framing costs nothing
ZSTD_LEVEL = 1  # ~0.8 GB/s on one core here: faster than the 1 Gbit/s links it feeds
DATA = b"DATA"
FORMAT = Format(
    name="skyferry-image",
    version=1,
    kinds=frozenset({"image"}),
    tags=frozenset({DATA}),
    what="image stream",
    hint="nothing was restored from it; the migration rolls back; check the link and retry",
)


@dataclass
class StreamStats:
    bytes_raw: int = 0
    bytes_wire: int = 0
    sha256: str = ""  # the stream's digest (SHA-256 over its frame headers), the same at both ends


class ChunkSink(io.RawIOBase):
    """A write-only file object (a tar writes here) whose bytes leave as DATA frames of about DATA_FRAME
    bytes; the generator yields them from `drain()`."""

    def __init__(self, writer: FrameWriter) -> None:
        self.writer = writer
        self.buf = bytearray()
        self.frames: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self.buf += b
        if len(self.buf) >= DATA_FRAME:
            self.cut()
        return len(b)

    def cut(self) -> None:
        """What was written so far becomes a DATA frame (at the end, the last and shorter one)."""
        if self.buf:
            self.frames.append(self.writer.frame(DATA, self.buf))
            self.buf.clear()

    def drain(self) -> Iterator[bytes]:
        frames, self.frames = self.frames, []
        yield from frames


class DataFile(io.RawIOBase):
    """The payloads of a stream's frames as a read-only file (a tar reads here); its format's only body
    tag is DATA. Reading past the last one reads the END frame: only then is the whole stream checked."""

    def __init__(self, reader: FrameReader) -> None:
        self.frames = iter(reader)
        self.buf = memoryview(b"")

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        while not self.buf:
            frame = next(self.frames, None)
            if frame is None:
                return b""
            self.buf = memoryview(frame[1])
        n = len(self.buf) if size is None or size < 0 else size
        out, self.buf = bytes(self.buf[:n]), self.buf[n:]
        return out


def encode(dirs: dict[str, Path], stats: StreamStats, leased: leases.Leases | None = None) -> Iterator[bytes]:
    """Yield the stream of `dirs` (archive name -> directory); fills `stats` when exhausted. `leased`: the
    write leases, if read already (inside a freeze, while CRIU dumps: reading them waits out an RCU
    grace period)."""
    writer = FrameWriter(FORMAT, ZSTD_LEVEL, threads=-1)
    sink = ChunkSink(writer)
    yield writer.head("image")
    if leased is None:
        leased = leases.write_leases()  # files no one but their holder may open (leases.py)
    with tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
        for arcname, path in dirs.items():
            for member in _walk(path):
                name = f"{arcname}/{member.relative_to(path)}"
                st = member.lstat()
                special = leases.reader(member, st, leased) if stat.S_ISREG(st.st_mode) else None
                if special is None:
                    tar.add(member, arcname=name, recursive=False)
                else:
                    with special:
                        tar.addfile(tar.gettarinfo(str(member), arcname=name), special)
                if stat.S_ISREG(st.st_mode):
                    stats.bytes_raw += st.st_size
                stats.bytes_wire = writer.bytes_out
                yield from sink.drain()
    sink.cut()
    yield from sink.drain()
    end = writer.end({"bytes_raw": stats.bytes_raw})
    stats.bytes_wire, stats.sha256 = writer.bytes_out, writer.digest
    yield end


def decode(stream: BinaryIO, dirs: dict[str, Path], stats: StreamStats) -> None:
    """Unpack a stream made by `encode` into `dirs` (archive name -> destination directory). A damaged
    frame is refused at once; the sender reads this side's answer (hostapi/client.py), not a reset."""
    reader = FrameReader(iter(lambda: stream.read(CHUNK), b""), FORMAT)
    _unpack(reader, dirs)
    stats.bytes_wire = reader.bytes_in
    stats.sha256 = reader.digest


def _unpack(reader: FrameReader, dirs: dict[str, Path]) -> None:
    reader.head()
    data = DataFile(reader)
    for path in dirs.values():
        path.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(fileobj=data, mode="r|") as tar:
            for member in tar:
                top, _, rest = member.name.partition("/")
                if top not in dirs or not rest or ".." in Path(rest).parts:
                    raise SkyferryError(f"unexpected entry {member.name!r} in migration stream")
                member.name = rest
                if member.islnk():  # tar names a hard link's target by its archive name: the same top
                    link_top, _, link_rest = member.linkname.partition("/")
                    if link_top != top or not link_rest:
                        raise SkyferryError(f"hard link {member.name!r} to {member.linkname!r} across directories")
                    member.linkname = link_rest
                extract_member(tar, member, dirs[top])
        while data.read(CHUNK):  # to END, whose checks cover every frame
            pass
    except (tarfile.TarError, EOFError) as exc:
        raise SkyferryError(f"migration stream is corrupt: {exc}") from exc


def extract_member(tar: tarfile.TarFile, member: tarfile.TarInfo, dest: Path) -> None:
    """Extract one member below dest; refuses absolute paths, `..`, devices, and writes through symlinks.
    A FIFO is a node like a directory (a name, a mode, an owner, no data): tarfile makes it with mkfifo.
    CRIU reopens a FIFO a process holds by its name, so the name must exist on the target.

    (Debian 12's Python 3.11.2 predates tarfile's extraction filters.)
    """
    rel = Path(member.name)
    if rel.is_absolute() or ".." in rel.parts or member.ischr() or member.isblk():
        raise SkyferryError(f"refusing tar entry {member.name!r}")
    root = dest.resolve()
    for path in [rel, Path(member.linkname)] if member.islnk() else [rel]:
        parent = (dest / path).parent.resolve()
        if (parent != root and root not in parent.parents) or ".." in path.parts or path.is_absolute():
            raise SkyferryError(f"tar entry {member.name!r} would reach outside {dest}")
    target = dest / rel
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        target.unlink()  # tarfile writes a file through a symlink an earlier entry of the same name made
    tar.extract(member, dest, set_attrs=True)


def wipe(path: Path) -> None:
    """Remove `path` and everything below it. A CRIU killed mid-run (a freeze or restore deadline) leaves
    its cgroup yard mounted in its work dir: every mount below `path` is detached first, so the removal
    never walks into a cgroup hierarchy (it would rmdir every empty cgroup of the host)."""
    for point in mounts_below(path):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)
    shutil.rmtree(path, ignore_errors=True)


def mounts_below(path: Path) -> list[str]:
    """Mount points at or below `path`, deepest first (mountinfo's field 5, octal-escaped)."""
    root = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        points = [re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), line.split()[4]) for line in f]
    return sorted({p for p in points if p == root or p.startswith(root + "/")}, key=len, reverse=True)


def _walk(root: Path) -> Iterator[Path]:
    """Every entry below root (not root itself), parents first, without following symlinks."""
    if root.exists():
        yield from sorted(root.rglob("*"))
