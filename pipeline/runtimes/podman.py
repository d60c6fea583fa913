"""The Podman runtime adapter: one private Podman store per host, checkpoint --export / restore --import.

Each host's Podman keeps everything below `<host state root>/podman` (root, runroot, tmpdir, and runc's
own state via `--runtime-flag root=`, since runc's default root is shared by the whole machine), and its
containers' cgroups under the host's cgroup prefix. Containers join the netns the netplane prepared
(`--network ns:<path>`), so they keep their overlay IP. An export stores that netns path and the cgroup
parent in `spec.dump` and `config.dump`; the target rewrites both to its own before `restore --import`.
Podman refuses to checkpoint a paused container, so `checkpoint` thaws it behind the network lock, dumps
with --leave-running, and pauses it again: the source stays frozen until confirm, as the protocol asks.
Podman has CRIU dump into and restore from `<userdata>/checkpoint` in its store, on disk: the adapter
mounts a tmpfs there for each call, so the images never reach a disk and the unmount wipes them.
"""

import contextlib
import hashlib
import io
import json
import os
import shutil
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from skyferry.pipeline.criu import logs
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.hostapi.spec import ContainerSpec
from skyferry.pipeline.runtimes import engines, throttle
from skyferry.pipeline.runtimes.children import kill_cgroup

PODMAN = "podman"
EXPORT = "checkpoint.tar"  # in the migration's images dir (tmpfs): it holds the container's memory
CHECKPOINT_DIR = "checkpoint"  # in a container's userdata (on disk): CRIU's images, mounted as tmpfs here
ULIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096"]  # root lacks CAP_SYS_RESOURCE
STATUS = {"running": "running", "paused": "paused", "created": "created"}  # anything else: stopped
RM_TRIES = 3  # `rm` while a cut-short restore still runs (Podman.remove)


