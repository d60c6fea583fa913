"""The mesh description (`<state>/mesh.toml`): members, keys, endpoints, overlay CIDR, container homes.

One readable file in the spirit of wg-quick drives the whole mesh; `peers()` derives every member's
WireGuard peer list from it. The local provider also records the kernel objects and pids it created
(`[local]`, `[wan]`) so `hosts down` removes exactly those.
"""

import os
import tempfile
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import tomli_w

from .errors import NetplaneError

FILE = "mesh.toml"
CONTROLLER = "controller"
DEFAULT_MTU = 1420
DEFAULT_PORT = 51820


@dataclass
class MeshHost:
    """One mesh member. `netns` is None for a real machine; `pid` is a wireguard-go we started."""

    name: str
    overlay_ip: str
    endpoint: str  # "addr:port" other members send to (unless the WAN relay sits in between)
    public_key: str
    interface: str
    netns: str | None
    state_root: str
    provider: str
    pid: int | None = None

    @property
    def endpoint_address(self) -> str:
        return self.endpoint.rsplit(":", 1)[0]


@dataclass
class Wan:
    """Emulated WAN between hosts: tbf `rate` on each host's underlay link, `rtt` added by the relay."""

    rate: str | None = None
    rtt: str | None = None
    relay_address: str | None = None
    relay_pid: int | None = None
    relay_ports: dict[str, int] = field(default_factory=dict)  # "hostA,hostB" (sorted) -> UDP port

    @staticmethod
    def pair(a: str, b: str) -> str:
        return ",".join(sorted((a, b)))


@dataclass
class Local:
    """Kernel objects of a local mesh that belong to no single member."""

    switch_netns: str
    underlay: str


@dataclass
class Mesh:
    name: str
    cidr: str
    controller: MeshHost
    hosts: dict[str, MeshHost] = field(default_factory=dict)
    homes: dict[str, str] = field(default_factory=dict)  # container ip -> host name
    mtu: int = DEFAULT_MTU
    listen_port: int = DEFAULT_PORT
    backend: str = "wireguard-go"
    local: Local | None = None
    wan: Wan | None = None
    state: Path | None = field(default=None, compare=False, repr=False)  # where load()/save() last was

    @property
    def members(self) -> list[MeshHost]:
        """Every WireGuard member: the controller first, then the hosts."""
        return [self.controller, *self.hosts.values()]

    def host(self, name: str) -> MeshHost:
        if name == self.controller.name:
            return self.controller
        if name not in self.hosts:
            known = ", ".join([*self.hosts, self.controller.name])
            raise NetplaneError(f"unknown host {name!r} in mesh {self.name}", hint=f"known hosts: {known}")
        return self.hosts[name]

    def peer_endpoint(self, member: MeshHost, peer: MeshHost) -> str:
        """Where `member` sends to reach `peer`: the WAN relay between two hosts, else the peer itself."""
        if self.wan and self.wan.relay_address:
            port = self.wan.relay_ports.get(Wan.pair(member.name, peer.name))
            if port:
                return f"{self.wan.relay_address}:{port}"
        return peer.endpoint

    def allowed_ips(self, peer: MeshHost) -> list[str]:
        """The /32s routed to `peer`: its own overlay address and every container homed on it."""
        ips = [peer.overlay_ip, *sorted(ip for ip, home in self.homes.items() if home == peer.name)]
        return [f"{ip}/32" for ip in ips]

    def peers(self, member: MeshHost) -> list[tuple[MeshHost, str, list[str]]]:
        """(peer, endpoint, allowed-ips) for every other member, as `member`'s WireGuard should have them."""
        return [(p, self.peer_endpoint(member, p), self.allowed_ips(p)) for p in self.members if p.name != member.name]

    # --- persistence -------------------------------------------------------------------------------

    @classmethod
    def path(cls, state: Path) -> Path:
        return Path(state) / FILE

    @classmethod
    def exists(cls, state: Path) -> bool:
        return cls.path(state).exists()

    @classmethod
    def load(cls, state: Path) -> "Mesh":
        path = cls.path(state)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise NetplaneError(f"no mesh in {state}", hint="run skyferry hosts up --local") from None
        except tomllib.TOMLDecodeError as exc:
            raise NetplaneError(f"{path} is not valid TOML: {exc}") from None
        try:
            mesh = cls._from_dict(data)
        except (KeyError, TypeError) as exc:
            raise NetplaneError(f"{path} is incomplete or malformed: {exc}") from None
        mesh.state = Path(state)
        return mesh

    @classmethod
    def _from_dict(cls, data: dict[str, Any]) -> "Mesh":
        def member(d: dict[str, Any]) -> MeshHost:
            return MeshHost(**{f.name: d.get(f.name) for f in fields(MeshHost)})

        return cls(
            name=data["name"],
            cidr=data["cidr"],
            mtu=data.get("mtu", DEFAULT_MTU),
            listen_port=data.get("listen_port", DEFAULT_PORT),
            backend=data.get("backend", "wireguard-go"),
            controller=member(data["controller"]),
            hosts={name: member(h) for name, h in data.get("hosts", {}).items()},
            homes=dict(data.get("homes", {})),
            local=Local(**data["local"]) if "local" in data else None,
            wan=Wan(**data["wan"]) if "wan" in data else None,
        )

    def to_dict(self) -> dict[str, Any]:
        def clean(d: dict[str, Any]) -> dict[str, Any]:  # TOML has no null
            return {k: v for k, v in d.items() if v is not None}

        data: dict[str, Any] = {
            "name": self.name,
            "cidr": self.cidr,
            "mtu": self.mtu,
            "listen_port": self.listen_port,
            "backend": self.backend,
        }
        if self.local:
            data["local"] = asdict(self.local)
        if self.wan:
            data["wan"] = clean(asdict(self.wan))
        data["controller"] = clean(asdict(self.controller))
        data["hosts"] = {name: clean(asdict(h)) for name, h in self.hosts.items()}
        data["homes"] = dict(self.homes)
        return data

    def save(self, state: Path) -> None:
        """Write mesh.toml atomically (temp file + rename), mode 0600."""
        path = self.path(state)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{FILE}.")
        try:
            with os.fdopen(fd, "wb") as f:
                tomli_w.dump(self.to_dict(), f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self.state = Path(state)

    def persist(self) -> None:
        """Save to the state directory this mesh was loaded from or last saved to."""
        if self.state is not None:
            self.save(self.state)
