"""What a container is, as the controller and every agent agree: it moves with the container.

The spec is validated wherever it is made or read (a pydantic dataclass): an agent refuses a malformed
one with a 400 before anything acts on it. Names become kernel objects and paths (netns, bundles), so a
name is a closed alphabet, never `..` or a slash.
"""

import ipaddress
import re
from dataclasses import asdict, field
from typing import Annotated, Any

from pydantic import AfterValidator, Field, StringConstraints
from pydantic.dataclasses import dataclass

# Host directories a default container sees read-only, so host programs such as python3 work inside
# (runc bind-mounts them); a volume may not shadow one.
CLONE_SUFFIX = ".test"  # container names cannot contain a dot, so a test cutover's clone never collides
HOST_DIRS = ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin", "/etc")
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


ContainerName = Annotated[str, StringConstraints(pattern=f"^{SPEC_NAME.pattern}$")]
Path = Annotated[str, StringConstraints(max_length=4096), AfterValidator(_absolute)]
Text = Annotated[str, StringConstraints(max_length=1 << 16)]


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
    labels: dict[Text, Text] = field(default_factory=dict)  # operator metadata: priority, ingress (docs/runbooks.md)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ContainerSpec":
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def clone_name(name: str) -> str:
    """The name of a test cutover's clone of container `name`."""
    return name + CLONE_SUFFIX