class Podman:
    name = "podman"
    modes = ("stop-copy",)  # see Runtime.modes
    pre_dumps = False  # no pre-copy at all

    def __init__(self, state_root: Path, cgroup_prefix: str) -> None:
        self.home = state_root / "podman"
        # Podman refuses a runroot longer than 50 characters: this host's is named by its state root's hash.
        self.run_dir = Path("/run/skyferry/podman") / hashlib.sha256(str(state_root).encode()).hexdigest()[:12]
        self.cgroup_parent = f"{cgroup_prefix.rstrip('/')}/podman"
        self.staging = self.home / "migrate"  # per container: the image archive and spec that travel
        self.images = engines.ImageCache(self.home, lambda ref, dest: self._save(ref, dest))

    def _base(self) -> list[str]:
        h = self.home
        return [
            PODMAN, "--root", str(h / "root"), "--runroot", str(self.run_dir), "--tmpdir", str(h / "tmp"),
            "--runtime", "runc", "--runtime-flag", f"root={self.run_dir / 'runc'}", "--cgroup-manager", "cgroupfs",
            "--events-backend", "file", "--storage-driver", "overlay",
        ]  # fmt: skip

    def _podman(self, *args: str, what: str, timeout: float = 120) -> str:
        return engines.run([*self._base(), *args], f"podman {what}", timeout=timeout)

    def _inspect(self, name: str) -> dict[str, Any] | None:
        if not self.home.exists() or shutil.which(PODMAN) is None:
            return None
        try:
            found = json.loads(self._podman("container", "inspect", name, what="inspect") or "[]")
        except SkyferryError:
            return None
        if not found or engines.LABEL not in ((found[0].get("Config") or {}).get("Labels") or {}):
            return None
        return found[0]

    def _staged(self, name: str) -> Path:
        return self.staging / name

    # --- what is here ----------------------------------------------------------------------------

    def owns(self, name: str) -> bool:
        return (self._staged(name) / "spec.json").exists() or self._inspect(name) is not None

    def names(self) -> list[str]:
        if not self.home.exists():
            return []
        out = self._podman("ps", "-a", "--filter", f"label={engines.LABEL}", "--format", "{{.Names}}", what="ps")
        staged = [p.name for p in self.staging.glob("*") if (p / "spec.json").exists()] if self.staging.exists() else []
        return sorted(set(out.split()) | set(staged))

    def spec(self, name: str) -> ContainerSpec:
        info = self._inspect(name)
        if info is not None:
            return ContainerSpec.from_dict(json.loads(info["Config"]["Labels"][engines.LABEL]))
        staged = self._staged(name) / "spec.json"
        if staged.exists():
            return ContainerSpec.load(staged)
        raise SkyferryError(f"no podman container named {name!r} on this host")

    def state(self, name: str) -> dict[str, Any] | None:
        info = self._inspect(name)
        if info is None:
            return None
        return {"status": STATUS.get(info["State"]["Status"], "stopped"), "pid": info["State"].get("Pid") or 0}

    def exec(self, name: str, argv: list[str], stdin: bytes, timeout: float) -> tuple[int, bytes, bytes]:
        return engines.run_io([*self._base(), "exec", "-i", name, *argv], stdin, timeout)

    def logs(self, name: str) -> bytes:
        return self._podman("logs", name, what="logs").encode()

    # --- lifecycle -------------------------------------------------------------------------------

    def run(self, spec: ContainerSpec, netns_path: str) -> None:
        if not spec.image:
            raise SkyferryError("a podman container needs --image", hint="a rootfs or `docker save` tarball")
        ref = self._ensure_image(spec.image)
        self.images.keep(ref)  # now, not while frozen
        env = [a for k, v in spec.env.items() for a in ("--env", f"{k}={v}")]
        args = ["run", "-d", "--name", spec.name, "--network", f"ns:{netns_path}"]
        args += ["--cgroup-parent", self.cgroup_parent, "--pull", "never", *ULIMITS, *env]
        # /dev/shm as the container's own tmpfs, not Podman's ShmDir bind: CRIU then carries its contents in
        # the images (on tmpfs), where Podman would archive them into its store on disk at each checkpoint.
        args += ["--mount", "type=tmpfs,destination=/dev/shm,tmpfs-mode=1777"]
        # Podman's own defaults stay as they are: nothing here adds a capability, privilege or host path.
        args += engines.user_args(spec)
        args += ["--label", f"{engines.LABEL}={json.dumps(spec.to_dict())}", ref, *spec.args]
        try:
            self._podman(*args, what="run")
        except SkyferryError:
            self.remove(spec.name)
            raise

    def _ensure_image(self, image: str) -> str:
        """An image reference this host's Podman has: a tarball is imported (rootfs) or loaded (archive)."""
        path = Path(image)
        if not path.is_file():
            self._podman("image", "exists", image, what=f"image exists {image}")
            return image
        if engines.is_image_archive(path):
            return engines.loaded_name(self._podman("load", "-i", str(path), what="load"))
        ref = engines.image_ref(path)
        if not self._has_image(ref):
            self._podman("import", str(path), ref, what="import")
        return ref

    def _has_image(self, ref: str) -> bool:
        try:
            self._podman("image", "exists", ref, what="image exists")
            return True
        except SkyferryError:
            return False

    def cgroup(self, name: str) -> str:
        """Where the kernel put its init (Podman names the cgroup after the container's ID, below our
        --cgroup-parent with the cgroupfs driver, in a scope with systemd's): asked of /proc, not guessed."""
        state = self.state(name)
        if state is None or not state["pid"]:
            raise SkyferryError(f"podman container {name!r} is not running")
        return throttle.of_pid(int(state["pid"]))

    def pause(self, name: str) -> None:
        self._podman("pause", name, what="pause")

    def resume(self, name: str) -> None:
        self._podman("unpause", name, what="unpause")

    def started(self, name: str) -> list[int]:
        # Not tracked yet: podman's CRIU runs under the OCI runtime podman starts, and engines.run bounds
        # the CLI call by its timeout only (docs/reliability.md). The watchdog still thaws the container.
        return []

    def checkpoint_ahead(self, name: str, ready: bool = True) -> None:
        pass  # the engine starts its own CRIU

    def checkpoint(self, name: str, images: Path, work: Path, parent: str | None = None) -> None:
        if parent is not None:  # pre_dumps is False: the source never builds a chain for Podman
            raise SkyferryError("podman cannot dump against a pre-dump parent")
        """Export checkpoint + writable layer into `images`; the image archive goes to the payload."""
        images.mkdir(parents=True, exist_ok=True)
        info = self._inspect(name)
        if info is None:
            raise SkyferryError(f"no podman container named {name!r} on this host")
        staged = self._staged(name)
        shutil.rmtree(staged, ignore_errors=True)
        staged.mkdir(parents=True)
        userdata = Path(info["StaticDir"])
        if info["State"]["Status"] == "paused":
            self.resume(name)  # still silent: the netns stays locked, and CRIU freezes it again at once
        try:
            with engines.volatile(userdata / CHECKPOINT_DIR), _criu_log(userdata / "dump.log"):
                self._podman(
                    "container", "checkpoint", "--leave-running", "--tcp-established", "--file-locks",
                    "--compress", "none", "--export", str(images / EXPORT), name, what="checkpoint",
                )  # CRIU dumps into the tmpfs before the export  # fmt: skip
        finally:
            self.pause(name)
        self.images.stage(info["ImageName"], staged)

    def _save(self, ref: str, dest: Path) -> None:
        self._podman("save", "-o", str(dest), ref, what="save")

    def payload(self, name: str) -> dict[str, Path]:
        return {"podman": self._staged(name)}

    def prepare(self, spec: ContainerSpec, netns_path: str) -> None:
        staged = self._staged(spec.name)
        shutil.rmtree(staged, ignore_errors=True)
        staged.mkdir(parents=True)
        spec.save(staged / "spec.json")
        (staged / "netns").write_text(netns_path)

    def restore(self, name: str, images: Path, work: Path) -> None:
        staged = self._staged(name)
        if not (staged / "netns").exists():
            raise SkyferryError(f"podman container {name!r} was not prepared on this host")
        if self._inspect(name) is not None:  # a failed restore leaves one "Created"
            self._podman("rm", "-f", "-t", "0", name, what="rm")
        self.images.receive(staged, self._has_image, lambda path: self._podman("load", "-i", str(path), what="load"))
        work.mkdir(parents=True, exist_ok=True)
        fixed = work / EXPORT
        cid = _retarget(images / EXPORT, fixed, (staged / "netns").read_text(), self.cgroup_parent)
        # The restored container keeps the source's ID, so where Podman unpacks the images is known before
        # it exists: that directory is a tmpfs for the call.
        userdata = self.home / "root" / "overlay-containers" / cid / "userdata"
        try:
            with engines.volatile(userdata / CHECKPOINT_DIR), _criu_log(userdata / "restore.log"):
                self._podman(
                    "container", "restore", "--import", str(fixed), "--tcp-established", "--file-locks",
                    what="restore",
                )  # fmt: skip
        finally:
            fixed.unlink(missing_ok=True)
        shutil.rmtree(staged, ignore_errors=True)

    def remove(self, name: str) -> None:
        """Also kills what is left in its cgroup (children.kill_cgroup): a restore whose podman CLI was
        killed (engines.run's bound, an agent that died) leaves Podman's record "created" while conmon and
        runc go on and start the container, which `rm` alone forgets, still running."""
        info = self._inspect(name)
        if info is not None:
            cgroup = self.container_cgroup(info["Id"])
            for attempt in range(RM_TRIES):
                try:
                    self._podman("rm", "-f", "-t", "0", name, what="rm")
                    break
                except SkyferryError:
                    if attempt == RM_TRIES - 1:
                        raise
                    # Such a restore, still running, keeps CRIU's cgroup yard mounted in the container's
                    # userdata, which `rm` cannot delete: killing its tasks makes CRIU give up and unmount it.
                    kill_cgroup(cgroup)
                    time.sleep(1)
            kill_cgroup(cgroup)
        shutil.rmtree(self._staged(name), ignore_errors=True)

    def container_cgroup(self, cid: str) -> str:
        """Where the cgroupfs driver puts container `cid`, running or not: `libpod-<ID>` below our parent."""
        return f"{self.cgroup_parent}/libpod-{cid}"

    def destroy(self) -> None:
        """Remove this host's whole Podman store (a host going away; tests' cleanup)."""
        for name in self.names():
            self.remove(name)
        for path in (self.home, self.run_dir):
            engines.remove_tree(path)


