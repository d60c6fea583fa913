"""File-system pre-copy: a container's rootfs and volumes move in rounds while it runs, then a final delta.

Source side, next to the running container:
    tracker = FsTracker({"rootfs": rootfs, "data": volume})
    stats = FsStats(); send(tracker.round(stats))          # repeat while memory rounds run
    freeze; stats = FsStats(); send(tracker.final(stats, pids=frozen_tree))

Target side (applier.py):
    applier = FsApplier({"rootfs": bundle_rootfs, "data": volume})    # one per migration
    applier.apply(chunks)                                  # every round, then the final

A round carries what changed since what the target holds: regular files, symlinks, directories and
named FIFOs (a node: CRIU reopens a FIFO by its name) whose lstat signature differs, and the paths
deleted since. The tracker commits the new signatures
only when its stream is exhausted, so an interrupted send is simply repeated by the next round.

A stream is a PAX tar (numeric owners) in DATA frames of the agents' one framing (hostapi/framing.py),
as wire.py's stop-copy stream; its HEAD carries the manifest. The applier extracts each member to a
staging name in its directory, reads the stream to its END (every frame checked), and only then renames
members into place, so a damaged or truncated stream changes nothing and a half-applied round never
leaves a torn file.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import secrets
import stat
import tarfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

import xxhash
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.files import leases, wire
from skyferry.pipeline.hostapi.framing import Format, FrameWriter

FORMAT = Format(
    name="skyferry-fsync",
    version=2,
    kinds=frozenset({"round", "final"}),
    tags=frozenset({wire.DATA}),
    what="file-system stream",
    hint="nothing was applied; send it again (after FsTracker.reset() the next round is full)",
)
CHUNK = 1 << 20
ZSTD_LEVEL = 1
XATTR = "SKYFERRY.xattr."  # PAX keys carrying extended attributes, base64
STAGING = ".skyferry-fsync-"  # the applier's scratch directory inside each destination
CLOCK_REALTIME_COARSE = 5  # Linux; file timestamps come from this clock (or a finer one)
TAR_ENCODING = "utf-8"

Sig = tuple[Any, ...]


@dataclass
class FsStats:
    """One stream, as seen by whichever side filled it in."""

    kind: str = ""  # "round" or "final"
    seq: int = 0
    files_scanned: int = 0  # entries (files, dirs, symlinks) lstat'ed by the source
    files_sent: int = 0  # regular files, symlinks and FIFOs in the stream
    dirs_sent: int = 0
    rechecked: int = 0  # files changed in the same clock tick as their last read: re-hashed, equal, not sent
    bytes_raw: int = 0  # file contents in the stream
    bytes_wire: int = 0  # the whole stream
    deletions: int = 0
    duration: float = 0.0
    sha256: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Held:
    """What the target holds for a path: the signature read before sending it."""

    sig: Sig
    racy: bool = False  # changed in the clock tick of that lstat: a later write could keep the signature
    digest: bytes = b""  # xxh3_128 of the contents sent (regular files)


DIRTY = _Held(("dirty",))  # never equals a real signature: resend next round


class FsTracker:
    """The source side: rounds over live directories, each the delta against what the target holds."""

    def __init__(self, dirs: dict[str, Path], level: int = ZSTD_LEVEL) -> None:
        self.dirs = check_dirs(dirs)
        self.level = level
        self.held: dict[tuple[str, str], _Held] = {}
        self.session = ""
        self.seq = 0
        self.reset()

    def reset(self) -> None:
        """Forget what the target holds (after it refused a stream); the next round is full."""
        self.session = secrets.token_hex(8)
        self.seq = 0
        self.held.clear()

    def round(self, stats: FsStats) -> Iterator[bytes]:
        """Stream what changed since the last committed round; commits when exhausted."""
        return self._stream("round", stats, set())

    def final(self, stats: FsStats, pids: Iterable[int] = (), leased: leases.Leases | None = None) -> Iterator[bytes]:
        """The delta inside the freeze. `pids`: the frozen processes (host view); `leased`: the write leases
        if they were read already (leases.write_leases waits out an RCU grace period, 10-15 ms: the source
        reads them while CRIU dumps).

        Files they map shared and writable are re-read whatever their signature says, and sent when
        their contents differ: a store to an already-dirty mapped page does not update mtime.
        """
        return self._stream("final", stats, _shared_writable(pids), leased)

    def _stream(
        self, kind: str, stats: FsStats, forced: set[tuple[int, int]], leased: leases.Leases | None = None
    ) -> Iterator[bytes]:
        started = time.monotonic()
        seq = self.seq + 1
        stats.kind, stats.seq = kind, seq
        for arc, root in self.dirs.items():
            if not root.is_dir():  # never read a missing directory as "everything was deleted"
                raise SkyferryError(f"{arc} directory {root} is missing", hint="is the container still there?")
        scan_start = time.clock_gettime_ns(CLOCK_REALTIME_COARSE)
        if leased is None:
            leased = leases.write_leases()  # files no round may open (leases.py)
        current = {(arc, rel): (st, link) for arc, root in self.dirs.items() for rel, st, link in scan(root)}
        stats.files_scanned = len(current)
        deleted = sorted(key for key in self.held if key not in current)
        stats.deletions = len(deleted)
        manifest = {
            "kind": kind,
            "session": self.session,
            "seq": seq,
            "full": self.seq == 0,
            "dirs": sorted(self.dirs),
            "deleted": [list(key) for key in deleted],
        }
        out = _Writer(stats, self.level)
        yield out.head(manifest)
        pending: dict[tuple[str, str], _Held] = {}
        links: dict[tuple[int, int], tuple[str, str]] = {}  # (st_dev, st_ino) of files sent -> their key
        for key, (st, link) in current.items():
            held = self.held.get(key)
            sig = _sig(st, link)
            force = (st.st_dev, st.st_ino) in forced
            if held is not None and held.sig == sig and not held.racy and not force:
                continue
            name = f"{key[0]}/{key[1]}"
            first = links.get((st.st_dev, st.st_ino)) if stat.S_ISREG(st.st_mode) and st.st_nlink > 1 else None
            if first is not None and first[0] == key[0]:
                # Another name of a file this stream already carries: the target links it, as here.
                pending[key] = pending[first]
                stats.files_sent += 1
                yield from out.add(_info(name, tarfile.LNKTYPE, st=st, link=first[1]))
            elif stat.S_ISREG(st.st_mode):
                path = self.dirs[key[0]] / key[1]
                reader = leases.reader(path, st, leased)
                yield from self._file(out, name, path, reader, held, force, key, pending, links)
            else:
                # A directory or FIFO that changes in the tick of its lstat could keep its signature: resend
                # it next round. A symlink never changes in place.
                is_dir = stat.S_ISDIR(st.st_mode)
                racy = link is None and max(st.st_mtime_ns, st.st_ctime_ns) >= scan_start
                pending[key] = _Held(sig, racy=racy)
                if is_dir:
                    stats.dirs_sent += 1
                else:
                    stats.files_sent += 1
                path = self.dirs[key[0]] / key[1]
                kind_ = tarfile.DIRTYPE if is_dir else tarfile.FIFOTYPE if link is None else tarfile.SYMTYPE
                yield from out.add(_info(name, kind_, st=st, link=link, xattrs=_xattrs(path)))
        yield from out.close()
        # Exhausted: the target has all of it (or will refuse it and ask for a full round).
        for key in deleted:
            del self.held[key]
        self.held.update(pending)
        self.seq = seq
        stats.duration = time.monotonic() - started

    def _file(
        self,
        out: _Writer,
        name: str,
        path: Path,
        leased: io.RawIOBase | None,
        held: _Held | None,
        force: bool,
        key: tuple[str, str],
        pending: dict[tuple[str, str], _Held],
        links: dict[tuple[int, int], tuple[str, str]],
    ) -> Iterator[bytes]:
        try:
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
            f = leased if leased is not None else os.fdopen(os.open(path, flags), "rb", buffering=0)
        except OSError:
            return  # gone or replaced since the scan: the next round sees what it became
        with f:
            fd = f.fileno()
            # The signature is taken before reading: a write during the read changes it for the next round.
            now = time.clock_gettime_ns(CLOCK_REALTIME_COARSE)
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return
            sig = _sig(st, None)
            racy = max(st.st_mtime_ns, st.st_ctime_ns) >= now
            if held is not None and (held.racy or force) and held.sig == sig:  # maybe unchanged: compare contents
                digest, complete = _hash(f, st.st_size)
                if complete and digest == held.digest:
                    out.stats.rechecked += 1
                    pending[key] = _Held(sig, racy, digest)
                    return
                f.seek(0)
            hasher = xxhash.xxh3_128()
            reader = _Exact(f, st.st_size, hasher)
            yield from out.add(_info(name, tarfile.REGTYPE, st=st, xattrs=_xattrs(fd)), reader)
            out.stats.files_sent += 1
            out.stats.bytes_raw += st.st_size
            pending[key] = _Held(sig, racy, hasher.digest()) if reader.complete else DIRTY
            if st.st_nlink > 1:
                links[(st.st_dev, st.st_ino)] = key


class _Writer:
    """A tar written member by member into DATA frames; the manifest rides in the HEAD frame."""

    def __init__(self, stats: FsStats, level: int) -> None:
        self.stats = stats
        self.frames = FrameWriter(FORMAT, level)
        self.sink = wire.ChunkSink(self.frames)

    def head(self, manifest: dict[str, Any]) -> bytes:
        return self.frames.head(**manifest)

    def add(self, info: tarfile.TarInfo, data: bytes | _Exact | None = None) -> Iterator[bytes]:
        if isinstance(data, bytes):
            info.size = len(data)
        self.sink.write(info.tobuf(tarfile.PAX_FORMAT, TAR_ENCODING, "surrogateescape"))
        if isinstance(data, bytes):
            self.sink.write(data)
        elif data is not None:
            while piece := data.read(CHUNK):
                self.sink.write(piece)
                yield from self._drain()
        if info.size % tarfile.BLOCKSIZE:
            self.sink.write(tarfile.NUL * (tarfile.BLOCKSIZE - info.size % tarfile.BLOCKSIZE))
        yield from self._drain()

    def close(self) -> Iterator[bytes]:
        self.sink.write(tarfile.NUL * (2 * tarfile.BLOCKSIZE))  # end of archive
        self.sink.cut()
        yield from self._drain()
        end = self.frames.end({})
        self.stats.bytes_wire, self.stats.sha256 = self.frames.bytes_out, self.frames.digest
        yield end

    def _drain(self) -> Iterator[bytes]:
        self.stats.bytes_wire = self.frames.bytes_out  # as it goes: callers watch a round's progress
        yield from self.sink.drain()


class _Exact(io.RawIOBase):
    """Exactly `size` bytes of a file that may change while read: short reads are padded with zeros."""

    def __init__(self, f: BinaryIO, size: int, hasher: Any) -> None:
        self.f = f
        self.left = size
        self.hasher = hasher
        self.complete = True  # False when the file shrank under us: resend next round

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        data = self.f.read(n) if n else b""
        if len(data) < n:
            self.complete = False
            data += bytes(n - len(data))
        self.left -= n
        self.hasher.update(data)
        return data


# --- helpers -------------------------------------------------------------------------------------


def check_dirs(dirs: dict[str, Path]) -> dict[str, Path]:
    for arc in dirs:
        if not arc or "/" in arc or arc.startswith(("@", ".")):
            raise SkyferryError(f"bad directory name {arc!r} for a file-system round")
    return {arc: Path(path) for arc, path in dirs.items()}


def scan(root: Path) -> Iterator[tuple[str, os.stat_result, str | None]]:
    """(relative path, lstat, symlink target) below root, parents first; stays on root's file system."""
    try:
        dev = os.lstat(root).st_dev
    except FileNotFoundError:
        return
    todo = [""]
    while todo:
        rel_dir = todo.pop()
        try:
            with os.scandir(root / rel_dir) as it:
                entries = sorted(it, key=lambda e: e.name)
        except (FileNotFoundError, NotADirectoryError):
            continue  # removed since it was listed: the next round sees it gone
        for entry in entries:
            if not rel_dir and entry.name.startswith(STAGING):
                continue
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            try:
                st = entry.stat(follow_symlinks=False)
                link = os.readlink(entry.path) if stat.S_ISLNK(st.st_mode) else None
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(st.st_mode):
                if st.st_dev == dev:
                    todo.append(rel)
            elif not (stat.S_ISREG(st.st_mode) or stat.S_ISFIFO(st.st_mode) or link is not None):
                continue  # sockets and devices: recreated by the process, by CRIU or by the runtime
            yield rel, st, link


