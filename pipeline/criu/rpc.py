"""A small typed wrapper over pycriu's RPC, with CRIU run as `criu swrk` (one CRIU process per call).

    criu = Criu()                                   # SKYFERRY_CRIU, else `criu` on PATH
    criu.version()                                  # "4.2.1"
    criu.feature_check()                            # {"mem_track": False, "lazy_pages": True, ...}
    ext = external_netns("/run/netns/sf12-web")     # "net[4026532xyz]:extnet"
    criu.dump(pid, img, tcp_established=True, external=[ext])
    with open_netns("/run/netns/sf12-web") as fd:
        new_pid = criu.restore(img, tcp_established=True, inherit_fds={EXTNET: fd})

Why swrk and not the CRIU service: only swrk accepts `inherit_fd`, which restoring into an existing
(external) network namespace needs. CRIU inherits our file descriptors across the fork/exec, so
every fd passed by number (images dir, work dir, inherit_fd) is made inheritable for the call.

Every failure becomes a SkyferryError whose hint is the tail of CRIU's log file, which is kept in
the work dir (the images dir when no work dir is given).
"""

import errno
import os
import re
import shutil
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pycriu
import pycriu.rpc_pb2 as rpc
from skyferry.pipeline.errors import SkyferryError

NetworkLock = Literal["iptables", "nftables", "skip"]
CgroupMode = Literal["ignore", "none", "props", "soft", "full", "strict", "default"]

#: The key that names an external network namespace in `external` (dump) and `inherit_fds` (restore).
EXTNET = "extnet"

#: Pre-copy methods; which one runs depends on soft-dirty memory tracking (see `precopy_method`).
PRECOPY_CRIU = "criu iterative pre-dump"
PRECOPY_CONTENT = "content-based pre-copy"

MIN_VERSION = (4, 2)
_LOCKS = {"iptables": rpc.IPTABLES, "nftables": rpc.NFTABLES, "skip": rpc.SKIP}
_CG_MODES = {
    "ignore": rpc.IGNORE,
    "none": rpc.CG_NONE,
    "props": rpc.PROPS,
    "soft": rpc.SOFT,
    "full": rpc.FULL,
    "strict": rpc.STRICT,
    "default": rpc.DEFAULT,
}
_HINT_LINES = 4
_HARMLESS = "RLIMIT_NOFILE"
_TIMESTAMP = re.compile(r"^\(\d+\.\d+\)\s*")
_PID_BUSY = re.compile(r"Can't fork for \d+: " + re.escape(os.strerror(errno.EEXIST)))


@dataclass(frozen=True)
class PageServer:
    """Where dump sends pages (`criu page-server` or `criu lazy-pages --page-server` listens there)."""

    address: str
    port: int


def find_binary() -> str:
    """The CRIU binary: $SKYFERRY_CRIU, else `criu` on PATH (scripts/bootstrap-host.sh puts 4.2.1 in
    /usr/local/sbin, ahead of any distro copy)."""
    path = os.environ.get("SKYFERRY_CRIU") or shutil.which("criu")
    if not path or not os.access(path, os.X_OK):
        raise SkyferryError("CRIU is not installed", hint="run `make host` (scripts/bootstrap-host.sh) as root")
    return path


def external_netns(netns_path: str | os.PathLike[str], key: str = EXTNET) -> str:
    """The dump-side `external` entry that marks a network namespace as external: `net[<inode>]:<key>`."""
    return f"net[{os.stat(netns_path).st_ino}]:{key}"


@contextmanager
def open_netns(netns_path: str | os.PathLike[str]) -> Iterator[int]:
    """An fd of a network namespace, for `restore(inherit_fds={EXTNET: fd})`; closed on exit."""
    fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


def precopy_method(features: Mapping[str, bool]) -> str:
    """Which pre-copy the pipeline runs: CRIU's own iterative pre-dump needs soft-dirty tracking."""
    return PRECOPY_CRIU if features.get("mem_track") else PRECOPY_CONTENT


