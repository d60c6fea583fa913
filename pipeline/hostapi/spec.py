"""What a container is, as the controller and every agent agree: it moves with the container."""

from dataclasses import asdict, dataclass, field
from typing import Any

# Host directories a default container sees read-only, so host programs such as python3 work inside
# (runc bind-mounts them); a volume may not shadow one.
CLONE_SUFFIX = ".test"  # container names cannot contain a dot, so a test cutover's clone never collides
HOST_DIRS = ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin", "/etc")


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ContainerSpec":
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def clone_name(name: str) -> str:
    """The name of a test cutover's clone of container `name`."""
    return name + CLONE_SUFFIX
