"""The Docker runtime adapter: experimental checkpoint, a netns holder, the writable layer moved by hand.

Each host talks to its own dockerd at `<host state root>/docker/docker.sock` (engines.DockerDaemon starts
one with its own data root and exec root). Docker cannot join a netns by path, so a tiny holder container
(`NAME.netns`, busybox) enters the netns the netplane prepared and sleeps; the app runs with
`--network container:NAME.netns`, which Docker hands runc as a netns path, so CRIU treats it as external
and re-attaches it on restore: the container keeps its overlay IP. Docker restores only from its own
checkpoint folder and does not carry the writable layer, so the adapter bind-mounts the migration's tmpfs
images at `<data root>/containers/<id>/checkpoints/` and unpacks the layer (a tar of the overlay upper
dir, whiteouts and xattrs kept) into the new container before `docker start --checkpoint`. Checkpoint
images never touch a disk: containerd's own copies go to its content store and TMPDIR, which
engines.DockerDaemon mounts as tmpfs (a daemon without them is refused before the freeze). Established TCP needs CRIU's
`tcp-established`, which Docker has no flag for: engines.tcp_established() provides it for exactly the
checkpoint and the restore.
"""

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.hostapi.spec import ContainerSpec
from skyferry.pipeline.runtimes import engines, throttle

DOCKER = "/usr/bin/docker" if os.path.exists("/usr/bin/docker") else "docker"  # the daemon's own CLI
CHECKPOINT = "skyferry"
LAYER_TAR = "rw.tar"
HOLDER_LABEL = "skyferry.netns-holder"
STATUS = {"running": "running", "paused": "paused", "created": "created"}  # anything else: stopped
TAR_XATTRS = ["--xattrs", "--xattrs-include=trusted.*", "--numeric-owner"]


