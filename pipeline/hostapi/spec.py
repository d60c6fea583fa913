"""What a container is, as the controller and every agent agree: it moves with the container.

The spec is validated wherever it is made or read (a pydantic dataclass): an agent refuses a malformed
one with a 400 before anything acts on it. Names become kernel objects and paths (netns, bundles), so a
name is a closed alphabet, never `..` or a slash.
"""

import ipaddress
import json
import os
import pathlib
import posixpath
import re
from dataclasses import asdict, field
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, StringConstraints
from pydantic.dataclasses import dataclass

CLONE_SUFFIX = ".test"  # container names cannot contain a dot, so a test cutover's clone never collides
# What `--host-programs` binds read-only, so host programs such as python3 run inside: the host's /usr
# and the merged-/usr links beside it. Never /etc: it holds the host's secrets (docs/security.md).
HOST_PROGRAMS = ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin")
# Kernel file systems every container gets its own of; a host bind over them would hand it the host's.
NO_HOST_BIND = ("/proc", "/sys", "/dev")
MAX_ID = 2**32 - 2  # (uid_t)-1 means "no change" to the kernel
NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,39}")  # a container's name, as users give it
IMPORTS = "imports"  # in a host's state root: the one place `run` reads a rootfs or image from
SPEC_NAME = re.compile(f"{NAME.pattern}(?:{re.escape(CLONE_SUFFIX)})?")  # ... or a test cutover's clone


def _ipv4(text: str) -> str:
    ipaddress.IPv4Address(text)  # ValueError names the bad address
    return text


def _absolute(path: str) -> str:
    if not path.startswith("/") or "\0" in path or ".." in path.split("/"):
        raise ValueError(f"{path!r} is not an absolute path without '..'")
    return path


def check_host_dirs(paths: list[str]) -> list[str]:
    """Host directories to bind read-only: absolute, normalised, distinct, and neither / nor a kernel file
    system (/proc, /sys, /dev) nor anything below one."""
    for path in paths:
        if not path.startswith("/") or posixpath.normpath(path) != path:
            raise ValueError(f"bad host directory {path!r}: an absolute, normalised path such as /usr")
        if path == "/" or any(path == d or path.startswith(d + "/") for d in NO_HOST_BIND):
            raise ValueError(f"host directory {path!r} cannot be bound into a container")
    if len(set(paths)) != len(paths):
        raise ValueError("the same host directory was given twice")
    return paths


ContainerName = Annotated[str, StringConstraints(pattern=f"^{SPEC_NAME.pattern}$")]
Path = Annotated[str, StringConstraints(max_length=4096), AfterValidator(_absolute)]
Text = Annotated[str, StringConstraints(max_length=1 << 16)]
Id = Annotated[int, Field(strict=True, ge=0, le=MAX_ID)]


@dataclass
class ContainerSpec:
    """What a container is, independent of the host it runs on; moves with it."""

    name: ContainerName
    args: Annotated[list[Text], Field(min_length=1, max_length=4096)]
    ip: Annotated[str, AfterValidator(_ipv4)]
    env: dict[Annotated[str, StringConstraints(pattern=r"^[^=\x00]{1,256}$")], Text] = field(default_factory=dict)
    rootfs: Path | None = None  # a directory copied into the bundle at `run`
    image: Path | None = None  # an OCI or `docker save` tarball unpacked at `run`
    runtime: Annotated[str, StringConstraints(pattern=r"^[a-z]{1,16}$")] = "runc"  # pipeline/runtimes/protocol.py
    volumes: list[Path] = field(default_factory=list)  # paths in the container backed by volumes that move with it
    # volume path -> a directory in the host's imports whose content the volume starts with (`-v SRC:PATH`)
    seeds: dict[Path, Path] = field(default_factory=dict)
    labels: dict[Text, Text] = field(default_factory=dict)  # operator metadata: priority, ingress (docs/runbooks.md)
    uid: Id = 0  # the user the command runs as (`--user UID[:GID]`); root inside by default
    gid: Id = 0
    # host directories bound read-only at the same path (runc; --host-programs, --host-dir)
    host_dirs: Annotated[list[Path], AfterValidator(check_host_dirs)] = field(default_factory=list)
    seccomp: Literal["default", "unconfined"] = "default"  # Docker's default profile, or none

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ContainerSpec":
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})

    def save(self, path: pathlib.Path) -> None:
        """Write it to `path` whole or not at all: an agent lists its containers (a migration's check) while
        it makes other bundles (an evacuation's prepares), and a half-written file failed that check."""
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: pathlib.Path) -> "ContainerSpec":
        return cls.from_dict(json.loads(path.read_text()))


def parse_user(text: str) -> tuple[int, int]:
    """`--user UID[:GID]` -> (uid, gid). Numeric only: a rootfs's passwd is not the host's. Without a
    GID the group is the UID's number, never root's group 0 (where Docker would fall back to it)."""
    uid, sep, gid = text.partition(":")
    try:
        ids = int(uid), int(gid) if sep else int(uid)
    except ValueError:
        raise ValueError(f"--user {text!r} is not UID[:GID] (numbers)") from None
    if not all(0 <= n <= MAX_ID for n in ids):
        raise ValueError(f"--user {text!r}: UID[:GID] from 0 to {MAX_ID}")
    return ids


def clone_name(name: str) -> str:
    """The name of a test cutover's clone of container `name`."""
    return name + CLONE_SUFFIX
