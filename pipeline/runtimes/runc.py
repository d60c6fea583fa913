"""The runc runtime adapter: bundles, run, pause, checkpoint and restore, per host.

Each host keeps its own runc state (`runc --root <host state>/runc`) and cgroup prefix
(`/skyferry/<mesh>/<host>/<name>`), so simulated hosts on one machine never see each other's containers.
runc drives CRIU through the same swrk RPC that pycriu speaks; going through runc keeps runc's own state
(cgroups, mounts, `runc list`) consistent on both hosts, which raw CRIU would not.
"""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from skyferry.pipeline.criu import logs
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.files.inroot import Root
from skyferry.pipeline.hostapi import privdir
from skyferry.pipeline.hostapi.spec import HOST_DIRS, ContainerSpec
from skyferry.pipeline.runtimes import engines
from skyferry.pipeline.runtimes.images import unpack_image

RUNC = "runc"
LOG_IN_CONTAINER = "/.skyferry/app.log"


class Runc:
    """runc for one host: `state_root` is the host's own state root, `cgroup_prefix` its cgroup parent."""

    name = "runc"
    modes = ("precopy", "hybrid", "postcopy", "stop-copy")  # see Runtime.modes
    pre_dumps = True  # `runc checkpoint --pre-dump` (CRIU with --track-mem) where the kernel has soft-dirty

    def __init__(self, state_root: Path, cgroup_prefix: str) -> None:
        self.root = state_root / "runc"
        self.bundles = state_root / "containers"
        self.cgroup_prefix = cgroup_prefix.rstrip("/")

    # --- bundles ---------------------------------------------------------------------------------

    def bundle(self, name: str) -> Path:
        return self.bundles / name

    def rootfs(self, name: str) -> Path:
        return self.bundle(name) / "rootfs"

    def spec(self, name: str) -> ContainerSpec:
        path = self.bundle(name) / "spec.json"
        if not path.exists():
            raise SkyferryError(f"no container named {name!r} on this host")
        return ContainerSpec.from_dict(json.loads(path.read_text()))

    def owns(self, name: str) -> bool:
        return (self.bundle(name) / "spec.json").exists()

    def names(self) -> list[str]:
        if not self.bundles.exists():
            return []
        return sorted(p.name for p in self.bundles.iterdir() if (p / "spec.json").exists())

    def create_bundle(self, spec: ContainerSpec, netns_path: str, fill_rootfs: bool = True) -> Path:
        """Write config.json (netns by path: runc then treats it as external and re-attaches it on restore).

        With fill_rootfs=False the rootfs content is expected to arrive later (a migration target).
        """
        bundle = self.bundle(spec.name)
        rootfs = bundle / "rootfs"
        rootfs.mkdir(parents=True, exist_ok=True)
        mounts = _base_mounts()
        if spec.image:
            if fill_rootfs:
                unpack_image(Path(spec.image), rootfs)
        else:
            if spec.rootfs and fill_rootfs:
                shutil.copytree(spec.rootfs, rootfs, symlinks=True, dirs_exist_ok=True)
            mounts += _host_dir_mounts(rootfs)
        _mkdir_in(rootfs, LOG_IN_CONTAINER.rpartition("/")[0])
        for i, path in enumerate(spec.volumes):
            source = self.volume(spec.name, i)
            source.mkdir(parents=True, exist_ok=True)
            _mkdir_in(rootfs, path)
            mounts.append({"destination": path, "type": "bind", "source": str(source), "options": ["rbind", "rw"]})
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", **spec.env}
        # Redirect stdio inside the container: CRIU cannot dump fds that point at host files.
        wrapped = ["/bin/sh", "-c", f'exec "$@" </dev/null >>{LOG_IN_CONTAINER} 2>&1', "sh", *spec.args]
        config = _config(wrapped, env, mounts, netns_path, f"{self.cgroup_prefix}/{spec.name}", spec.name)
        (bundle / "config.json").write_text(json.dumps(config, indent=2))
        (bundle / "spec.json").write_text(json.dumps(spec.to_dict(), indent=2))
        return bundle

    def remove_bundle(self, name: str) -> None:
        shutil.rmtree(self.bundle(name), ignore_errors=True)

    def logs(self, name: str) -> bytes:
        # The container owns its rootfs: its log may have become a symlink to any host file.
        return privdir.read_beneath(self.rootfs(name), LOG_IN_CONTAINER.lstrip("/")) or b""

    def volume(self, name: str, index: int) -> Path:
        return self.bundle(name) / "volumes" / str(index)

    def payload(self, name: str) -> dict[str, Path]:
        """The rootfs and each volume: what the file-system rounds keep in sync."""
        dirs = {"rootfs": self.rootfs(name)}
        for i, _ in enumerate(self.spec(name).volumes):
            dirs[f"volume{i}"] = self.volume(name, i)
        return dirs

    # --- lifecycle -------------------------------------------------------------------------------

    def run(self, spec: ContainerSpec, netns_path: str) -> None:
        self.create_bundle(spec, netns_path)
        try:
            # -d: runc exits once the container runs; its stderr goes to a file, never a pipe the
            # container would inherit and keep open.
            self._runc("run", "-d", "--bundle", str(self.bundle(spec.name)), spec.name)
        except SkyferryError:
            self.remove(spec.name)
            raise

    def prepare(self, spec: ContainerSpec, netns_path: str) -> None:
        self.create_bundle(spec, netns_path, fill_rootfs=False)

    def remove(self, name: str) -> None:
        self.delete(name)
        self.remove_bundle(name)

    def state(self, name: str) -> dict[str, Any] | None:
        """runc's view (status, pid), or None if runc does not know the container."""
        proc = subprocess.run(
            [RUNC, "--root", str(self.root), "state", name], capture_output=True, text=True, check=False
        )
        return json.loads(proc.stdout) if proc.returncode == 0 else None

    def exec(self, name: str, argv: list[str], stdin: bytes, timeout: float) -> tuple[int, bytes, bytes]:
        with tempfile.TemporaryDirectory(dir=self.root) as tmp:
            pid_file = Path(tmp) / "pid"

            def kill() -> None:  # runc exec, killed, leaves the command running in the container
                with contextlib.suppress(OSError, ValueError):
                    os.kill(int(pid_file.read_text()), signal.SIGKILL)

            argv = [RUNC, "--root", str(self.root), "exec", "--pid-file", str(pid_file), name, *argv]
            return engines.run_io(argv, stdin, timeout, on_timeout=kill)

    def pause(self, name: str) -> None:
        self._runc("pause", name)

    def resume(self, name: str) -> None:
        self._runc("resume", name)

    def delete(self, name: str) -> None:
        """Kill (even when frozen) and forget the container; idempotent."""
        if self.state(name) is not None:
            self._runc("delete", "--force", name)

    def checkpoint(self, name: str, images: Path, work: Path, parent: str | None = None) -> None:
        """Dump a paused container and leave it paused: the source stays frozen, not killed,
        until the target confirms. CRIU restores the freezer state it found (FROZEN). With `parent` (a
        pre-dump, relative to `images`), runc asks CRIU to track memory, and the pages not written since
        that pre-dump are only marked as in the parent."""
        images.mkdir(parents=True, exist_ok=True)
        work.mkdir(parents=True, exist_ok=True)
        args = ["checkpoint", "--leave-running", "--tcp-established", "--file-locks"]
        args += ["--image-path", str(images), "--work-path", str(work)]
        args += ["--parent-path", parent] if parent else []
        self._runc(*args, name, criu_log=work / "dump.log")

    def pre_dump(self, name: str, images: Path, parent: str | None, work: Path) -> None:
        """CRIU pre-dump of the running container: its memory only, the tasks frozen just long enough to
        collect the pages into pipes, then resumed while CRIU writes them. runc refuses ("CRIU is missing
        features") where the kernel has no soft-dirty tracking."""
        images.mkdir(parents=True, exist_ok=True)
        work.mkdir(parents=True, exist_ok=True)
        args = ["checkpoint", "--pre-dump", "--image-path", str(images), "--work-path", str(work)]
        args += ["--parent-path", parent] if parent else []
        self._runc(*args, name, criu_log=work / "dump.log")

    def checkpoint_lazy(self, name: str, images: Path, work: Path, page_server: str) -> subprocess.Popen[bytes]:
        """Post-copy: dump everything but the memory pages, which a CRIU page server on `page_server`
        ("addr:port") then hands out to the target until it has them all. Returns the running `runc
        checkpoint` once the dump itself is done.

        `--leave-running`: CRIU counts a page-server client that hangs up without asking for every page
        as a success and would then kill the tasks (criu/cr-dump.c), so a target that gives up (a failed
        restore, a rollback) would take the only live copy with it. Left running, the tasks stay frozen
        (the freezer state CRIU found) until confirm removes them or a rollback thaws them."""
        images.mkdir(parents=True, exist_ok=True)
        work.mkdir(parents=True, exist_ok=True)
        ready_r, ready_w = os.pipe()
        argv = [RUNC, "--root", str(self.root), "checkpoint", "--lazy-pages", "--page-server", page_server,
                "--leave-running", "--status-fd", str(ready_w), "--tcp-established", "--file-locks",
                "--image-path", str(images), "--work-path", str(work), name]  # fmt: skip
        with open(work / "runc-checkpoint.err", "wb") as err:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                    pass_fds=(ready_w,), start_new_session=True)  # fmt: skip
        os.close(ready_w)
        with os.fdopen(ready_r, "rb") as ready:
            ok = ready.read(1)  # one byte when the dump is done; EOF if runc or CRIU gave up
        if not ok:
            proc.wait()
            message = (work / "runc-checkpoint.err").read_text(errors="replace").strip()
            raise _failure("lazy checkpoint", message, work / "dump.log")
        return proc

    def restore_lazy(self, name: str, images: Path, work: Path) -> None:
        """Post-copy: restore without memory; a lazy-pages daemon must already listen in `work`
        (pipeline/memory/lazypages.py)."""
        args = ["restore", "-d", "--lazy-pages", "--tcp-established", "--file-locks"]
        args += ["--image-path", str(images), "--work-path", str(work), "--bundle", str(self.bundle(name))]
        self._runc(*args, name, criu_log=work / "restore.log")

    def kill_argv(self, name: str) -> list[str]:
        """The command that SIGKILLs every process of the container: for a lazily restored copy whose page
        source is gone (run by its guard, pipeline/memory/lazyguard.py, which may outlive this agent)."""
        return [RUNC, "--root", str(self.root), "kill", "--all", name, "KILL"]

    def restore(self, name: str, images: Path, work: Path) -> None:
        work.mkdir(parents=True, exist_ok=True)
        args = ["restore", "-d", "--tcp-established", "--file-locks"]
        args += ["--image-path", str(images), "--work-path", str(work), "--bundle", str(self.bundle(name))]
        self._runc(*args, name, criu_log=work / "restore.log")

    def _runc(self, *args: str, criu_log: Path | None = None) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        # stderr goes to an anonymous file, not a pipe: `runc run -d` hands its stderr to the container,
        # which would hold a pipe open forever. One file per call: migrations run in parallel threads.
        with tempfile.TemporaryFile(dir=self.root) as err:
            proc = subprocess.run(
                [RUNC, "--root", str(self.root), *args],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                check=False,
            )
            err.seek(0)
            message = err.read().decode(errors="replace").strip()
        if proc.returncode != 0:
            raise _failure(f"runc {args[0]}", message, criu_log)


