"""What a runc container may do and see: Docker's defaults, written out for runc's config.json.

Docker and Podman apply their own defaults; a runc bundle gets none unless its config says so. So every
skyferry runc container gets what `docker run` gives by default: Docker's capability set (nothing more, an
empty inheritable and ambient set), a seccomp filter with the semantics of moby's default profile
(default-deny with EPERM; an allow list; no namespaces, mounts, keyrings, BPF, module loading, clock
setting or reboots for a container without CAP_SYS_ADMIN and friends), `no_new_privs`, Docker's masked
and read-only /proc paths; and a rootfs of its own with its own /etc. Host directories are bound only
where the spec names them, read-only, nosuid, nodev. CRIU dumps and restores all of it (capabilities,
the seccomp filter, no_new_privs): the parasite runs with the filter suspended (PTRACE_O_SUSPEND_SECCOMP,
which needs CAP_SYS_ADMIN and no filter on CRIU itself), and the restorer installs the filter last.
See docs/security.md, "Containers".
"""

import errno
import ipaddress
import os
import platform
import stat
import subprocess
from pathlib import Path
from typing import Any

from skyferry.pipeline.hostapi.spec import HOST_PROGRAMS

BUSYBOX = Path("/bin/busybox")  # busybox-static (scripts/bootstrap-host.sh): runs in any rootfs
LOG_IN_CONTAINER = "/.skyferry/app.log"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Docker's default capabilities (moby oci/caps): CapEff 0x00000000a80425fb for root inside.
DOCKER_CAPS = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW", "CAP_SETGID",
    "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL",
    "CAP_AUDIT_WRITE",
)  # fmt: skip

# Docker's masked and read-only paths inside /proc and /sys (what `docker run` hides without --privileged).
MASKED = (
    "/proc/asound", "/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
    "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware", "/sys/devices/virtual/powercap",
)  # fmt: skip
READONLY = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")

# --- seccomp: the syscalls a container with DOCKER_CAPS may make, as moby's default profile allows them.
# Everything else fails with EPERM. io_uring is left out, as Docker 25 and later leave it out (and CRIU 4.2
# cannot dump it). Grouped by what they are for; names a kernel or libseccomp does not
# know are skipped by runc.
_ALLOW = """
    access faccessat faccessat2 chdir fchdir getcwd chmod fchmod fchmodat chown fchown fchownat lchown
    chown32 fchown32 lchown32 creat open openat openat2 close close_range dup dup2 dup3 fcntl fcntl64 flock
    fsync fdatasync sync syncfs sync_file_range fallocate ftruncate ftruncate64 truncate truncate64 link
    linkat symlink symlinkat unlink unlinkat rename renameat renameat2 mkdir mkdirat mknod mknodat rmdir
    readlink readlinkat stat stat64 lstat lstat64 fstat fstat64 fstatat64 newfstatat statx statfs statfs64
    fstatfs fstatfs64 getdents getdents64 umask utime utimes utimensat utimensat_time64 futimesat lseek
    _llseek read readv pread64 preadv preadv2 write writev pwrite64 pwritev pwritev2 sendfile sendfile64
    splice tee vmsplice copy_file_range readahead fadvise64 fadvise64_64 name_to_handle_at

    getxattr lgetxattr fgetxattr setxattr lsetxattr fsetxattr listxattr llistxattr flistxattr removexattr
    lremovexattr fremovexattr

    inotify_init inotify_init1 inotify_add_watch inotify_rm_watch fanotify_mark epoll_create epoll_create1
    epoll_ctl epoll_ctl_old epoll_wait epoll_wait_old epoll_pwait epoll_pwait2 eventfd eventfd2 poll ppoll
    ppoll_time64 select _newselect pselect6 pselect6_time64 signalfd signalfd4 timerfd_create
    timerfd_settime timerfd_settime64 timerfd_gettime timerfd_gettime64

    io_setup io_destroy io_submit io_cancel io_getevents io_pgetevents io_pgetevents_time64

    brk mmap mmap2 munmap mremap mprotect madvise mincore mlock mlock2 mlockall munlock munlockall msync
    remap_file_pages membarrier memfd_create memfd_secret pkey_alloc pkey_free pkey_mprotect process_mrelease

    execve execveat exit exit_group fork vfork wait4 waitid waitpid kill tkill tgkill rt_sigqueueinfo
    rt_tgsigqueueinfo pidfd_open pidfd_send_signal getpid getppid gettid getpgid getpgrp setpgid getsid
    setsid getpriority setpriority ioprio_get ioprio_set prctl getrlimit setrlimit ugetrlimit prlimit64
    getrusage times sysinfo uname seccomp capget capset restart_syscall rseq set_tid_address
    set_robust_list get_robust_list set_thread_area get_thread_area futex futex_time64 futex_waitv getcpu
    ptrace process_vm_readv process_vm_writev

    getuid getuid32 geteuid geteuid32 getgid getgid32 getegid getegid32 getresuid getresuid32 getresgid
    getresgid32 getgroups getgroups32 setuid setuid32 setgid setgid32 setreuid setreuid32 setregid
    setregid32 setresuid setresuid32 setresgid setresgid32 setfsuid setfsuid32 setfsgid setfsgid32
    setgroups setgroups32

    rt_sigaction rt_sigprocmask rt_sigpending rt_sigreturn rt_sigsuspend rt_sigtimedwait
    rt_sigtimedwait_time64 sigaltstack sigprocmask sigreturn pause alarm

    clock_gettime clock_gettime64 clock_getres clock_getres_time64 clock_nanosleep clock_nanosleep_time64
    nanosleep gettimeofday time adjtimex clock_adjtime clock_adjtime64 getitimer setitimer timer_create
    timer_delete timer_getoverrun timer_gettime timer_gettime64 timer_settime timer_settime64

    sched_yield sched_getaffinity sched_setaffinity sched_getattr sched_setattr sched_getparam
    sched_setparam sched_getscheduler sched_setscheduler sched_get_priority_max sched_get_priority_min
    sched_rr_get_interval sched_rr_get_interval_time64

    socketpair bind connect listen accept accept4 getsockname getpeername getsockopt setsockopt send sendto
    sendmsg sendmmsg recv recvfrom recvmsg recvmmsg recvmmsg_time64 shutdown socketcall

    ipc msgget msgsnd msgrcv msgctl semget semop semtimedop semtimedop_time64 semctl shmget shmat shmdt
    shmctl mq_open mq_unlink mq_timedsend mq_timedsend_time64 mq_timedreceive mq_timedreceive_time64
    mq_notify mq_getsetattr pipe pipe2

    getrandom ioctl landlock_create_ruleset landlock_add_rule landlock_restrict_self
"""
ALLOWED = tuple(sorted(set(_ALLOW.split())))
# Allowed only with the capability that makes them useful, as moby's profile does.
BY_CAP = {"CAP_SYS_CHROOT": ("chroot",)}
BY_ARCH = {"x86_64": ("arch_prctl", "modify_ldt"), "aarch64": ()}
ARCHES = {
    "x86_64": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
    "aarch64": ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"],
}
# personality(2): only querying and the harmless Linux personas (PER_LINUX, PER_LINUX32, UNAME26 and
# their combination); no READ_IMPLIES_EXEC or ADDR_NO_RANDOMIZE tricks.
PERSONAS = (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF)
NAMESPACE_FLAGS = 0x7E020000  # CLONE_NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET
AF_VSOCK = 40
EPERM, ENOSYS = 1, 38


