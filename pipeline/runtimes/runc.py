"""The runc runtime adapter: bundles, run, pause, checkpoint and restore, per host.

Each host keeps its own runc state (`runc --root <host state>/runc`) and cgroup prefix
(`/skyferry/<mesh>/<host>/<name>`), so simulated hosts on one machine never see each other's containers.
runc drives CRIU through the same swrk RPC that pycriu speaks; going through runc keeps runc's own state
(cgroups, mounts, `runc list`) consistent on both hosts, which raw CRIU would not. The one exception is
the checkpoint, which changes nothing runc keeps: its request, built as runc builds it, goes to a CRIU
worker started ahead of the freeze (runcdump.py).
"""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

from skyferry.pipeline import proctree
from skyferry.pipeline.criu import logs
from skyferry.pipeline.criu.worker import Worker
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.files.inroot import Root
from skyferry.pipeline.hostapi import privdir
from skyferry.pipeline.hostapi.spec import ContainerSpec
from skyferry.pipeline.runtimes import engines, freezer, isolation, runcdump
from skyferry.pipeline.runtimes.children import Children, kill_cgroup
from skyferry.pipeline.runtimes.images import unpack_image
from skyferry.pipeline.runtimes.isolation import LOG_IN_CONTAINER

RUNC = "runc"
# CRIU options for this engine's containers, in a file runc hands CRIU (the `org.criu.config` annotation;
# a CRIU config file overrides runc's RPC settings). `network-lock skip`: the agent silences the netns
# itself with nftables around every dump and restore (pipeline/agent/netlock.py), so CRIU's own lock is
# redundant, and its default (iptables) spawns iptables-restore and `sh -c iptables -C` six to eight times
# per restore: ~75 ms inside the freeze (docs/migration.md, "Where the freeze goes"). A restore takes the
# method its dump recorded, so the dump side decides. `manage-cgroups=ignore`: runc puts CRIU's restore
# process in the container's own cgroup and applies config.json's resources there, so the restored tasks
# inherit both; CRIU's own cgroup work only cost time (mounting every hierarchy and walking it: 13-22 ms
# of a 60 ms dump) and, on v2, put the tasks back into the source host's path (docs/precopy.md).
CRIU_CONF = "network-lock skip\nmanage-cgroups=ignore\n"
# runc masks a directory (/proc/acpi, /sys/firmware) with an empty read-only tmpfs, which CRIU would dump
# and restore with a `tar | gzip` each: ~4.5 ms apiece at both ends, inside the freeze. Named external
# instead, the dump records only the key, and the restore binds an empty read-only directory of the bundle
# there: the container still sees an empty directory it cannot write (docs/security.md).
MASK_KEY = "skyferry-masked"
MASK_DIR = "masked"  # in the bundle: empty, never written