def log_errors(log: Path) -> list[str]:
    """The error lines of a CRIU log without their timestamps, minus the harmless RLIMIT_NOFILE ones
    (root here lacks CAP_SYS_RESOURCE, which CRIU reports and then works around)."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [_TIMESTAMP.sub("", line).strip() for line in lines if "Error (" in line and _HARMLESS not in line]


def log_tail(log: Path, lines: int = _HINT_LINES) -> str:
    """The last error lines of a CRIU log (its last lines when none is an error) as one line."""
    tail = log_errors(log)[-lines:]
    if not tail:
        try:
            tail = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
            tail = tail[-lines:]
        except OSError:
            return f"no CRIU log at {log}"
    return " | ".join(tail) + f" (full log: {log})"


class Criu:
    """One CRIU binary, driven through pycriu's RPC in swrk mode. Methods are safe to call repeatedly."""

    def __init__(self, binary: str | None = None) -> None:
        self.binary = binary or find_binary()

    # --- capability queries ---

    def version(self) -> str:
        """CRIU's version as "major.minor[.sublevel]", e.g. "4.2.1"."""
        resp = self._call(rpc.criu_req(type=rpc.VERSION), "version")
        v = resp.version
        parts = [v.major_number, v.minor_number] + ([v.sublevel] if v.HasField("sublevel") else [])
        return ".".join(map(str, parts))

    def check(self) -> None:
        """`criu check`: raises SkyferryError when the kernel lacks what CRIU needs."""
        self._call(rpc.criu_req(type=rpc.CHECK, opts=rpc.criu_opts(images_dir_fd=-1)), "check")

    def feature_check(self) -> dict[str, bool]:
        """The optional kernel features pycriu can ask about: mem_track (soft-dirty, needed for
        iterative pre-dump), lazy_pages (userfaultfd, post-copy restore) and pidfd_store."""
        req = rpc.criu_req(type=rpc.FEATURE_CHECK)
        names = [f.name for f in rpc.criu_features.DESCRIPTOR.fields]
        for name in names:
            setattr(req.features, name, True)
        resp = self._call(req, "feature check")
        return {name: bool(getattr(resp.features, name)) for name in names}

    # --- checkpoint and restore ---

    def dump(
        self,
        pid: int,
        images_dir: str | os.PathLike[str],
        *,
        work_dir: str | os.PathLike[str] | None = None,
        log_file: str = "dump.log",
        log_level: int = 4,
        leave_running: bool = False,
        tcp_established: bool = False,
        external: Iterable[str] = (),
        network_lock: NetworkLock = "iptables",
        parent_image: str | None = None,
        track_mem: bool = False,
        lazy_pages: bool = False,
        page_server: PageServer | None = None,
        status_fd: int | None = None,
        manage_cgroups: CgroupMode | None = None,
        cgroup_root: str | None = None,
        root: str | None = None,
        shell_job: bool = False,
        ext_unix_sk: bool = False,
        file_locks: bool = False,
    ) -> None:
        """Checkpoint the process tree rooted at `pid` into `images_dir`; kills it unless `leave_running`.

        `external` entries like `external_netns(path)` leave namespaces to be re-attached on restore.
        `parent_image` is the previous round's dir relative to `images_dir` (e.g. "../pre1"); pages
        unchanged since then are referenced instead of written. CRIU accepts only a parent made with
        memory tracking (`pre_dump`, or `dump(track_mem=True)`), which needs soft-dirty.
        With `lazy_pages` and `page_server`, memory is left to be pulled by the target's
        `criu lazy-pages` daemon; CRIU writes a byte to `status_fd` once the tree is frozen and the
        pages are ready to serve.
        """
        with ExitStack() as stack:
            opts = self._opts(stack, images_dir, work_dir, log_file, log_level)
            opts.pid = pid
            opts.leave_running = leave_running
            opts.track_mem = track_mem
            self._common(
                opts, tcp_established, network_lock, manage_cgroups, cgroup_root, root, shell_job,
                ext_unix_sk, file_locks, lazy_pages,
            )  # fmt: skip
            opts.external.extend(external)
            if parent_image:
                opts.parent_img = parent_image
            if page_server:
                opts.ps.address, opts.ps.port = page_server.address, page_server.port
            if status_fd is not None:
                opts.status_fd = status_fd  # CRIU reopens it through /proc/<our pid>/fd
            self._call(rpc.criu_req(type=rpc.DUMP, opts=opts), "dump", self._log(images_dir, work_dir, log_file))

    def pre_dump(
        self,
        pid: int,
        images_dir: str | os.PathLike[str],
        *,
        work_dir: str | os.PathLike[str] | None = None,
        log_file: str = "pre-dump.log",
        log_level: int = 4,
        parent_image: str | None = None,
    ) -> None:
        """One round of CRIU's iterative pre-dump (memory only, the tree keeps running). Needs
        soft-dirty tracking (`feature_check()["mem_track"]`); without it CRIU aborts."""
        with ExitStack() as stack:
            opts = self._opts(stack, images_dir, work_dir, log_file, log_level)
            opts.pid = pid
            opts.track_mem = True
            if parent_image:
                opts.parent_img = parent_image
            req = rpc.criu_req(type=rpc.PRE_DUMP, opts=opts)
            self._call(req, "pre-dump", self._log(images_dir, work_dir, log_file))

    def restore(
        self,
        images_dir: str | os.PathLike[str],
        *,
        work_dir: str | os.PathLike[str] | None = None,
        log_file: str = "restore.log",
        log_level: int = 4,
        inherit_fds: Mapping[str, int] | None = None,
        tcp_established: bool = False,
        network_lock: NetworkLock = "iptables",
        sibling: bool = False,
        lazy_pages: bool = False,
        manage_cgroups: CgroupMode | None = None,
        cgroup_root: str | None = None,
        root: str | None = None,
        shell_job: bool = False,
        ext_unix_sk: bool = False,
        file_locks: bool = False,
        pid_busy_timeout: float = 5.0,
    ) -> int:
        """Restore a tree from `images_dir`; returns the restored root's pid (the dumped one).

        `inherit_fds` maps keys used at dump (e.g. EXTNET) to open fds, e.g. from `open_netns`.
        With `sibling` the restored root becomes our child (reap it); otherwise it is reparented to
        init when CRIU exits. With `lazy_pages`, pages come from a `criu lazy-pages` daemon whose
        work dir is `work_dir`. A restore right after the dump can meet the old pid not reaped yet
        ("Can't fork for PID: File exists"); it is retried for up to `pid_busy_timeout` seconds.
        """
        deadline = time.monotonic() + pid_busy_timeout
        log = self._log(images_dir, work_dir, log_file)
        while True:
            with ExitStack() as stack:
                opts = self._opts(stack, images_dir, work_dir, log_file, log_level)
                opts.rst_sibling = sibling
                self._common(
                    opts, tcp_established, network_lock, manage_cgroups, cgroup_root, root, shell_job,
                    ext_unix_sk, file_locks, lazy_pages,
                )  # fmt: skip
                for key, fd in (inherit_fds or {}).items():
                    os.set_inheritable(fd, True)  # for criu swrk only; the caller keeps owning it
                    stack.callback(os.set_inheritable, fd, False)
                    opts.inherit_fd.add(key=key, fd=fd)
                try:
                    return self._call(rpc.criu_req(type=rpc.RESTORE, opts=opts), "restore", log).restore.pid
                except SkyferryError:
                    if not (_pid_busy(log) and time.monotonic() < deadline):
                        raise
            time.sleep(0.1)

    # --- plumbing ---

    @staticmethod
    def _opts(
        stack: ExitStack,
        images_dir: str | os.PathLike[str],
        work_dir: str | os.PathLike[str] | None,
        log_file: str,
        log_level: int,
    ) -> rpc.criu_opts:
        opts = rpc.criu_opts(images_dir_fd=_open_dir(stack, images_dir), log_file=log_file, log_level=log_level)
        if work_dir is not None:
            opts.work_dir_fd = _open_dir(stack, work_dir)
        return opts

    @staticmethod
    def _common(
        opts: rpc.criu_opts,
        tcp_established: bool,
        network_lock: NetworkLock,
        manage_cgroups: CgroupMode | None,
        cgroup_root: str | None,
        root: str | None,
        shell_job: bool,
        ext_unix_sk: bool,
        file_locks: bool,
        lazy_pages: bool,
    ) -> None:
        opts.tcp_established = tcp_established
        opts.network_lock = _LOCKS[network_lock]
        opts.shell_job = shell_job
        opts.ext_unix_sk = ext_unix_sk
        opts.file_locks = file_locks
        opts.lazy_pages = lazy_pages
        if manage_cgroups is not None:
            opts.manage_cgroups = True
            opts.manage_cgroups_mode = _CG_MODES[manage_cgroups]
        if cgroup_root:
            opts.cg_root.add(path=cgroup_root)
        if root:
            opts.root = root

    @staticmethod
    def _log(images_dir: str | os.PathLike[str], work_dir: str | os.PathLike[str] | None, log_file: str) -> Path:
        return Path(work_dir if work_dir is not None else images_dir) / log_file

    def _call(self, req: rpc.criu_req, what: str, log: Path | None = None) -> rpc.criu_resp:
        # pycriu's public methods drop CRIU's own error message (cr_errmsg) and it has none for
        # VERSION and FEATURE_CHECK, so requests go through its transport directly.
        client = pycriu.criu()
        client.use_binary(self.binary)
        try:
            resp = client._send_req_and_recv_resp(req)
        except pycriu.CRIUException as exc:
            raise SkyferryError(f"could not run {self.binary} swrk for {what}: {exc}") from exc
        if resp.success:
            return resp
        # The first real error line names the cause; later ones are CRIU unwinding.
        first = log_errors(log)[:1] if log else []
        errmsg = "" if _HARMLESS in resp.cr_errmsg else resp.cr_errmsg.strip()
        reason = (first[0] if first else errmsg) or os.strerror(resp.cr_errno or errno.EIO)
        hint = log_tail(log) if log else f"run `{self.binary} check` for details"
        raise SkyferryError(f"criu {what} failed: {reason}", hint=hint)


def _open_dir(stack: ExitStack, path: str | os.PathLike[str]) -> int:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise SkyferryError(f"cannot open directory {path}: {exc.strerror}") from exc
    stack.callback(os.close, fd)
    os.set_inheritable(fd, True)  # criu swrk is forked and exec'd from this process
    return fd


def _pid_busy(log: Path) -> bool:
    """CRIU logged `Can't fork for <pid>: File exists`: the dumped pid is not reaped yet."""
    try:
        return _PID_BUSY.search(log.read_text(errors="replace")) is not None
    except OSError:
        return False