def _failure(what: str, stderr: str, criu_log: Path | None) -> SkyferryError:
    """The error names CRIU's first real error (the resource and the task) rather than runc's last
    line; both logs go with it, for the journal (`skyferry migrations show ID`)."""
    text = logs.read(criu_log)
    runc_lines = [ln for ln in stderr.splitlines() if "level=error" in ln] or stderr.splitlines() or ["?"]
    cause = logs.first_error(text) or runc_lines[-1][-300:]
    log = f"--- runc\n{logs.tail(stderr)}"
    if text and criu_log:
        log += f"\n--- CRIU {criu_log.name}\n{logs.tail(text)}"
    return SkyferryError(f"{what} failed: {cause}", log=log)


def _host_dir_mounts(rootfs: Path) -> list[dict[str, Any]]:
    """Read-only binds of the host's system dirs; merged-/usr symlinks (/lib -> usr/lib) stay symlinks,
    because CRIU cannot move a mount whose source is a symlink."""
    mounts = []
    for d in HOST_DIRS:
        target = rootfs / d.lstrip("/")
        if os.path.islink(d):
            if not target.is_symlink():
                target.symlink_to(os.readlink(d))
        elif os.path.isdir(d):
            target.mkdir(parents=True, exist_ok=True)
            mounts.append({"destination": d, "type": "bind", "source": d, "options": ["rbind", "ro"]})
    return mounts