class Runc:
    """runc for one host: `state_root` is the host's own state root, `cgroup_prefix` its cgroup parent."""

    name = "runc"
    modes = ("precopy", "hybrid", "postcopy", "stop-copy")  # see Runtime.modes
    pre_dumps = True  # `runc checkpoint --pre-dump` (CRIU with --track-mem) where the kernel has soft-dirty

    def __init__(self, state_root: Path, cgroup_prefix: str) -> None:
        self.root = state_root / "runc"
        self.bundles = state_root / "containers"
        self.cgroup_prefix = cgroup_prefix.rstrip("/")
        self.children = Children(state_root / "children" / "runc")
        self._ahead: dict[str, Worker] = {}  # CRIU workers for the next checkpoints (checkpoint_ahead)
        self._ahead_lock = threading.Lock()

    # --- bundles ---------------------------------------------------------------------------------

    def bundle(self, name: str) -> Path:
        return self.bundles / name

    def rootfs(self, name: str) -> Path:
        return self.bundle(name) / "rootfs"

    def spec(self, name: str) -> ContainerSpec:
        path = self.bundle(name) / "spec.json"
        if not path.exists():
            raise SkyferryError(f"no container named {name!r} on this host")
        return ContainerSpec.load(path)

    def owns(self, name: str) -> bool:
        return (self.bundle(name) / "spec.json").exists()

    def names(self) -> list[str]:
        if not self.bundles.exists():
            return []
        return sorted(p.name for p in self.bundles.iterdir() if (p / "spec.json").exists())

    def create_bundle(self, spec: ContainerSpec, netns_path: str, fill_rootfs: bool = True) -> Path:
        """Write config.json (netns by path: runc then treats it as external and re-attaches it on restore).

        The rootfs is the image, or the --rootfs copy, or nothing, plus what isolation.prepare_rootfs adds
        (its own /etc; busybox where it has no shell); host directories only where the spec names them.
        With fill_rootfs=False the rootfs content is expected to arrive later (a migration target).
        """
        bundle = self.bundle(spec.name)
        rootfs = bundle / "rootfs"
        rootfs.mkdir(parents=True, exist_ok=True)
        if fill_rootfs:
            if spec.image:
                unpack_image(Path(spec.image), rootfs)
            elif spec.rootfs:
                shutil.copytree(spec.rootfs, rootfs, symlinks=True, dirs_exist_ok=True)
        # /.skyferry first, resolved inside the rootfs: an image's link there leads nowhere on the host.
        _mkdir_in(rootfs, LOG_IN_CONTAINER.rpartition("/")[0])
        if fill_rootfs:
            try:
                isolation.prepare_rootfs(rootfs, spec.name, spec.ip, spec.uid, spec.gid, spec.host_dirs)
            except (OSError, ValueError, subprocess.CalledProcessError) as exc:
                raise SkyferryError(f"cannot prepare the rootfs of {spec.name!r}: {exc}") from exc
        try:
            mounts = _base_mounts() + isolation.host_dir_mounts(rootfs, spec.host_dirs)
        except (OSError, ValueError) as exc:
            raise SkyferryError(f"{spec.name!r}: {exc}", hint="--host-dir names directories of the host") from exc
        for i, path in enumerate(spec.volumes):
            source = self.volume(spec.name, i)
            source.mkdir(parents=True, exist_ok=True)
            if fill_rootfs:  # a new container's volume: its seed's copy, owned by the container's user
                seed = spec.seeds.get(path)
                if seed:
                    shutil.copytree(seed, source, symlinks=True, dirs_exist_ok=True)
                _chown_tree(source, spec.uid, spec.gid)
            _mkdir_in(rootfs, path)
            mounts.append({"destination": path, "type": "bind", "source": str(source), "options": ["rbind", "rw"]})
        # Redirect stdio inside the container: CRIU cannot dump fds that point at host files.
        wrapped = ["/bin/sh", "-c", f'exec "$@" </dev/null >>{LOG_IN_CONTAINER} 2>&1', "sh", *spec.args]
        process = isolation.process(wrapped, spec.env, spec.uid, spec.gid)
        config = _config(process, mounts, netns_path, f"{self.cgroup_prefix}/{spec.name}", spec.name)
        (bundle / MASK_DIR).mkdir(mode=0o555, exist_ok=True)
        (bundle / "criu.conf").write_text(_criu_conf(bundle / MASK_DIR))
        config["annotations"] = {"org.criu.config": str(bundle / "criu.conf")}
        if spec.seccomp == "unconfined":  # asked for by name, as `docker run --security-opt seccomp=unconfined`
            del config["linux"]["seccomp"]
        (bundle / "config.json").write_text(json.dumps(config, indent=2))
        spec.save(bundle / "spec.json")
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
            self._runc("run", "-d", "--bundle", str(self.bundle(spec.name)), spec.name, own_session=False)
        except SkyferryError:
            self.remove(spec.name)
            raise

    def prepare(self, spec: ContainerSpec, netns_path: str) -> None:
        self.create_bundle(spec, netns_path, fill_rootfs=False)

    def remove(self, name: str) -> None:
        self.delete(name)
        self.remove_bundle(name)

    def state(self, name: str) -> dict[str, Any] | None:
        """runc's view (status, pid), or None if runc does not know the container: what `runc state`
        prints, read from runc's own state file the way runc 1.1 derives it (libcontainer's refreshState),
        without runc's ~10 ms start-up (the checkpoint asks right before its pause). Paused if its cgroup is
        frozen; stopped if the init process is gone (or its pid reused: the start time differs, or a
        zombie); created while runc's exec fifo waits for `runc start`; else running."""
        try:
            saved = json.loads((self.root / name / "state.json").read_text())
        except FileNotFoundError:
            return None
        pid = int(saved["init_process_pid"])
        alive = _started_at(pid) == int(saved["init_process_start"])
        if freezer.frozen(self.cgroup(name)):
            status = "paused"
        elif not alive:
            status = "stopped"
        else:
            status = "created" if (self.root / name / "exec.fifo").exists() else "running"
        return {"id": name, "pid": pid if alive else 0, "status": status, "created": saved.get("created")}

    def exec(self, name: str, argv: list[str], stdin: bytes, timeout: float) -> tuple[int, bytes, bytes]:
        with tempfile.TemporaryDirectory(dir=self.root) as tmp:
            pid_file = Path(tmp) / "pid"

            def kill() -> None:  # runc exec, killed, leaves the command running in the container
                with contextlib.suppress(OSError, ValueError):
                    os.kill(int(pid_file.read_text()), signal.SIGKILL)

            argv = [RUNC, "--root", str(self.root), "exec", "--pid-file", str(pid_file), name, *argv]
            return engines.run_io(argv, stdin, timeout, on_timeout=kill)

    def cgroup(self, name: str) -> str:
        """The cgroupsPath of its config.json: runc's cgroupfs driver uses it as is in every hierarchy (the
        systemd driver's "slice:prefix:name" form is never written here)."""
        return f"{self.cgroup_prefix}/{name}"

    def pause(self, name: str) -> None:
        freezer.freeze(self.cgroup(name))  # what `runc pause` writes, without its start-up (freezer.py)

    def resume(self, name: str) -> None:
        self._runc("resume", name)

    def started(self, name: str) -> list[int]:
        """The runc calls (each with its CRIU) this host started for `name` and still waits on, also those
        of an agent that died meanwhile: process group ids (children.kill_groups ends them)."""
        return self.children.started(name)

    def delete(self, name: str) -> None:
        """Kill (even when frozen) and forget the container, and anything left in its cgroup that runc no
        longer knows (children.kill_cgroup); idempotent."""
        self.checkpoint_ahead(name, ready=False)
        if self.state(name) is not None:
            self._runc("delete", "--force", name)
        kill_cgroup(self.cgroup(name))

    def checkpoint(self, name: str, images: Path, work: Path, parent: str | None = None) -> None:
        """Dump a paused container and leave it paused: the source stays frozen, not killed,
        until the target confirms. CRIU restores the freezer state it found (FROZEN). With `parent` (a
        pre-dump, relative to `images`), CRIU tracks memory, and the pages not written since that
        pre-dump are only marked as in the parent. The request is runc's own (runcdump.py), sent to the
        CRIU worker `checkpoint_ahead` started, or to one started now."""
        images.mkdir(parents=True, exist_ok=True)
        work.mkdir(parents=True, exist_ok=True)
        with self._ahead_lock:
            worker = self._ahead.pop(name, None)
        if worker is None or not worker.alive():
            worker = Worker()
        try:
            state = json.loads((self.root / name / "state.json").read_text())
            with self.children.waiting_on(name, worker.pid):
                runcdump.dump(worker, state, images, work, parent)
        finally:
            worker.close()

    def checkpoint_ahead(self, name: str, ready: bool = True) -> None:
        """Start the CRIU worker the next checkpoint of `name` dumps through (`ready`; idempotent), so its
        start falls outside the freeze; or end it unused."""
        with self._ahead_lock:
            worker = self._ahead.pop(name, None)
            if ready and worker is not None and worker.alive():
                self._ahead[name] = worker
                return
            if ready:
                self._ahead[name] = Worker()
        if worker is not None:
            worker.close()

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
        # Killable while the dump runs; once it is done, the page server it becomes is the session's to end.
        with os.fdopen(ready_r, "rb") as ready, self.children.waiting_on(name, proc.pid):
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

    def _runc(self, *args: str, criu_log: Path | None = None, own_session: bool = True) -> None:
        """Run runc on the container named by the last argument. In its own session (`own_session`), so
        that a freeze watchdog can kill exactly it and its CRIU (`started`); not `runc run`, whose
        container would inherit the session."""
        self.root.mkdir(parents=True, exist_ok=True)
        # stderr goes to an anonymous file, not a pipe: `runc run -d` hands its stderr to the container,
        # which would hold a pipe open forever. One file per call: migrations run in parallel threads.
        with tempfile.TemporaryFile(dir=self.root) as err:
            proc = subprocess.Popen(
                [RUNC, "--root", str(self.root), *args],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                start_new_session=own_session,
            )
            with self.children.waiting_on(args[-1], proc.pid) if own_session else contextlib.nullcontext():
                proc.wait()
            err.seek(0)
            message = err.read().decode(errors="replace").strip()
        if proc.returncode != 0:
            raise _failure(f"runc {args[0]}", message, criu_log)