def _sig(st: os.stat_result, link: str | None) -> Sig:
    """What must stay equal for the target's copy to be current. ctime catches a forged mtime."""
    size = st.st_size if stat.S_ISREG(st.st_mode) else 0
    return (st.st_mode, size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_uid, st.st_gid, link)


def _info(
    name: str,
    kind: bytes,
    st: os.stat_result | None = None,
    link: str | None = None,
    xattrs: dict[str, bytes] | None = None,
) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    if st is not None:
        info.mode = stat.S_IMODE(st.st_mode)
        info.uid, info.gid = st.st_uid, st.st_gid
        info.mtime = st.st_mtime_ns // 1_000_000_000
        info.pax_headers = {"SKYFERRY.mtime_ns": str(st.st_mtime_ns)}
        for key, value in (xattrs or {}).items():
            info.pax_headers[XATTR + key] = base64.b64encode(value).decode()
        if kind == tarfile.REGTYPE:
            info.size = st.st_size
    if link is not None:
        info.linkname = link
    return info


def _xattrs(target: int | Path) -> dict[str, bytes]:
    """Extended attributes (file capabilities, ACLs, user.*) of an open file, or of a path not followed."""
    follow = isinstance(target, int)
    try:
        return {
            name: os.getxattr(target, name, follow_symlinks=follow)
            for name in os.listxattr(target, follow_symlinks=follow)
        }
    except OSError:
        return {}  # gone, or a file system without them


def _hash(f: BinaryIO, size: int) -> tuple[bytes, bool]:
    hasher = xxhash.xxh3_128()
    reader = _Exact(f, size, hasher)
    while reader.read(CHUNK):
        pass
    return hasher.digest(), reader.complete


def _shared_writable(pids: Iterable[int]) -> set[tuple[int, int]]:
    """(st_dev, st_ino) of every file the processes map shared and writable."""
    found: set[tuple[int, int]] = set()
    for pid in pids:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[1][1] == "w" and fields[1][3] == "s" and fields[5].startswith("/"):
                    with contextlib.suppress(OSError):
                        st = os.stat(f"/proc/{pid}/map_files/{fields[0]}")
                        found.add((st.st_dev, st.st_ino))
    return found
