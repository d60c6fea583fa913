"""Image tarballs (`docker save` and OCI layouts) unpack into a rootfs, whiteouts applied, and no layer, however
hostile, reaches outside it (a fuzz with a canary, and the naive unpacker that fails it as positive control)."""

import hashlib
import io
import json
import os
import shutil
import stat
import tarfile
import tempfile
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.hostapi.spec import ContainerSpec
from skyferry.pipeline.runtimes.images import unpack_image
from skyferry.pipeline.runtimes.runc import Runc


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


# --- hostile layers ------------------------------------------------------------------------------
# Each example runs the unpacker in a forked child chrooted into a throwaway sandbox holding `canary/`,
# `rootfs/` and `image.tar`, so even a broken unpacker following `x -> /` or `x -> ../../..` can only reach
# the sandbox, never this machine. The parent then compares the canary with what it was.

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chroot, chown and mknod need root")
REFUSED = 3  # the child's exit status when the unpacker refused the image with a SkyferryError
CANARY = {"canary/secret": b"host secret", "canary/sub/deep": b"deep"}
PROOF = {"proof": None, "proof/ok": b"applied"}  # a benign last layer: its files must exist after success

component = st.sampled_from(["x", "y", "etc", "canary", "rootfs", "..", "."])
path = st.builds(
    lambda prefix, parts: prefix + "/".join(parts),
    st.sampled_from(["", "./", "/"]),
    st.lists(component, min_size=1, max_size=3),
)
out_links = ["canary/secret", "/canary/secret", "../canary/secret"]
outside = ["/", "/canary", "/canary/sub", "../canary", "../../canary", "../../../..", "..", ".", "/rootfs", "/dev"]
entry = st.one_of(
    st.tuples(st.just("dir"), path),
    st.tuples(st.just("file"), path, st.binary(max_size=8)),
    st.tuples(st.just("symlink"), path, st.sampled_from(outside) | path),
    st.tuples(st.just("hardlink"), path, st.sampled_from(out_links) | path),
    st.tuples(st.sampled_from(["chr", "blk", "fifo"]), path),
    st.tuples(st.just("whiteout"), path, st.sampled_from(["canary", "secret", "sub", "x", "etc", "..", ".", ""])),
    st.tuples(st.just("opaque"), path | st.just("")),
)
layers = st.lists(st.lists(entry, min_size=1, max_size=6), min_size=1, max_size=3)