class Docker:
    name = "docker"
    modes = ("stop-copy",)  # see Runtime.modes
    pre_dumps = False  # no pre-copy at all

    def __init__(self, state_root: Path, cgroup_prefix: str) -> None:
        self.home = state_root / "docker"
        self.cgroup_parent = f"{cgroup_prefix.rstrip('/')}/docker"
        self.staging = self.home / "migrate"  # per container: spec, netns, image and layer archives
        self.images = engines.ImageCache(self.home, lambda ref, dest: self._save(ref, dest))
        self._data_root: Path | None = None

    @property
    def socket(self) -> Path:
        return self.home / "docker.sock"

    def daemon(self, netns: str | None, experimental: bool = True) -> engines.DockerDaemon:
        """The private dockerd this adapter talks to, to be started in the host's netns `netns`."""
        return engines.DockerDaemon(self.home, netns, self.cgroup_parent, experimental)

    def _require_daemon(self, what: str) -> None:
        if not self.socket.exists():
            raise SkyferryError(
                f"docker {what}: no Docker daemon for this host ({self.socket})",
                hint="start a dockerd for this host (docs/engines.md), or pick a host that has one",
            )

    def _docker(self, *args: str, what: str, timeout: float = 120) -> str:
        self._require_daemon(what)
        env = {**os.environ, "DOCKER_CONFIG": str(self.home / "cli")}
        return engines.run([DOCKER, "-H", f"unix://{self.socket}", *args], f"docker {what}", timeout=timeout, env=env)

    def _inspect(self, ref: str) -> dict[str, Any] | None:
        if not self.socket.exists():
            return None
        try:
            found = json.loads(self._docker("container", "inspect", ref, what="inspect") or "[]")
        except SkyferryError:
            return None
        return found[0] if found else None

    def _app(self, name: str) -> dict[str, Any] | None:
        info = self._inspect(name)
        if info is None or engines.LABEL not in ((info.get("Config") or {}).get("Labels") or {}):
            return None
        return info

    def _staged(self, name: str) -> Path:
        return self.staging / name

    # --- what is here ----------------------------------------------------------------------------

    def owns(self, name: str) -> bool:
        return (self._staged(name) / "spec.json").exists() or self._app(name) is not None

    def names(self) -> list[str]:
        staged = [p.name for p in self.staging.glob("*") if (p / "spec.json").exists()] if self.staging.exists() else []
        running: list[str] = []
        if self.socket.exists():
            # A daemon that died must not hide this host's other containers from `skyferry ps`.
            with contextlib.suppress(SkyferryError):
                filters = ["--filter", f"label={engines.LABEL}", "--format", "{{.Names}}"]
                running = self._docker("ps", "-a", *filters, what="ps").split()
        return sorted(set(running) | set(staged))

    def spec(self, name: str) -> ContainerSpec:
        info = self._app(name)
        if info is not None:
            return ContainerSpec.from_dict(json.loads(info["Config"]["Labels"][engines.LABEL]))
        staged = self._staged(name) / "spec.json"
        if staged.exists():
            return ContainerSpec.load(staged)
        raise SkyferryError(f"no docker container named {name!r} on this host")

    def state(self, name: str) -> dict[str, Any] | None:
        info = self._app(name)
        if info is None:
            return None
        return {"status": STATUS.get(info["State"]["Status"], "stopped"), "pid": info["State"].get("Pid") or 0}

    def exec(self, name: str, argv: list[str], stdin: bytes, timeout: float) -> tuple[int, bytes, bytes]:
        self._require_daemon("exec")
        argv = [
            "env",
            f"DOCKER_CONFIG={self.home / 'cli'}",
            DOCKER,
            "-H",
            f"unix://{self.socket}",
            "exec",
            "-i",
            name,
            *argv,
        ]
        return engines.run_io(argv, stdin, timeout)

    def logs(self, name: str) -> bytes:
        return self._docker("logs", name, what="logs").encode()

    # --- lifecycle -------------------------------------------------------------------------------

    def run(self, spec: ContainerSpec, netns_path: str) -> None:
        if not spec.image:
            raise SkyferryError("a docker container needs --image", hint="a rootfs or `docker save` tarball")
        self._require_daemon("run")
        try:
            ref = self._ensure_image(spec.image)
            self.images.keep(ref)  # now, not while frozen
            self._holder(spec.name, netns_path)
            self._docker("run", "-d", *self._create_args(spec, ref), what="run")
        except SkyferryError:
            self.remove(spec.name)
            raise

    def _create_args(self, spec: ContainerSpec, ref: str) -> list[str]:
        env = [a for k, v in spec.env.items() for a in ("--env", f"{k}={v}")]
        # Docker's own defaults (capabilities, seccomp, masked paths) stay as they are: nothing here adds
        # a capability, a privilege or a host path.
        args = ["--pull", "never", "--name", spec.name, "--network", f"container:{spec.name}.netns", *env]
        args += engines.user_args(spec)
        return [*args, "--label", f"{engines.LABEL}={json.dumps(spec.to_dict())}", ref, *spec.args]

    def holds_netns(self, name: str) -> bool:
        """True while the netns holder of container `name` exists on this host."""
        return self._inspect(f"{name}.netns") is not None

    def _holder(self, name: str, netns_path: str) -> None:
        """A container whose only process sits in `netns_path`, for the app to share its netns."""
        if self.holds_netns(name):
            return
        tarball = self.home / "holder-rootfs.tar"
        if not tarball.exists():
            engines.busybox_rootfs_tar(tarball)
        ref = self._ensure_image(str(tarball))
        self._docker(
            "run", "-d", "--pull", "never", "--name", f"{name}.netns", "--label", f"{HOLDER_LABEL}={name}",
            "--network", "none", "--cap-add", "SYS_ADMIN", "-v", f"{netns_path}:/netns:ro",
            ref, "nsenter", "--net=/netns", "sleep", "2147483647", what="run (netns holder)",
        )  # fmt: skip

    def _ensure_image(self, image: str) -> str:
        path = Path(image)
        if not path.is_file():
            self._docker("image", "inspect", image, what=f"image inspect {image}")
            return image
        if engines.is_image_archive(path):
            return engines.loaded_name(self._docker("load", "-i", str(path), what="load"))
        ref = engines.image_ref(path)
        if not self._has_image(ref):
            self._docker("import", str(path), ref, what="import")
        return ref

    def _has_image(self, ref: str) -> bool:
        try:
            self._docker("image", "inspect", ref, what="image inspect")
            return True
        except SkyferryError:
            return False

    def cgroup(self, name: str) -> str:
        """Where the kernel put its init (Docker names the cgroup after the container's ID, below our
        --cgroup-parent with the cgroupfs driver, in a scope with systemd's): asked of /proc, not guessed."""
        state = self.state(name)
        if state is None or not state["pid"]:
            raise SkyferryError(f"docker container {name!r} is not running")
        return throttle.of_pid(int(state["pid"]))

    def pause(self, name: str) -> None:
        # Refuse before freezing anything: without experimental features there is no checkpoint.
        if self._docker("info", "--format", "{{.ExperimentalBuild}}", what="info").strip() != "true":
            raise SkyferryError(
                "this host's Docker daemon cannot checkpoint: experimental features are off",
                hint="start dockerd with --experimental (Docker's checkpoint is experimental)",
            )
        self._require_volatile()
        self._docker("pause", name, what="pause")

    def _require_volatile(self) -> None:
        """Refuse a daemon whose containerd would copy checkpoint images to persistent disk."""
        for rel in engines.DOCKER_VOLATILE:
            path = self.home / rel
            if not path.is_dir() or engines.fstype(path) != "tmpfs":
                raise SkyferryError(
                    f"this host's Docker daemon would copy checkpoint images to persistent disk ({path})",
                    hint="start it with engines.DockerDaemon, which mounts tmpfs there (docs/engines.md)",
                )

    def resume(self, name: str) -> None:
        self._docker("unpause", name, what="unpause")

    def started(self, name: str) -> list[int]:
        # Docker's CRIU runs under its daemon (containerd's shim), not under a process we started; the CLI
        # call is bounded by engines.run's timeout. The watchdog still thaws the container (unpause).
        return []

    def checkpoint_ahead(self, name: str, ready: bool = True) -> None:
        pass  # the engine starts its own CRIU

    def checkpoint(self, name: str, images: Path, work: Path, parent: str | None = None) -> None:
        if parent is not None:  # pre_dumps is False: the source never builds a chain for Docker
            raise SkyferryError("docker cannot dump against a pre-dump parent")
        """CRIU images into `images`; the writable layer and the image archive into the payload."""
        info = self._app(name)
        if info is None:
            raise SkyferryError(f"no docker container named {name!r} on this host")
        staged = self._staged(name)
        shutil.rmtree(staged, ignore_errors=True)
        staged.mkdir(parents=True)
        shutil.rmtree(images, ignore_errors=True)  # docker creates <checkpoint-dir>/<name> itself
        images.parent.mkdir(parents=True, exist_ok=True)
        with self._criu_call():
            self._docker(
                "checkpoint", "create", "--leave-running", "--checkpoint-dir", str(images.parent),
                name, images.name, what="checkpoint create",
            )  # fmt: skip
        upper = Path(info["GraphDriver"]["Data"]["UpperDir"])
        engines.run(["tar", *TAR_XATTRS, "-C", str(upper), "-cf", str(staged / LAYER_TAR), "."], "writable layer")
        self.images.stage(info["Config"]["Image"], staged)

    def _save(self, ref: str, dest: Path) -> None:
        self._docker("save", "-o", str(dest), ref, what="save")

    @contextlib.contextmanager
    def _criu_call(self) -> Iterator[None]:
        """A checkpoint or restore: TCP allowed, and containerd's copies of the images removed afterwards
        (ctrd-checkpoint* in its TMPDIR: ours for engines.DockerDaemon, else /tmp; and the checkpoint's
        blobs in its content store, which only its garbage collector would remove, some time later)."""
        tmps = [self.home / "tmp", Path("/tmp")]
        blobs = [self.home / engines.DOCKER_VOLATILE[0] / "blobs" / "sha256"]
        before = {p for d in tmps for p in d.glob("ctrd-checkpoint*")} | {p for d in blobs for p in d.glob("*")}
        try:
            with engines.tcp_established():
                yield
        finally:
            for leftover in engines.new_entries(before, "ctrd-checkpoint*", tmps):
                shutil.rmtree(leftover, ignore_errors=True)
            for blob in engines.new_entries(before, "*", blobs):  # nothing else is in this store for Docker
                blob.unlink(missing_ok=True)

    def payload(self, name: str) -> dict[str, Path]:
        return {"docker": self._staged(name)}

    def prepare(self, spec: ContainerSpec, netns_path: str) -> None:
        self._require_daemon("prepare")
        self._require_volatile()
        staged = self._staged(spec.name)
        shutil.rmtree(staged, ignore_errors=True)
        staged.mkdir(parents=True)
        spec.save(staged / "spec.json")
        try:
            self._holder(spec.name, netns_path)
        except SkyferryError:
            self.remove(spec.name)
            raise

    def restore(self, name: str, images: Path, work: Path) -> None:
        staged = self._staged(name)
        if not (staged / "spec.json").exists():
            raise SkyferryError(f"docker container {name!r} was not prepared on this host")
        spec = ContainerSpec.load(staged / "spec.json")
        if self._app(name) is not None:  # left by a failed attempt
            self._docker("rm", "-f", name, what="rm")
        ref = self.images.receive(
            staged, self._has_image, lambda path: self._docker("load", "-i", str(path), what="load")
        )
        self._docker("create", *self._create_args(spec, ref), what="create")
        info = self._app(name)
        if info is None:
            raise SkyferryError(f"docker create {name!r} left no container")
        upper = Path(info["GraphDriver"]["Data"]["UpperDir"])
        engines.run(["tar", *TAR_XATTRS, "-C", str(upper), "-xf", str(staged / LAYER_TAR)], "writable layer")
        # Docker restores only from its own checkpoint folder (not --checkpoint-dir), on persistent disk:
        # the migration's tmpfs images are bind-mounted there for the call instead of copied.
        target = self._root_dir() / "containers" / info["Id"] / "checkpoints" / CHECKPOINT
        with engines.volatile(target, source=images), self._criu_call():
            self._docker("start", "--checkpoint", CHECKPOINT, name, what="start --checkpoint")
        shutil.rmtree(staged, ignore_errors=True)

    def _root_dir(self) -> Path:
        """The daemon's data root (asked once: restore runs while the container is frozen)."""
        if self._data_root is None:
            self._data_root = Path(self._docker("info", "--format", "{{.DockerRootDir}}", what="info").strip())
        return self._data_root

    def remove(self, name: str) -> None:
        if self.socket.exists():
            for ref in (name, f"{name}.netns"):
                if self._inspect(ref) is not None:
                    self._docker("rm", "-f", ref, what="rm")
        shutil.rmtree(self._staged(name), ignore_errors=True)