def _retarget(src: Path, dst: Path, netns_path: str, cgroup_parent: str) -> str:
    """Copy a checkpoint export, pointing its netns and cgroup parent at this host's; the container's ID."""
    with tarfile.open(src) as tar:
        members = {os.path.normpath(m.name): m for m in tar.getmembers()}
        if "spec.dump" not in members or "config.dump" not in members:
            raise SkyferryError(f"{src} is not a podman checkpoint export")
        spec = json.load(tar.extractfile(members["spec.dump"]))  # type: ignore[arg-type]
        config = json.load(tar.extractfile(members["config.dump"]))  # type: ignore[arg-type]
        old_ns = next(n["path"] for n in spec["linux"]["namespaces"] if n["type"] == "network")
        old_cg = config["cgroupParent"]
        pairs = {old_ns: netns_path, old_cg: cgroup_parent}
        with tarfile.open(dst, "w", format=tarfile.PAX_FORMAT) as out:
            for name, member in members.items():
                if name in ("spec.dump", "config.dump") and member.isfile():
                    text = tar.extractfile(member).read().decode()  # type: ignore[union-attr]
                    data = _replace(text, pairs).encode()
                    member.size = len(data)
                    out.addfile(member, io.BytesIO(data))
                else:
                    out.addfile(member, tar.extractfile(member) if member.isfile() else None)
    return str(config["id"])


def _replace(text: str, pairs: dict[str, str]) -> str:
    for old, new in pairs.items():
        text = text.replace(json.dumps(old)[1:-1], json.dumps(new)[1:-1])
    return text


@contextlib.contextmanager
def _criu_log(log: Path) -> Iterator[None]:
    """A failed Podman call names CRIU's first real error, not Podman's summary, and carries CRIU's log
    (which Podman keeps beside the container's bundle: no memory in it) for the journal."""
    try:
        yield
    except SkyferryError as exc:
        if not logs.first_error(logs.read(log)):
            raise
        what, _, line = str(exc).partition(" failed: ")
        raise logs.failure(what, "podman", str(exc), line, log) from exc
