"""Image tarballs (`docker save` and OCI layouts) unpack into a rootfs, whiteouts applied, escapes refused."""

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.runtimes.images import unpack_image


def _layer(files: dict[str, bytes | None]) -> bytes:
    """A layer tar: bytes are files, None a directory."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tar.addfile(info)
            else:
                info.size = len(data)
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


LAYER1 = {
    "./": None, "./.profile": b"dotfile", "etc": None, "etc/motd": b"hello\n", "app": None,
    "app/old.txt": b"old", "app/keep.txt": b"keep", "cache": None, "cache/a": b"a",
}  # fmt: skip
LAYER2 = {"app/.wh.old.txt": b"", "cache/.wh..wh..opq": b"", "cache/b": b"b", "etc/motd": b"bye\n"}


def docker_save(path: Path, layers: list[dict[str, bytes | None]]) -> Path:
    with tarfile.open(path, "w") as tar:
        names = []
        for i, layer in enumerate(layers):
            names.append(f"l{i}/layer.tar")
            _add(tar, names[-1], _layer(layer))
        _add(tar, "manifest.json", json.dumps([{"Config": "c.json", "RepoTags": ["t:1"], "Layers": names}]).encode())
    return path


def oci_layout(path: Path, layers: list[dict[str, bytes | None]]) -> Path:
    with tarfile.open(path, "w") as tar:
        descriptors = []
        for layer in layers:
            blob = _layer(layer)
            digest = hashlib.sha256(blob).hexdigest()
            _add(tar, f"blobs/sha256/{digest}", blob)
            descriptors.append({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": f"sha256:{digest}"})
        manifest = json.dumps({"schemaVersion": 2, "layers": descriptors}).encode()
        mdigest = hashlib.sha256(manifest).hexdigest()
        _add(tar, f"blobs/sha256/{mdigest}", manifest)
        _add(tar, "index.json", json.dumps({"manifests": [{"digest": f"sha256:{mdigest}"}]}).encode())
        _add(tar, "oci-layout", b'{"imageLayoutVersion": "1.0.0"}')
    return path


@pytest.mark.parametrize("make", [docker_save, oci_layout])
def test_layers_apply_in_order_with_whiteouts(tmp_path: Path, make) -> None:
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    unpack_image(make(tmp_path / "image.tar", [LAYER1, LAYER2]), rootfs)
    assert (rootfs / "etc/motd").read_bytes() == b"bye\n"
    assert not (rootfs / "app/old.txt").exists(), "a whiteout removes the lower layer's file"
    assert (rootfs / "app/keep.txt").read_bytes() == b"keep"
    assert sorted(p.name for p in (rootfs / "cache").iterdir()) == ["b"], "an opaque dir hides the lower layer"
    assert not list(rootfs.rglob(".wh.*"))
    assert (rootfs / ".profile").read_bytes() == b"dotfile", "dotfiles keep their name"


def test_an_entry_that_escapes_the_rootfs_is_refused(tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    with pytest.raises(SkyferryError, match="escapes the rootfs"):
        unpack_image(docker_save(tmp_path / "evil.tar", [{"../outside": b"x"}]), rootfs)
    assert not (tmp_path / "outside").exists()


def test_not_an_image(tmp_path: Path) -> None:
    with pytest.raises(SkyferryError, match="not found"):
        unpack_image(tmp_path / "missing.tar", tmp_path)
    junk = tmp_path / "junk.tar"
    with tarfile.open(junk, "w") as tar:
        _add(tar, "hello.txt", b"hi")
    with pytest.raises(SkyferryError, match=r"neither manifest\.json"):
        unpack_image(junk, tmp_path)
