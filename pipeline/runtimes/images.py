"""Unpack a container image tarball (`docker save` or an OCI image layout) into a rootfs directory."""

import json
import shutil
import tarfile
from pathlib import Path, PurePosixPath

from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.files.wire import extract_member

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"


def unpack_image(tarball: Path, rootfs: Path) -> None:
    """Apply the image's layers in order, honouring whiteouts. Refuses paths that escape the rootfs."""
    if not tarball.is_file():
        raise SkyferryError(f"image {tarball} not found", hint="pass a `docker save` or OCI layout tarball")
    try:
        with tarfile.open(tarball) as outer:
            for layer in _layers(outer):
                member = outer.extractfile(layer)
                if member is None:
                    raise SkyferryError(f"image {tarball}: layer {layer} is missing")
                with tarfile.open(fileobj=member, mode="r|*") as tar:
                    _apply_layer(tar, rootfs)
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


def _apply_layer(tar: tarfile.TarFile, rootfs: Path) -> None:
    for entry in tar:
        # Layer entries look like "./etc/motd" or "etc/motd"; keep dotfiles, refuse anything with "..".
        parts = [p for p in PurePosixPath(entry.name).parts if p not in ("/", ".")]
        if not parts:
            continue
        path = PurePosixPath(*parts)
        if ".." in parts:
            raise SkyferryError(f"image layer entry {entry.name!r} escapes the rootfs")
        target = rootfs / path
        if path.name == OPAQUE:
            for child in target.parent.glob("*"):
                _remove(child)
            continue
        if path.name.startswith(WHITEOUT):
            _remove(target.with_name(path.name[len(WHITEOUT) :]))
            continue
        if target.is_symlink() or (target.exists() and not target.is_dir()):
            target.unlink()
        entry.name = str(path)
        extract_member(tar, entry, rootfs)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