def _hostile_layer(entries: list[tuple]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for kind, name, *extra in entries:
            if kind == "whiteout":
                name, extra = f"{name}/.wh.{extra[0]}", [b""]
            elif kind == "opaque":
                name, extra = f"{name}/.wh..wh..opq".lstrip("/") or ".wh..wh..opq", [b""]
            info = tarfile.TarInfo(name)
            info.mode = 0o755
            data = extra[0] if kind in ("file", "whiteout", "opaque") else b""
            if kind in ("symlink", "hardlink"):
                info.type = tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE
                info.linkname = extra[0]
            elif kind in ("chr", "blk", "fifo"):
                info.type = {"chr": tarfile.CHRTYPE, "blk": tarfile.BLKTYPE, "fifo": tarfile.FIFOTYPE}[kind]
                info.devmajor, info.devminor = 8, 0  # a host disk, were it ever made
            elif kind == "dir":
                info.type = tarfile.DIRTYPE
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _sandbox(base: Path, entries: list[list[tuple]]) -> Path:
    sandbox = Path(tempfile.mkdtemp(dir=base))
    for name, data in CANARY.items():
        (sandbox / name).parent.mkdir(parents=True, exist_ok=True)
        (sandbox / name).write_bytes(data)
    (sandbox / "rootfs").mkdir()
    with tarfile.open(sandbox / "image.tar", "w") as tar:
        names = []
        for i, layer in enumerate([*[_hostile_layer(e) for e in entries], _layer(PROOF)]):
            names.append(f"l{i}/layer.tar")
            _add(tar, names[-1], layer)
        _add(tar, "manifest.json", json.dumps([{"Config": "c.json", "Layers": names}]).encode())
    return sandbox


def _snapshot(sandbox: Path) -> dict[str, tuple]:
    """Everything that could change about the canary: names, types, modes, owners, links, contents."""
    seen: dict[str, tuple] = {"/": tuple(sorted(os.listdir(sandbox)))}
    for dirpath, dirnames, filenames in os.walk(sandbox / "canary"):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            st_ = p.lstat()
            body = p.read_bytes() if p.is_file() and not p.is_symlink() else None
            seen[str(p.relative_to(sandbox))] = (st_.st_mode, st_.st_uid, st_.st_nlink, st_.st_mtime_ns, body)
    return seen


def _chrooted(sandbox: Path, unpack: Callable[[Path, Path], None]) -> int:
    """Run unpack(/image.tar, /rootfs) in a child chrooted into `sandbox`: 0 applied, REFUSED, or 1."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.chroot(sandbox)
            os.chdir("/")
            unpack(Path("/image.tar"), Path("/rootfs"))
            code = 0
        except SkyferryError:
            code = REFUSED
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


@needs_root
def test_hostile_layers_never_touch_the_canary(tmp_path: Path) -> None:
    outcomes: Counter[int] = Counter()

    @settings(
        max_examples=150, derandomize=True, database=None, deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )  # fmt: skip
    @given(layers)
    def unpack_hostile(entries: list[list[tuple]]) -> None:
        sandbox = _sandbox(tmp_path, entries)
        try:
            before = _snapshot(sandbox)
            code = _chrooted(sandbox, unpack_image)
            outcomes[code] += 1
            assert _snapshot(sandbox) == before, "the canary outside the rootfs changed"
            assert code in (0, REFUSED), "the unpacker failed with something other than a clear refusal"
            rootfs = sandbox / "rootfs"
            for dirpath, _, filenames in os.walk(rootfs):
                for name in filenames:
                    mode = os.lstat(Path(dirpath, name)).st_mode
                    assert not (stat.S_ISCHR(mode) or stat.S_ISBLK(mode)), "no device node is made from an image"
            if code == 0:  # the benign last layer was applied in full
                assert (rootfs / "proof/ok").read_bytes() == b"applied" and not (rootfs / "proof").is_symlink()
        finally:
            shutil.rmtree(sandbox)

    unpack_hostile()
    # The fuzz means something only if many hostile images were applied (not all refused at the first `..`).
    assert outcomes[0] >= 30 and outcomes[REFUSED] >= 10, outcomes


def _naive_unpack(tarball: Path, rootfs: Path) -> None:
    """What the unpacker did before openat2: entries joined below the rootfs, and their paths followed."""
    with tarfile.open(tarball) as outer:
        for layer in json.load(outer.extractfile("manifest.json"))[0]["Layers"]:  # type: ignore[arg-type]
            with tarfile.open(fileobj=outer.extractfile(layer)) as tar:
                for info in tar:
                    target = rootfs / info.name.lstrip("/")
                    if target.name == ".wh..wh..opq":
                        for child in target.parent.glob("*"):
                            shutil.rmtree(child) if child.is_dir() else child.unlink()
                    elif info.issym():
                        target.symlink_to(info.linkname)
                    elif info.isreg():
                        target.parent.mkdir(parents=True, exist_ok=True)
                        target.write_bytes(tar.extractfile(info).read())  # type: ignore[union-attr]


@needs_root
@pytest.mark.parametrize("link", ["/canary", "../canary"])
def test_symlink_then_opaque_empties_the_canary_only_for_a_naive_unpacker(tmp_path: Path, link: str) -> None:
    """The issue's attack (`x -> /etc`, then `x/.wh..wh..opq`), with the canary for /etc: the positive control
    that the fuzz's canary check sees damage, and that the real unpacker resolves `x` inside the rootfs."""
    hostile = [[("symlink", "x", link)], [("opaque", "x"), ("file", "x/planted", b"p")]]
    naive = _sandbox(tmp_path, hostile)
    before = _snapshot(naive)
    assert _chrooted(naive, _naive_unpack) == 0
    assert _snapshot(naive) != before and not (naive / "canary/secret").exists(), "the naive unpacker must do damage"
    assert (naive / "canary/planted").exists()

    safe = _sandbox(tmp_path, hostile)
    before = _snapshot(safe)
    assert _chrooted(safe, unpack_image) in (0, REFUSED)
    assert _snapshot(safe) == before
    assert (safe / "rootfs/x").is_symlink(), "the link itself is kept, as the image says"


@needs_root
def test_a_runc_bundle_keeps_the_images_links_inside_its_rootfs(tmp_path: Path) -> None:
    """After unpacking, the runc adapter makes /.skyferry and volume mount points, and reads /.skyferry/app.log
    for `skyferry logs`: an image's links must lead inside the rootfs there too. The links are relative,
    so that followed from the host they would reach the canary beside the bundles and a bug would show."""
    state = tmp_path / "state"
    canary = state / "canary"
    canary.mkdir(parents=True)
    (canary / "secret").write_bytes(b"host secret")
    runc = Runc(state, "/skyferry/test")
    out = "../../../canary"  # from <state>/containers/<name>/rootfs

    def bundle(name: str, layer: list[tuple]) -> None:
        image = _hostile_image(tmp_path / f"{name}.tar", [layer])
        spec = ContainerSpec(name=name, args=["true"], ip="10.0.0.2", image=str(image), volumes=["/data/planted"])
        runc.create_bundle(spec, "/run/netns/none")

    for name, link in (("dot", ".skyferry"), ("vol", "data")):
        with pytest.raises(SkyferryError, match="in the container's rootfs: No such file"):
            bundle(name, [("symlink", link, out)])  # inside the rootfs, the link leads nowhere
    assert sorted(p.name for p in canary.iterdir()) == ["secret"], "nothing may be made through an image's link"
    bundle("inside", [("dir", "srv"), ("symlink", "data", "/srv")])  # an absolute link, followed in the rootfs
    assert (runc.rootfs("inside") / "srv/planted").is_dir(), "positive control: links do lead, inside"

    bundle("log", [("dir", ".skyferry"), ("symlink", ".skyferry/app.log", f"../{out}/secret")])
    with pytest.raises(SkyferryError, match="symlink; not followed"):
        runc.logs("log")
    assert (runc.rootfs("log") / ".skyferry/app.log").read_bytes() == b"host secret", "followed, it would leak"


def _hostile_image(path: Path, layers: list[list[tuple]]) -> Path:
    with tarfile.open(path, "w") as tar:
        names = []
        for i, layer in enumerate(layers):
            names.append(f"l{i}/layer.tar")
            _add(tar, names[-1], _hostile_layer(layer))
        _add(tar, "manifest.json", json.dumps([{"Config": "c.json", "Layers": names}]).encode())
    return path
