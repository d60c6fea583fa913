"""The target side of file-system rounds: `FsApplier` applies each round's changes to the container's
rootfs and volumes, staged and committed so a refused stream changes nothing (docs/precopy.md)."""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import tarfile
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO

from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.files import wire
from skyferry.pipeline.files.fsync import (
    CHUNK,
    FORMAT,
    STAGING,
    TAR_ENCODING,
    XATTR,
    FsStats,
    check_dirs,
    scan,
)
from skyferry.pipeline.files.wire import extract_member
from skyferry.pipeline.hostapi.framing import FrameReader


class FsApplier:
    """The target side: applies rounds and the final into its directories, all or nothing per stream."""

    def __init__(self, dirs: dict[str, Path]) -> None:
        self.dirs = check_dirs(dirs)
        self.session = ""
        self.seq = 0
        self.need_full = False  # set when a stream failed half-way through its renames

    def apply(self, stream: Iterable[bytes] | BinaryIO) -> FsStats:
        started = time.monotonic()
        stats = FsStats()
        chunks = iter(lambda: stream.read(CHUNK), b"") if hasattr(stream, "read") else iter(stream)  # type: ignore[union-attr]
        reader = FrameReader(chunks, FORMAT)
        staging: dict[str, Path] = {}
        try:
            for arc, root in self.dirs.items():
                root.mkdir(parents=True, exist_ok=True)
                staging[arc] = Path(tempfile.mkdtemp(prefix=STAGING, dir=root))
            manifest, members = self._receive(reader, staging, stats)
            self._commit(manifest, members, staging, stats)
        except OSError as exc:  # disk full, a target tree changed behind our back
            raise SkyferryError(
                f"applying a file-system stream failed: {exc}", hint="call FsTracker.reset(); its next round is full"
            ) from exc
        finally:
            for path in staging.values():
                shutil.rmtree(path, ignore_errors=True)
        stats.duration = time.monotonic() - started
        return stats

    def _receive(
        self, reader: FrameReader, staging: dict[str, Path], stats: FsStats
    ) -> tuple[dict[str, Any], list[tuple[str, str, tarfile.TarInfo]]]:
        """Extract the stream into staging and read it to its END; nothing in place changes here."""
        members: list[tuple[str, str, tarfile.TarInfo]] = []
        seen: set[tuple[str, str]] = set()
        regular: set[tuple[str, str]] = set()
        try:
            manifest = reader.head()
            self._check_manifest(manifest)
            stats.kind, stats.seq = manifest["kind"], manifest["seq"]
            stats.deletions = len(manifest["deleted"])
            data = wire.DataFile(reader)
            options: dict[str, Any] = {"encoding": TAR_ENCODING, "copybufsize": CHUNK}
            with tarfile.open(fileobj=data, mode="r|", **options) as tar:
                while (member := tar.next()) is not None:
                    arc, _, rel = member.name.partition("/")
                    if arc not in self.dirs or not _safe_rel(rel) or (arc, rel) in seen:
                        raise SkyferryError(f"unexpected entry {member.name!r} in file-system stream")
                    seen.add((arc, rel))
                    if member.isreg() or member.issym() or member.isfifo():
                        # Staged under its index (no nesting, no clashes) in a directory made for this stream;
                        # a FIFO is made there by mkfifo, then renamed into place like a file.
                        member.name = str(len(members))
                        extract_member(tar, member, staging[arc])
                        if member.isreg():
                            regular.add((arc, rel))
                        stats.files_sent += 1
                        stats.bytes_raw += member.size
                    elif member.islnk() and (arc, member.linkname) in regular:
                        stats.files_sent += 1  # a hard link to a file earlier in this stream
                    elif member.isdir():
                        stats.dirs_sent += 1
                    else:
                        raise SkyferryError(f"refusing {member.name!r}: not a file, symlink, FIFO or directory")
                    members.append((arc, rel, member))
            while data.read(CHUNK):  # to END, whose checks cover every frame
                pass
        except (tarfile.TarError, EOFError, ValueError, KeyError, TypeError) as exc:
            raise SkyferryError(
                f"file-system stream is corrupt: {exc}", hint="nothing was applied; reset the tracker"
            ) from exc
        stats.bytes_wire, stats.sha256 = reader.bytes_in, reader.digest
        return manifest, members

    def _check_manifest(self, manifest: dict[str, Any]) -> None:
        """Format, version and kind are the framing's to check; the rest is this stream's."""
        if manifest.get("dirs") != sorted(self.dirs):
            raise SkyferryError(f"stream carries directories {manifest.get('dirs')}, this side has {sorted(self.dirs)}")
        if manifest["full"]:
            return
        if self.need_full or (self.session and (manifest["session"], manifest["seq"]) != (self.session, self.seq + 1)):
            raise SkyferryError(
                "file-system round out of sequence (an earlier stream was refused or lost)",
                hint="call FsTracker.reset(); its next round is full",
            )

    def _commit(
        self,
        manifest: dict[str, Any],
        members: list[tuple[str, str, tarfile.TarInfo]],
        staging: dict[str, Path],
        stats: FsStats,
    ) -> None:
        """The stream is intact: delete, then create or replace every entry (parents come first)."""
        self.need_full = True  # until every rename below is done
        parents: dict[Path, os.stat_result] = {}  # directories this commit changes, as they were before
        for arc, rel in manifest["deleted"]:
            if arc not in self.dirs or not _safe_rel(rel):
                raise SkyferryError(f"refusing to delete {arc}/{rel}")
            path = self._inside(arc, rel)
            self._touch(path.parent, parents)
            _remove(path)
        dirs: list[tuple[Path, tarfile.TarInfo]] = []
        for index, (arc, rel, member) in enumerate(members):
            path = self._inside(arc, rel)
            if member.isdir():
                if path.is_symlink() or (path.exists() and not path.is_dir()):
                    path.unlink()
                path.mkdir(exist_ok=True)
                os.chown(path, member.uid, member.gid)
                os.chmod(path, member.mode)
                _set_xattrs(path, member)
                dirs.append((path, member))
                continue
            staged = staging[arc] / str(index)
            if member.islnk():
                os.link(self._inside(arc, member.linkname), staged, follow_symlinks=False)
            else:
                _set_xattrs(staged, member)
            mtime = int(member.pax_headers.get("SKYFERRY.mtime_ns", int(member.mtime * 1e9)))
            os.utime(staged, ns=(mtime, mtime), follow_symlinks=False)
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            self._touch(path.parent, parents)
            os.replace(staged, path)
        if manifest["full"]:
            self._prune({(arc, rel) for arc, rel, _ in members})
        for path, before in parents.items():  # the source changed these files in place, not their directory
            with contextlib.suppress(FileNotFoundError):
                if os.lstat(path).st_ino == before.st_ino:  # still that directory, not what replaced it
                    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns), follow_symlinks=False)
        for path, member in reversed(dirs):  # children first: creating a child changes its parent's mtime
            mtime = int(member.pax_headers.get("SKYFERRY.mtime_ns", int(member.mtime * 1e9)))
            os.utime(path, ns=(mtime, mtime), follow_symlinks=False)
        self.session, self.seq, self.need_full = manifest["session"], manifest["seq"], False

    @staticmethod
    def _touch(parent: Path, parents: dict[Path, os.stat_result]) -> None:
        if parent not in parents:
            with contextlib.suppress(FileNotFoundError):
                parents[parent] = os.lstat(parent)

    def _inside(self, arc: str, rel: str) -> Path:
        """dest/rel, refused unless its parent resolves inside dest (no writing through symlinks)."""
        root = self.dirs[arc].resolve()
        path = self.dirs[arc] / rel
        parent = path.parent.resolve()
        if parent != root and root not in parent.parents:
            raise SkyferryError(f"{arc}/{rel} would be written outside {self.dirs[arc]}")
        return path

    def _prune(self, keep: set[tuple[str, str]]) -> None:
        """A full round: remove what the source does not have (left from an earlier, refused attempt)."""
        for arc, root in self.dirs.items():
            for rel, _, _ in list(scan(root)):
                if (arc, rel) not in keep:
                    _remove(root / rel)


# --- the stream ----------------------------------------------------------------------------------


def _set_xattrs(path: Path, member: tarfile.TarInfo) -> None:
    """After chown, which clears security.capability."""
    for key, value in member.pax_headers.items():
        if key.startswith(XATTR):
            try:
                os.setxattr(path, key[len(XATTR) :], base64.b64decode(value), follow_symlinks=False)
            except OSError as exc:
                raise SkyferryError(
                    f"cannot set {key[len(XATTR) :]} on {path}: {exc.strerror}",
                    hint="the target's file system must support the source's extended attributes",
                ) from exc


def _safe_rel(rel: str) -> bool:
    parts = rel.split("/")
    return bool(rel) and not rel.startswith("/") and all(p not in ("", ".", "..") for p in parts)


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
