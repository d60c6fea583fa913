"""The OCI wrapping of a workload root: what `skyferry run --image` unpacks, without running mmdebstrap."""

import io
import json
import tarfile
from pathlib import Path

from skyferry.pipeline.runtimes.images import unpack_image
from skyferry.pipeline.scenarios import workload_images


def _root_tar(path: Path) -> None:
    """A root as mmdebstrap writes one: ./-prefixed names, device nodes in /dev, owners by name and number."""
    with tarfile.open(path, "w") as tar:
        for name in ("./", "./dev/", "./etc/", "./var/lib/postgresql/"):
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        null = tarfile.TarInfo("./dev/null")
        null.type, null.devmajor, null.devminor = tarfile.CHRTYPE, 1, 3
        tar.addfile(null)
        for name, uid, uname in (("./etc/passwd", 0, "root"), ("./var/lib/postgresql/PG_VERSION", 105, "postgres")):
            data = name.encode()
            info = tarfile.TarInfo(name)
            info.size, info.uid, info.gid, info.uname, info.gname = len(data), uid, uid, uname, uname
            tar.addfile(info, io.BytesIO(data))


def test_layer_keeps_numeric_owners_and_drops_devices(tmp_path: Path) -> None:
    _root_tar(tmp_path / "root.tar")
    recipe = workload_images.Recipe("postgres", ("postgresql-15",), sources=("deb http://example.invalid x main",))
    workload_images._oci_layout(tmp_path / "root.tar", tmp_path / "image.tar", recipe)

    with tarfile.open(tmp_path / "image.tar") as outer:
        index = json.load(outer.extractfile("index.json"))  # type: ignore[arg-type]
        manifest_blob = "blobs/sha256/" + index["manifests"][0]["digest"].removeprefix("sha256:")
        manifest = json.load(outer.extractfile(manifest_blob))  # type: ignore[arg-type]
        layer_blob = "blobs/sha256/" + manifest["layers"][0]["digest"].removeprefix("sha256:")
        with tarfile.open(fileobj=outer.extractfile(layer_blob), mode="r|gz") as layer:
            entries = {e.name: e for e in layer}
    assert "./dev/null" not in entries and "./dev" in entries
    pg = entries["./var/lib/postgresql/PG_VERSION"]
    assert (pg.uid, pg.uname, pg.gname) == (105, "", ""), "only the image's numeric ids may count"

    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    unpack_image(tmp_path / "image.tar", rootfs)  # the real unpacker accepts it
    assert (rootfs / "var/lib/postgresql/PG_VERSION").read_text() == "./var/lib/postgresql/PG_VERSION"
    assert list((rootfs / "dev").iterdir()) == []


def test_recipe_hash_follows_the_packages() -> None:
    sources = ("deb http://example.invalid bookworm main",)
    base = workload_images.Recipe("nginx", ("nginx-light",), sources=sources)
    assert base.digest() == workload_images.Recipe("nginx", ("nginx-light",), sources=sources).digest()
    assert base.digest() != workload_images.Recipe("nginx", ("nginx-full",), sources=sources).digest()
    assert workload_images.image_path(base, Path("/c")).parent.name == f"nginx-{base.digest()}"