def _base_mounts() -> list[dict[str, Any]]:
    return [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {
            "destination": "/dev",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
        },
        {
            "destination": "/dev/pts",
            "type": "devpts",
            "source": "devpts",
            "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"],
        },
        {
            "destination": "/dev/shm",
            "type": "tmpfs",
            "source": "shm",
            "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        },
        {
            "destination": "/sys",
            "type": "sysfs",
            "source": "sysfs",
            "options": ["nosuid", "noexec", "nodev", "ro"],
        },
    ]


def _config(
    args: list[str],
    env: dict[str, str],
    mounts: list[dict[str, Any]],
    netns_path: str,
    cgroup: str,
    hostname: str,
) -> dict[str, Any]:
    caps = [
        "CAP_AUDIT_WRITE",
        "CAP_KILL",
        "CAP_NET_BIND_SERVICE",
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_FOWNER",
        "CAP_SETUID",
        "CAP_SETGID",
    ]
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": [f"{k}={v}" for k, v in env.items()],
            "cwd": "/",
            "capabilities": {k: caps for k in ("bounding", "effective", "permitted")},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": False},
        "hostname": hostname,
        "mounts": mounts,
        "linux": {
            "cgroupsPath": cgroup,
            "namespaces": [
                {"type": "pid"},
                {"type": "ipc"},
                {"type": "uts"},
                {"type": "mount"},
                {"type": "network", "path": netns_path},
            ],
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
        },
    }


def _mkdir_in(rootfs: Path, path: str) -> None:
    """Directory `path` of the container (and its parents), resolved inside `rootfs`: a symlink from the
    image (`.skyferry -> /etc`) leads inside the rootfs, never to the host."""
    try:
        with Root(rootfs) as root, root.dir(path.strip("/"), create=True):
            pass
    except OSError as exc:
        raise SkyferryError(f"cannot make {path} in the container's rootfs: {exc.strerror}") from exc
