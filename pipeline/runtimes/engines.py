"""What the Podman and Docker adapters share: engine commands, CRIU's TCP switch, busybox images, daemons.

Every local host has its own engine instance below its own state root (`<state root>/podman`,
`<state root>/docker`), so two simulated hosts on one machine never see each other's containers,
images or layers, and a migration really copies them through the agents' stream.
"""

import contextlib
import ctypes
import fcntl
import hashlib
import io
import os
import shutil
import signal
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from skyferry.pipeline.errors import SkyferryError

LABEL = "skyferry.spec"  # the ContainerSpec as JSON, on every container skyferry runs in an engine
BUSYBOX = Path("/bin/busybox")  # busybox-static (scripts/bootstrap-host.sh); it runs in any rootfs
RUNC_CONF = Path("/etc/criu/runc.conf")
RUNC_CONF_LOCK = Path("/run/lock/skyferry-criu-runc-conf.lock")
PR_SET_PDEATHSIG = 1
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MNT_DETACH = 0x2, 0x4, 0x8, 0x1000, 0x2
_LIBC = ctypes.CDLL(None, use_errno=True)
# Where this host's dockerd (engines.DockerDaemon) and its containerd copy checkpoint images, relative
# to the adapter's home: the content store (a tar of each checkpoint and restore) and containerd's TMPDIR
# (ctd-checkpoint*, ctrd-checkpoint*: the images unpacked).
DOCKER_VOLATILE = ("data/containerd/daemon/io.containerd.content.v1.content", "tmp")
MARK = "# written by skyferry for one checkpoint or restore; removed right after\n"


def run(argv: list[str], what: str, *, timeout: float = 120, env: dict[str, str] | None = None) -> str:
    """Run an engine command; a failure becomes one clear line naming `what` failed."""
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False, env=env
        )
    except FileNotFoundError:
        raise SkyferryError(f"{what}: {argv[0]} is not installed", hint="run scripts/bootstrap-host.sh") from None
    except subprocess.TimeoutExpired:
        raise SkyferryError(f"{what}: {argv[0]} did not answer within {timeout:.0f} s") from None
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()] or [f"exit status {proc.returncode}"]
        raise SkyferryError(f"{what} failed: {lines[-1].strip()[-300:]}")
    return proc.stdout


