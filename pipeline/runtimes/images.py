"""Unpack a container image tarball (`docker save` or an OCI image layout) into a rootfs directory."""

import json
import logging
import os
import shutil
import stat
import tarfile
from pathlib import Path

from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.files.inroot import Root

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
CHUNK = 1 << 20
log = logging.getLogger(__name__)


def unpack_image(tarball: Path, rootfs: Path) -> None:
    """Apply the image's layers in order, honouring whiteouts. Every path resolves inside `rootfs` (symlinks
    included: inroot.Root), so no entry can create, change or remove anything outside it."""
    if not tarball.is_file():
        raise SkyferryError(f"image {tarball} not found", hint="pass a `docker save` or OCI layout tarball")
    try:
        with tarfile.open(tarball) as outer, Root(rootfs) as root:
            for layer in _layers(outer):
                member = outer.extractfile(layer)
                if member is None:
                    raise SkyferryError(f"image {tarball}: layer {layer} is missing")
                with tarfile.open(fileobj=member, mode="r|*") as tar:
                    _apply_layer(tar, root)
    except tarfile.TarError as exc:
        raise SkyferryError(f"image {tarball} is not a readable tarball: {exc}") from exc


def _layers(outer: tarfile.TarFile) -> list[str]:
    names = set(outer.getnames())
    if "manifest.json" in names and "index.json" not in names:  # docker save
        manifest = json.load(outer.extractfile("manifest.json"))  # type: ignore[arg-type]
        return list(manifest[0]["Layers"])
    if "index.json" in names:  # OCI image layout
        index = json.load(outer.extractfile("index.json"))  # type: ignore[arg-type]
        digest = index["manifests"][0]["digest"]
        manifest = json.load(outer.extractfile(_blob(digest)))  # type: ignore[arg-type]
        return [_blob(layer["digest"]) for layer in manifest["layers"]]
    raise SkyferryError("image tarball has neither manifest.json (docker save) nor index.json (OCI)")


def _blob(digest: str) -> str:
    algo, _, hexdigest = digest.partition(":")
    return f"blobs/{algo}/{hexdigest}"


def _apply_layer(tar: tarfile.TarFile, root: Root) -> None:
    made: set[str] = set()  # this layer's own entries, which its opaque markers do not hide
    for entry in tar:
        path = _relative(entry.name)
        if not path:
            continue
        parent, _, name = path.rpartition("/")
        try:
            if name == OPAQUE:
                _opaque(root, parent, made)
            elif name.startswith(WHITEOUT + WHITEOUT):
                continue  # AUFS's own bookkeeping (.wh..wh.plnk and the like), not content
            elif name.startswith(WHITEOUT):
                _whiteout(root, parent, name[len(WHITEOUT) :])
            elif entry.isdev():
                # The runtime gives a container its /dev; a device node from an image could open a host disk.
                log.warning("image layer entry %r is a device node: not created", entry.name)
            else:
                _create(tar, entry, root, parent, name)
                made.add(path)
        except (OSError, ValueError, OverflowError) as exc:  # e.g. a link to nowhere, a bad time or name
            why = exc.strerror if isinstance(exc, OSError) else str(exc)
            raise SkyferryError(f"image layer entry {entry.name!r} cannot be applied: {why}") from exc


def _relative(name: str) -> str:
    """A layer entry's path ("./etc/motd", "etc/motd", "/etc/motd") relative to the rootfs; "" for the root.
    `..` is refused outright: no image needs it, even though resolving inside the root would contain it."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise SkyferryError(f"image layer entry {name!r} escapes the rootfs")
    return "/".join(parts)


def _opaque(root: Root, parent: str, made: set[str]) -> None:
    """Hide everything the lower layers put in `parent` (the directory itself stays)."""
    with root.dir(parent, create=True, readable=True) as fd:
        for child in os.listdir(fd):
            if f"{parent}/{child}".lstrip("/") not in made:
                _remove(fd, child)


def _whiteout(root: Root, parent: str, name: str) -> None:
    if name in ("", ".", ".."):
        raise SkyferryError(f"image layer whiteout {parent}/{WHITEOUT}{name} names no file")
    try:
        with root.dir(parent) as fd:
            _remove(fd, name)
    except (FileNotFoundError, NotADirectoryError):
        pass  # nothing below to hide


def _create(tar: tarfile.TarFile, entry: tarfile.TarInfo, root: Root, parent: str, name: str) -> None:
    """Make `entry` as `name` in directory `parent`, replacing whatever is there (a directory stays a
    directory: layers merge). Nothing is followed: the parent is resolved inside the root, `name` never."""
    with root.dir(parent, create=True) as pfd:
        old = _lstat(pfd, name)
        if old is not None and not (entry.isdir() and stat.S_ISDIR(old.st_mode)):
            _remove(pfd, name)
        if entry.isdir():
            if old is None or not stat.S_ISDIR(old.st_mode):
                os.mkdir(name, 0o700, dir_fd=pfd)
            _attrs(pfd, name, entry)
        elif entry.isreg():
            _write(tar, entry, pfd, name)
        elif entry.issym():
            os.symlink(entry.linkname, name, dir_fd=pfd)  # only ever read inside the container, or in-root
            os.chown(name, entry.uid, entry.gid, dir_fd=pfd, follow_symlinks=False)
        elif entry.islnk():
            source = _relative(entry.linkname)
            src_parent, _, src_name = source.rpartition("/")
            with root.dir(src_parent) as sfd:
                os.link(src_name, name, src_dir_fd=sfd, dst_dir_fd=pfd, follow_symlinks=False)
        elif entry.isfifo():
            os.mkfifo(name, 0o600, dir_fd=pfd)
            _attrs(pfd, name, entry)
        else:
            raise SkyferryError(f"image layer entry {entry.name!r} has an unknown type {entry.type!r}")


def _write(tar: tarfile.TarFile, entry: tarfile.TarInfo, pfd: int, name: str) -> None:
    data = tar.extractfile(entry)
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=pfd)
    with os.fdopen(fd, "wb") as out:
        if data is not None:
            shutil.copyfileobj(data, out, CHUNK)
        os.fchown(fd, entry.uid, entry.gid)  # before the mode: chown clears set-id bits
        os.fchmod(fd, entry.mode & 0o7777)
        os.utime(fd, (entry.mtime, entry.mtime))


def _attrs(pfd: int, name: str, entry: tarfile.TarInfo) -> None:
    os.chown(name, entry.uid, entry.gid, dir_fd=pfd, follow_symlinks=False)
    os.chmod(name, entry.mode & 0o7777, dir_fd=pfd)  # `name` was just made here, not a symlink
    os.utime(name, (entry.mtime, entry.mtime), dir_fd=pfd, follow_symlinks=False)


def _lstat(pfd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=pfd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _remove(pfd: int, name: str) -> None:
    """Remove `name` in directory `pfd`, without following it: a symlink goes, never what it points to."""
    old = _lstat(pfd, name)
    if old is None:
        return
    if stat.S_ISDIR(old.st_mode):
        shutil.rmtree(name, dir_fd=pfd)  # fd-based: never follows a symlink below
    else:
        os.unlink(name, dir_fd=pfd)
