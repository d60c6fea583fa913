"""The narrow protocol every provider implements, in the spirit of libcloud's NodeDriver."""

import builtins
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

WIREGUARD_PORT = 51820


@dataclass(frozen=True)
class Host:
    """A machine a provider made for a plan. `address` is what WireGuard peers use as endpoint."""

    name: str
    provider: str
    plan: str
    id: str
    address: str | None
    private_address: str | None = None
    state: str = "pending"  # pending | running | terminated
    region: str | None = None
    size: str | None = None
    tags: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Provider(Protocol):
    """Provision, list, wait for and destroy hosts. Every call is idempotent per plan."""

    name: str

    def provision(
        self,
        plan: str,
        count: int,
        size: str | None = None,
        region: str | None = None,
        image: str | None = None,
        user_data: str | None = None,
    ) -> list[Host]:
        """Ensure `count` hosts tagged with `plan` exist; returns them, creating only what is missing."""
        ...

    def list(self, plan: str | None = None) -> list[Host]: ...

    def wait_ready(self, hosts: builtins.list[Host], timeout: float = 600.0) -> builtins.list[Host]: ...

    def destroy(self, plan: str) -> builtins.list[str]:
        """Remove every resource tagged with `plan`; returns the ids removed. Safe to run twice."""
        ...

    def open_wireguard_port(self, plan: str, port: int = WIREGUARD_PORT) -> None: ...