def run_io(
    argv: list[str], stdin: bytes, timeout: float, on_timeout: Callable[[], None] | None = None
) -> tuple[int, bytes, bytes]:
    """Run a command to its end with `stdin`: (exit code, stdout, stderr). For `exec`, whose exit code and
    output are the user's, not an engine failure. `on_timeout` kills what the killed CLI leaves running."""
    try:
        proc = subprocess.run(argv, input=stdin, capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        if on_timeout:
            on_timeout()
        raise SkyferryError(f"the command ran longer than {timeout:g} s", hint="pass a longer --timeout") from None
    return proc.returncode, proc.stdout, proc.stderr


@contextlib.contextmanager
def tcp_established() -> Iterator[None]:
    """Let CRIU checkpoint and restore established TCP connections for the runc calls made inside.

    Docker has no flag for it; runc hands CRIU `/etc/criu/runc.conf`, which overrides the RPC options.
    The file exists only while one checkpoint or restore runs, under a machine-wide lock, so it never
    changes anything else; an operator's own runc.conf is used as it is, never rewritten.
    """
    RUNC_CONF_LOCK.parent.mkdir(parents=True, exist_ok=True)
    with open(RUNC_CONF_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if RUNC_CONF.exists():
            text = RUNC_CONF.read_text()
            if "tcp-established" not in text.split("#")[0] and MARK not in text:
                raise SkyferryError(
                    f"{RUNC_CONF} exists without tcp-established",
                    hint="add a line `tcp-established` to it, or remove it; skyferry leaves operators' files alone",
                )
            yield
            return
        RUNC_CONF.parent.mkdir(parents=True, exist_ok=True)
        RUNC_CONF.write_text(MARK + "tcp-established\n")
        try:
            yield
        finally:
            RUNC_CONF.unlink(missing_ok=True)


def fstype(path: Path) -> str:
    """The type of the filesystem `path` is on ("tmpfs", "ext4", ...), by its device in the mount table."""
    dev = os.stat(path).st_dev
    wanted = f"{os.major(dev)}:{os.minor(dev)}"
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[2] == wanted:
                return fields[fields.index("-") + 1]
    raise SkyferryError(f"no mount holds {path} ({wanted})")


@contextlib.contextmanager
def volatile(path: Path, source: Path | None = None) -> Iterator[Path]:
    """`path` on tmpfs for one engine call: a fresh tmpfs, or a bind mount of `source` (a directory that is
    on tmpfs already). What the engine writes there (CRIU images) never reaches a disk, and the unmount
    at the end wipes it (or leaves it to `source`'s owner), whether the call worked or not."""
    made = [p for p in path.parents if not p.exists()]
    if os.path.ismount(path):  # left by an agent that died mid-call
        _LIBC.umount2(os.fsencode(path), MNT_DETACH)
    shutil.rmtree(path, ignore_errors=True)  # whatever an earlier call left there, on disk
    path.mkdir(parents=True)
    if source is None:
        _mount("skyferry-images", path, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=0700")
    else:
        _mount(str(source), path, None, MS_BIND, None)
    try:
        yield path
    finally:
        # Docker unmounts everything below a container that failed to start: then it is gone already.
        if os.path.ismount(path) and _LIBC.umount2(os.fsencode(path), MNT_DETACH) != 0:
            raise SkyferryError(f"cannot unmount {path}: {os.strerror(ctypes.get_errno())}")
        for dir_ in (path, *made):  # the directories made for it, where the engine left them empty
            with contextlib.suppress(OSError):
                dir_.rmdir()


def mount_tmpfs(path: Path) -> None:
    """A tmpfs at `path` for as long as it is mounted (a daemon's scratch directories)."""
    path.mkdir(parents=True, exist_ok=True)
    if fstype(path) != "tmpfs":
        _mount("skyferry-images", path, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=0700")


def _mount(source: str, target: Path, fs: str | None, flags: int, data: str | None) -> None:
    # libc's mount(2), not mount(8): this runs inside the freeze, where spawning costs milliseconds.
    if _LIBC.mount(_c(source), os.fsencode(target), _c(fs), ctypes.c_ulong(flags), _c(data)) != 0:
        err = ctypes.get_errno()
        raise SkyferryError(f"cannot mount {fs or source} at {target}: {os.strerror(err)}")


def _c(text: str | None) -> bytes | None:
    return None if text is None else text.encode()


def image_ref(tarball: Path) -> str:
    """The engine image name for a rootfs tarball: the same content gives the same name on every host."""
    digest = hashlib.sha256()
    with open(tarball, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return f"localhost/skyferry/img:{digest.hexdigest()[:16]}"


def is_image_archive(tarball: Path) -> bool:
    """True for a `docker save` or OCI archive (to load), False for a plain rootfs tarball (to import)."""
    try:
        with tarfile.open(tarball) as tar:
            names = set(tar.getnames())
    except tarfile.TarError as exc:
        raise SkyferryError(f"image {tarball} is not a readable tarball: {exc}") from exc
    return bool(names & {"manifest.json", "./manifest.json", "index.json", "./index.json"})


def loaded_name(output: str) -> str:
    """The image name `podman load` / `docker load` printed."""
    for line in output.splitlines():
        for prefix in ("Loaded image: ", "Loaded image(s): ", "Loaded image ID: "):
            if line.startswith(prefix):
                return line[len(prefix) :].split(",")[0].strip()
    raise SkyferryError(f"could not tell which image was loaded: {output.strip()[-200:]!r}")


def busybox_rootfs_tar(dest: Path, files: dict[str, str] | None = None) -> Path:
    """A rootfs tarball holding static busybox (with applet links) plus `files` (path -> text, executable)."""
    if not BUSYBOX.exists() or b"ld-linux" in BUSYBOX.read_bytes()[:4096]:
        raise SkyferryError(f"{BUSYBOX} is missing or not static", hint="apt-get install busybox-static")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(dest, "w") as tar:
        for d in ("bin", "tmp", "etc", "app", "proc", "sys", "dev"):
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if d == "tmp" else 0o755
            tar.addfile(info)
        tar.add(BUSYBOX, arcname="bin/busybox")
        for applet in ("sh", "nc", "sleep", "nsenter", "cat", "echo", "ls", "rm", "true"):
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type, link.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(link)
        for path, text in (files or {}).items():
            data = text.encode()
            info = tarfile.TarInfo(path.lstrip("/"))
            info.size, info.mode = len(data), 0o755
            tar.addfile(info, io.BytesIO(data))
    return dest


# A TCP counter speaking workload_counter's protocol in busybox sh: each request line SEQ is answered
# with "SEQ COUNT", COUNT counted per connection in the shell's memory (it must survive a migration),
# and appended to /app/served in the writable layer (it must move with the container). It deletes the
# image's /app/seed, so the layer also carries a whiteout.
COUNTER_SERVE = """#!/bin/sh
rm -f /app/seed
count=0
while read -r seq; do
  count=$((count + 1))
  echo "$seq $count" >> /app/served
  echo "$seq $count"
done
"""
COUNTER_ARGS = ["nc", "-ll", "-p", "9000", "-e", "/app/serve.sh"]


def counter_image(dest: Path) -> Path:
    """A busybox rootfs tarball whose /app/serve.sh is the counter service; run it with COUNTER_ARGS."""
    return busybox_rootfs_tar(dest, {"/app/serve.sh": COUNTER_SERVE, "/app/seed": "deleted by serve.sh\n"})


class ImageCache:
    """A host's `save` archives of the images its containers use, one per image, written when a container
    starts: a checkpoint then only links the archive into the payload instead of saving while frozen, and
    the target loads it only when its engine lacks the image (then keeps it for the next move)."""

    ARCHIVE = "image.tar"
    REF = "image"

    def __init__(self, home: Path, save: Callable[[str, Path], None]) -> None:
        self.dir = home / "images"
        self.save = save

    def path(self, ref: str) -> Path:
        return self.dir / f"{hashlib.sha256(ref.encode()).hexdigest()[:16]}.tar"

    def keep(self, ref: str) -> Path:
        path = self.path(ref)
        if not path.exists():
            self.dir.mkdir(parents=True, exist_ok=True)
            part = path.with_suffix(".part")
            part.unlink(missing_ok=True)
            self.save(ref, part)
            part.rename(path)
        return path

    def stage(self, ref: str, staged: Path) -> None:
        """Put the image's archive and name into a payload directory."""
        (staged / self.ARCHIVE).unlink(missing_ok=True)
        os.link(self.keep(ref), staged / self.ARCHIVE)
        (staged / self.REF).write_text(ref)

    def receive(self, staged: Path, has: Callable[[str], bool], load: Callable[[Path], None]) -> str:
        """The image named in a received payload, loaded unless the engine has it already."""
        ref = (staged / self.REF).read_text()
        archive = staged / self.ARCHIVE
        if not has(ref):
            load(archive)
        if not self.path(ref).exists():
            self.dir.mkdir(parents=True, exist_ok=True)
            os.replace(archive, self.path(ref))
        return ref


def unmount_below(path: Path) -> None:
    """Unmount everything mounted at or below `path`, deepest first (engines leave overlay and shm mounts)."""
    root = str(path.resolve())
    mounts = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].replace("\\040", " ")
            if point == root or point.startswith(root + "/"):
                mounts.append(point)
    for point in sorted(set(mounts), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)


def remove_tree(path: Path) -> None:
    unmount_below(path)
    shutil.rmtree(path, ignore_errors=True)


def new_entries(before: set[Path], pattern: str, dirs: list[Path]) -> list[Path]:
    return [p for d in dirs for p in d.glob(pattern) if p not in before]


class DockerDaemon:
    """A private dockerd (and the containerd it starts) for one host: own data root, exec root, socket.

    It runs inside the host's network namespace with ip forwarding, iptables and the bridge off, so it
    changes nothing in any other namespace. `stop` removes its containers, ends dockerd and containerd,
    and deletes every file it made.
    """

    def __init__(self, home: Path, netns: str | None, cgroup_parent: str, experimental: bool = True) -> None:
        self.home = home
        self.netns = netns
        self.cgroup_parent = cgroup_parent
        self.experimental = experimental
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> Path:
        return self.home / "docker.sock"

    def start(self, timeout: float = 60) -> "DockerDaemon":
        for d in ("data", "exec", "tmp"):
            (self.home / d).mkdir(parents=True, exist_ok=True)
        # containerd copies every checkpoint through its content store and its TMPDIR: both tmpfs. dockerd
        # bind-mounts its data root onto itself unless it is a mount point already, which would hide the
        # tmpfs below it: so it is made one first.
        if not os.path.ismount(self.home / "data"):
            _mount(str(self.home / "data"), self.home / "data", None, MS_BIND, None)
        for d in DOCKER_VOLATILE:
            mount_tmpfs(self.home / d)
        (self.home / "daemon.json").write_text("{}\n")  # never the machine's /etc/docker/daemon.json
        argv = [
            "dockerd", "--config-file", str(self.home / "daemon.json"),
            "--data-root", str(self.home / "data"), "--exec-root", str(self.home / "exec"),
            "-H", f"unix://{self.socket}", "--pidfile", str(self.home / "docker.pid"),
            "--ip-forward=false", "--iptables=false", "--ip6tables=false", "--bridge=none",
            "--userland-proxy=false", "--exec-opt", "native.cgroupdriver=cgroupfs",
            "--cgroup-parent", self.cgroup_parent, "--log-level", "warn",
        ]  # fmt: skip
        if self.experimental:
            argv.append("--experimental")
        if self.netns:
            argv = ["nsenter", f"--net=/run/netns/{self.netns}", "--", *argv]
        # containerd's temporary checkpoint copies (ctrd-checkpoint*) land here, not in the shared /tmp.
        env = {**os.environ, "TMPDIR": str(self.home / "tmp")}
        with open(self.home / "dockerd.log", "wb") as log:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, preexec_fn=_die_with_parent
            )
        deadline = time.monotonic() + timeout
        while True:
            ping = subprocess.run(
                ["/usr/bin/docker", "-H", f"unix://{self.socket}", "version", "--format", "{{.Server.Version}}"],
                capture_output=True,
                check=False,
            )
            if ping.returncode == 0:
                return self
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = (self.home / "dockerd.log").read_text(errors="replace")[-400:]
                self.stop()
                raise SkyferryError(f"dockerd for {self.home} did not start: {tail}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            docker = ["/usr/bin/docker", "-H", f"unix://{self.socket}"]
            ids = subprocess.run([*docker, "ps", "-aq"], capture_output=True, text=True, check=False).stdout.split()
            if ids:
                subprocess.run([*docker, "rm", "-f", *ids], capture_output=True, check=False)
            containerd = _child_pids(self.proc.pid)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            for pid in containerd:  # dockerd stops its containerd; make sure, by pid, never by name
                _wait_or_kill(pid)
        remove_tree(self.home)


def _die_with_parent() -> None:
    """dockerd gets SIGTERM (and stops its containerd) if whoever started it dies without `stop`."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _child_pids(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _wait_or_kill(pid: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        if Path(f"/proc/{pid}").exists():
            os.kill(pid, signal.SIGKILL)