def _failure(what: str, stderr: str, criu_log: Path | None) -> SkyferryError:
    """Named by CRIU's first real error (the resource and the task), else by runc's last error line."""
    runc_lines = [ln for ln in stderr.splitlines() if "level=error" in ln] or stderr.splitlines() or ["?"]
    return logs.failure(what, "runc", stderr, runc_lines[-1][-300:], criu_log)


def _chown_tree(top: Path, uid: int, gid: int) -> None:
    """lchown `top` and everything below (links themselves, never what they point at)."""
    if (uid, gid) == (0, 0):
        return
    os.lchown(top, uid, gid)
    for root, dirs, files in os.walk(top):
        for entry in dirs + files:
            os.lchown(os.path.join(root, entry), uid, gid)


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
    process: dict[str, Any], mounts: list[dict[str, Any]], netns_path: str, cgroup: str, hostname: str
) -> dict[str, Any]:
    return {
        "ociVersion": "1.0.2",
        "process": process,
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
            "seccomp": isolation.seccomp(),
            "maskedPaths": list(isolation.MASKED),
            "readonlyPaths": list(isolation.READONLY),
        },
    }


def _criu_conf(masked: Path) -> str:
    """The bundle's CRIU config: one file for both ends, as a dump looks entries up by mount point and a
    restore by key. Only the masked paths that are directories on this kernel (runc binds /dev/null over
    the files, which runc itself names external)."""
    lines = [CRIU_CONF.strip()]
    lines += [f"external mnt[{p}]:{MASK_KEY}" for p in isolation.MASKED if os.path.isdir(p)]
    lines.append(f"external mnt[{MASK_KEY}]:{masked}")
    return "\n".join(lines) + "\n"


def _mkdir_in(rootfs: Path, path: str) -> None:
    """Directory `path` of the container (and its parents), resolved inside `rootfs`: a symlink from the
    image (`.skyferry -> /etc`) leads inside the rootfs, never to the host."""
    try:
        with Root(rootfs) as root, root.dir(path.strip("/"), create=True):
            pass
    except OSError as exc:
        raise SkyferryError(f"cannot make {path} in the container's rootfs: {exc.strerror}") from exc


def _started_at(pid: int) -> int | None:
    """The start time of process `pid`; None for one that is gone, a zombie or dead (runc counts those as
    stopped too)."""
    fields = proctree.stat_fields(pid)
    return None if fields is None or fields[0] in ("Z", "X") else int(fields[19])
