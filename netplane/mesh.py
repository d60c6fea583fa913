"""The mesh description: members, keys, endpoints, overlay CIDR, container homes (rows of the store).

One description drives the whole mesh; `peers()` derives every member's WireGuard peer list from it.
The local provider also records the kernel objects and pids it created (`local`, `wan`) so `hosts down`
removes exactly those.
"""

import json
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from . import store
from .errors import NetplaneError

CONTROLLER = "controller"
DEFAULT_MTU = 1420
DEFAULT_PORT = 51820
# A real machine's member: its WireGuard interface and the agent's state root (made by `skyferry join`).
MACHINE_INTERFACE = "skyferry"
MACHINE_STATE_ROOT = "/var/lib/skyferry/host"


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
    _clean: "_Rows | None" = field(default=None, init=False, compare=False, repr=False)

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

    # --- persistence: rows of the store ------------------------------------------------------------

    @classmethod
    def exists(cls, state: Path) -> bool:
        with store.transaction(state, write=False) as conn:
            return conn.execute("SELECT 1 FROM mesh WHERE id=1").fetchone() is not None

    @classmethod
    def load(cls, state: Path) -> "Mesh":
        """The mesh as one consistent snapshot of the document, its members and the homes."""
        with store.transaction(state, write=False) as conn:
            doc = conn.execute("SELECT * FROM mesh WHERE id=1").fetchone()
            if doc is None:
                raise NetplaneError(f"no mesh in {state}", hint="run skyferry hosts up --local")
            rows = conn.execute("SELECT * FROM mesh_hosts ORDER BY rowid").fetchall()
            homes = _read_homes(conn)
        members = {r["name"]: MeshHost(**{c: r[c] for c in store.HOST_COLUMNS}) for r in rows}
        if doc["controller"] not in members:
            raise NetplaneError(f"the mesh in {state} has no controller {doc['controller']!r}")
        mesh = cls(
            name=doc["name"],
            cidr=doc["cidr"],
            mtu=doc["mtu"],
            listen_port=doc["listen_port"],
            backend=doc["backend"],
            controller=members.pop(doc["controller"]),
            hosts=members,
            homes=homes,
            local=Local(**json.loads(doc["local"])) if doc["local"] else None,
            wan=Wan(**json.loads(doc["wan"])) if doc["wan"] else None,
        )
        mesh._mark_clean(Path(state))
        return mesh

    def save(self, state: Path) -> None:
        """Upsert the rows that differ from what this object last loaded or saved there.

        Rows it did not change are not written and rows it does not hold are not deleted, so a writer
        never undoes another's change to a different member or home (removal: remove_host, remove_home).
        """
        state = Path(state)
        clean = self._clean if self.state == state else None
        with store.transaction(state) as conn:
            if clean is None:
                other = conn.execute("SELECT name FROM mesh WHERE id=1").fetchone()
                if other and other["name"] != self.name:
                    raise NetplaneError(f"mesh {other['name']} is already recorded in {state}", hint="hosts down first")
            if clean is None or clean.doc != self._doc():
                conn.execute(UPSERT_MESH, self._doc())
            for m in self.members:
                if clean is None or clean.members.get(m.name) != m:
                    conn.execute(UPSERT_HOST, tuple(getattr(m, c) for c in store.HOST_COLUMNS))
            for ip, host in self.homes.items():
                if clean is None or clean.homes.get(ip) != host:
                    conn.execute(UPSERT_HOME, (ip, host))
        self._mark_clean(state)

    def persist(self) -> None:
        """Save to the state directory this mesh was loaded from or last saved to."""
        if self.state is not None:
            self.save(self.state)

    def remove_host(self, name: str) -> MeshHost | None:
        """Take `name` out of the mesh (its row included); returns it, or None if it was not a host."""
        if self.state is not None:
            with store.transaction(self.state) as conn:
                conn.execute("DELETE FROM mesh_hosts WHERE name=?", (name,))
            if self._clean:
                self._clean.members.pop(name, None)
        return self.hosts.pop(name, None)

    def set_home(self, ip: str, host: str, then: Callable[[str | None], None] | None = None) -> str | None:
        """Home `ip` on `host`; returns its previous home. `then(previous)` runs before the change is
        committed, with every home fresh from the store and its write lock held, so a peer-list push
        made there cannot race another writer's (it would route that writer's container back)."""
        with self._homes_transaction() as conn:
            previous = self.homes.get(ip)
            self.homes[ip] = host
            if then:
                then(previous)
            if conn:
                conn.execute(UPSERT_HOME, (ip, host))
        return previous

    def remove_home(self, ip: str, then: Callable[[str | None], None] | None = None) -> str | None:
        """Forget `ip`'s home (its row included); returns it. `then` as for set_home."""
        with self._homes_transaction() as conn:
            previous = self.homes.pop(ip, None)
            if then:
                then(previous)
            if conn:
                conn.execute("DELETE FROM mesh_homes WHERE ip=?", (ip,))
        return previous

    @classmethod
    def delete(cls, state: Path) -> None:
        """Remove the mesh from the store: its document, every member and every home."""
        with store.transaction(state) as conn:
            for table in store.MESH_TABLES:
                conn.execute(f"DELETE FROM {table}")

    @contextmanager
    def _homes_transaction(self) -> Iterator[sqlite3.Connection | None]:
        if self.state is None:  # a mesh never saved: nothing to share with other writers
            yield None
            return
        with store.transaction(self.state) as conn:
            self.homes = _read_homes(conn)
            yield conn
        if self._clean:
            self._clean.homes = dict(self.homes)

    def _doc(self) -> tuple[Any, ...]:
        return (
            self.name, self.cidr, self.mtu, self.listen_port, self.backend, self.controller.name,
            json.dumps(asdict(self.local)) if self.local else None,
            json.dumps(asdict(self.wan), sort_keys=True) if self.wan else None,
        )  # fmt: skip

    def _mark_clean(self, state: Path) -> None:
        self.state = state
        self._clean = _Rows(self._doc(), {m.name: replace(m) for m in self.members}, dict(self.homes))


@dataclass
class _Rows:
    """What the store held for a Mesh when it last loaded or saved it: save writes only what differs."""

    doc: tuple[Any, ...]
    members: dict[str, MeshHost]
    homes: dict[str, str]


def _read_homes(conn: sqlite3.Connection) -> dict[str, str]:
    return {r["ip"]: r["host"] for r in conn.execute("SELECT ip, host FROM mesh_homes ORDER BY rowid")}


UPSERT_MESH = (
    "INSERT INTO mesh (id, name, cidr, mtu, listen_port, backend, controller, local, wan) VALUES (1,?,?,?,?,?,?,?,?)"
    " ON CONFLICT(id) DO UPDATE SET name=excluded.name, cidr=excluded.cidr, mtu=excluded.mtu,"
    " listen_port=excluded.listen_port, backend=excluded.backend, controller=excluded.controller,"
    " local=excluded.local, wan=excluded.wan"
)
UPSERT_HOST = (
    store.INSERT_HOST
    + " ON CONFLICT(name) DO UPDATE SET "
    + ", ".join(f"{c}=excluded.{c}" for c in store.HOST_COLUMNS[1:])
)
UPSERT_HOME = "INSERT INTO mesh_homes (ip, host) VALUES (?,?) ON CONFLICT(ip) DO UPDATE SET host=excluded.host"
