"""What a container is, as the controller and every agent agree: it moves with the container."""

import posixpath
from dataclasses import asdict, dataclass, field
from typing import Any

CLONE_SUFFIX = ".test"  # container names cannot contain a dot, so a test cutover's clone never collides
# What `--host-programs` binds read-only, so host programs such as python3 run inside: the host's /usr
# and the merged-/usr links beside it. Never /etc: it holds the host's secrets (docs/security.md).
HOST_PROGRAMS = ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin")
# Kernel file systems every container gets its own of; a host bind over them would hand it the host's.
NO_HOST_BIND = ("/proc", "/sys", "/dev")
MAX_ID = 2**32 - 2  # (uid_t)-1 means "no change" to the kernel
SECCOMP = ("default", "unconfined")  # Docker's default profile, or none (`--seccomp unconfined`)


@dataclass
class ContainerSpec:
    """What a container is, independent of the host it runs on; moves with it."""

    name: str
    args: list[str]
    ip: str
    env: dict[str, str] = field(default_factory=dict)
    rootfs: str | None = None  # a directory copied into the bundle at `run`
    image: str | None = None  # an OCI or `docker save` tarball unpacked at `run`
    runtime: str = "runc"  # which adapter runs it (pipeline/runtimes/protocol.py)
    volumes: list[str] = field(default_factory=list)  # paths in the container backed by volumes that move with it
    labels: dict[str, str] = field(default_factory=dict)  # operator metadata: priority, ingress (docs/runbooks.md)
    uid: int = 0  # the user the command runs as (`--user UID[:GID]`); root inside by default
    gid: int = 0
    host_dirs: list[str] = field(default_factory=list)  # host directories bound read-only at the same path
    seccomp: str = "default"  # one of SECCOMP

    def __post_init__(self) -> None:
        check_user(self.uid, self.gid)
        self.host_dirs = check_host_dirs(self.host_dirs)
        if self.seccomp not in SECCOMP:
            raise ValueError(f"bad seccomp {self.seccomp!r}: one of {', '.join(SECCOMP)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ContainerSpec":
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def parse_user(text: str) -> tuple[int, int]:
    """`--user UID[:GID]` -> (uid, gid). Numeric only: a rootfs's passwd is not the host's. Without a
    GID the group is the UID's number, never root's group 0 (where Docker would fall back to it)."""
    uid, sep, gid = text.partition(":")
    try:
        ids = int(uid), int(gid) if sep else int(uid)
    except ValueError:
        raise ValueError(f"--user {text!r} is not UID[:GID] (numbers)") from None
    check_user(*ids)
    return ids


def check_user(uid: int, gid: int) -> None:
    for what, n in (("uid", uid), ("gid", gid)):
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_ID:
            raise ValueError(f"bad {what} {n!r}: a number from 0 to {MAX_ID}")


def check_host_dirs(paths: list[str]) -> list[str]:
    """Host directories to bind read-only: absolute, normalised, distinct, and neither / nor a kernel file
    system (/proc, /sys, /dev) nor anything below one."""
    for path in paths:
        if not isinstance(path, str) or not path.startswith("/") or posixpath.normpath(path) != path:
            raise ValueError(f"bad host directory {path!r}: an absolute, normalised path such as /usr")
        if path == "/" or any(path == d or path.startswith(d + "/") for d in NO_HOST_BIND):
            raise ValueError(f"host directory {path!r} cannot be bound into a container")
    if len(set(paths)) != len(paths):
        raise ValueError("the same host directory was given twice")
    return list(paths)


def clone_name(name: str) -> str:
    """The name of a test cutover's clone of container `name`."""
    return name + CLONE_SUFFIX