def seccomp(caps: tuple[str, ...] = DOCKER_CAPS, machine: str | None = None) -> dict[str, Any]:
    """The OCI `linux.seccomp` section for a container holding `caps` on this machine's architecture."""
    machine = machine or platform.machine()
    if machine not in ARCHES:
        raise ValueError(f"no seccomp profile for {machine}")
    names = [*ALLOWED, *BY_ARCH[machine], *(n for cap in caps for n in BY_CAP.get(cap, ()))]
    rules: list[dict[str, Any]] = [{"names": sorted(names), "action": "SCMP_ACT_ALLOW"}]
    rules += [
        {"names": ["personality"], "action": "SCMP_ACT_ALLOW", "args": [_arg(0, p, "SCMP_CMP_EQ")]} for p in PERSONAS
    ]
    rules.append({"names": ["socket"], "action": "SCMP_ACT_ALLOW", "args": [_arg(0, AF_VSOCK, "SCMP_CMP_NE")]})
    if "CAP_SYS_ADMIN" not in caps:
        # Threads and processes, never new namespaces; clone3 cannot be filtered by its flags (they sit
        # in memory), so it says ENOSYS and libc falls back to clone.
        clone = _arg(0, NAMESPACE_FLAGS, "SCMP_CMP_MASKED_EQ")
        rules.append({"names": ["clone"], "action": "SCMP_ACT_ALLOW", "args": [clone]})
        rules.append({"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": ENOSYS})
    return {"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": EPERM, "architectures": ARCHES[machine],
            "syscalls": rules}  # fmt: skip


def _arg(index: int, value: int, op: str) -> dict[str, Any]:
    # For MASKED_EQ, `value` is the mask and `valueTwo` what the masked argument must equal.
    return {"index": index, "value": value, "valueTwo": 0, "op": op}


def process(args: list[str], env: dict[str, str], uid: int, gid: int) -> dict[str, Any]:
    """The OCI `process` section: the user, Docker's capabilities (the kernel drops them at the exec of a
    non-root user, as under Docker), no_new_privs."""
    caps = list(DOCKER_CAPS)
    home = {"HOME": "/root" if uid == 0 else "/"}
    return {
        "terminal": False,
        "user": {"uid": uid, "gid": gid, "additionalGids": []},
        "args": args,
        "env": [f"{k}={v}" for k, v in {"PATH": PATH, **home, **env}.items()],
        "cwd": "/",
        "capabilities": {"bounding": caps, "effective": caps, "permitted": caps, "inheritable": [], "ambient": []},
        "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
        "noNewPrivileges": True,
    }


def prepare_rootfs(rootfs: Path, name: str, ip: str, uid: int, gid: int, host_dirs: list[str]) -> None:
    """Give a rootfs what a container needs of its own: /etc/hosts, hostname and resolv.conf (written as
    Docker writes them), /etc/passwd and group where it has none, /tmp, /root, the log its user may append
    to, and busybox's shell and tools where it has no /bin/sh and the host's /bin is not asked for.

    A rootfs comes from a user: every path written here is refused if it is a symlink, which could point
    at the host's own files."""
    for d, mode in (("etc", 0o755), ("tmp", 0o1777), ("root", 0o700), (".skyferry", 0o755)):
        path = _no_link(rootfs / d)
        path.mkdir(mode=mode, exist_ok=True)
        os.chmod(path, mode)
    etc = rootfs / "etc"
    _write(etc / "hostname", f"{name}\n")
    _write(etc / "hosts", f"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{ip}\t{name}\n")
    _write(etc / "resolv.conf", _resolv_conf())
    _write(etc / "passwd", "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n", keep=True)
    _write(etc / "group", "root:x:0:\nnogroup:x:65534:\n", keep=True)
    _own_log(rootfs / LOG_IN_CONTAINER.lstrip("/"), uid, gid)
    bin_dir = rootfs / "bin"
    if "/bin" not in host_dirs and not bin_dir.is_symlink() and not os.path.lexists(bin_dir / "sh"):
        _busybox(bin_dir)


def _own_log(path: Path, uid: int, gid: int) -> None:
    """The log, made by root and given to the command's user, who appends to it (the directory stays
    root's). A log the rootfs brought as a symlink, FIFO or hard link is left as it is: never followed,
    never chowned, and `skyferry logs` refuses to read it (hostapi/privdir.read_beneath)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o600)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO):  # a symlink; a FIFO without a reader
            return
        raise
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
            os.fchown(fd, uid, gid)
    finally:
        os.close(fd)


def _no_link(path: Path) -> Path:
    if path.is_symlink():
        raise ValueError(f"the container's {path.name} is a symlink; skyferry writes there, so it must be a directory")
    return path


def _write(path: Path, text: str, keep: bool = False) -> None:
    """Write `path` anew (never through a symlink the rootfs put there); with `keep`, only if it is absent."""
    if os.path.lexists(path):
        if keep:
            return
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _resolv_conf() -> str:
    """The host's resolver settings without loopback name servers, which do not exist in the container's
    netns (as Docker filters them)."""
    lines = ["# written by skyferry from the host's resolv.conf"]
    try:
        host = Path("/etc/resolv.conf").read_text().splitlines()
    except OSError:
        host = []
    for line in host:
        words = line.split()
        if not words or words[0] not in ("nameserver", "search", "options"):
            continue
        if words[0] == "nameserver":
            try:
                if len(words) < 2 or ipaddress.ip_address(words[1].split("%")[0]).is_loopback:
                    continue
            except ValueError:
                continue
        lines.append(" ".join(words))
    return "\n".join(lines) + "\n"


def _busybox(bin_dir: Path) -> None:
    """Static busybox and a link per applet: a shell and the usual tools, nothing of the host's."""
    if not BUSYBOX.is_file():
        raise FileNotFoundError(f"{BUSYBOX} is missing (apt-get install busybox-static)")
    bin_dir.mkdir(parents=True, exist_ok=True)
    target = bin_dir / "busybox"
    if not os.path.lexists(target):
        target.write_bytes(BUSYBOX.read_bytes())
        target.chmod(0o755)
    applets = subprocess.run([str(BUSYBOX), "--list"], capture_output=True, text=True, check=True).stdout.split()
    for applet in applets:
        link = bin_dir / applet
        if applet != "busybox" and "/" not in applet and not os.path.lexists(link):
            link.symlink_to("busybox")


def host_dir_mounts(rootfs: Path, host_dirs: list[str]) -> list[dict[str, Any]]:
    """Read-only, nosuid, nodev binds of the host directories the spec names. A host path that is a
    symlink (merged /usr: /lib -> usr/lib) stays a symlink in the rootfs, because CRIU cannot move a mount
    whose source is a symlink."""
    mounts = []
    for d in host_dirs:
        target = rootfs / d.lstrip("/")
        if os.path.islink(d):
            if not target.is_symlink():
                if os.path.lexists(target):
                    continue  # the rootfs has its own
                target.parent.mkdir(parents=True, exist_ok=True)
                target.symlink_to(os.readlink(d))
        elif os.path.isdir(d):
            target.mkdir(parents=True, exist_ok=True)
            options = ["rbind", "ro", "nosuid", "nodev"]
            mounts.append({"destination": d, "type": "bind", "source": d, "options": options})
        elif d not in HOST_PROGRAMS:  # of those, each host has what its layout has
            raise FileNotFoundError(f"host directory {d} does not exist on this host")
    return mounts
