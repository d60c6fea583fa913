"""Hosts made elsewhere (Terraform): what their cloud says about them, kept in the table `inventory_hosts`
of `<state>/skyferry.db` where `decommission`, ingress and `hosts ls` find them, joined or not.

Terraform contract: the root module has an output `skyferry_hosts`, a list of objects with name, provider,
plan, id, public_ip, private_ip, region, size and wireguard_port (terraform/modules/inventory). It holds
no key: each host makes its own and joins the mesh by itself with the one-time token in its user-data
(`skyferry inventory tfvars`, served by `skyferry mesh serve`). A host is a mesh member only once it has
joined; until then it is only a record here. `skyferry inventory import` reads the JSON of
`terraform output -json` (a file, or a directory holding it as terraform-output.json).
"""

import ipaddress
import json
import re
from contextlib import closing
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from skyferry.netplane import store
from skyferry.netplane.ipam import Ipam
from skyferry.netplane.mesh import Mesh, MeshHost

from .base import WIREGUARD_PORT, Host
from .errors import ProviderError

OUTPUT = "skyferry_hosts"
OUTPUT_FILE = "terraform-output.json"
FIELDS = ("name", "provider", "public_ip")
_NAME = re.compile(r"[a-z][a-z0-9-]{0,62}")
SCHEMA = """
CREATE TABLE IF NOT EXISTS inventory_hosts (
  name TEXT PRIMARY KEY, provider TEXT NOT NULL, plan TEXT NOT NULL, id TEXT NOT NULL, public_ip TEXT NOT NULL,
  private_ip TEXT, region TEXT, size TEXT, wireguard_port INTEGER NOT NULL
);
"""
_COLUMNS = ("name", "provider", "plan", "id", "public_ip", "private_ip", "region", "size", "wireguard_port")


@dataclass(frozen=True)
class Record:
    """A host as its cloud knows it, and the UDP port its WireGuard is reachable at."""

    host: Host
    port: int = WIREGUARD_PORT

    @property
    def endpoint(self) -> str:
        return f"{self.host.address}:{self.port}"

    def _row(self) -> tuple[Any, ...]:
        h = self.host
        return (h.name, h.provider, h.plan, h.id, h.address, h.private_address, h.region, h.size, self.port)


def read_outputs(source: Path) -> dict[str, Any]:
    """The `terraform output -json` document from a file or a directory that holds one."""
    path = source / OUTPUT_FILE if source.is_dir() else source
    if not path.exists():
        raise ProviderError(
            f"no Terraform outputs at {path}",
            hint=f"run: terraform -chdir=DIR output -json > DIR/{OUTPUT_FILE}, then import DIR or that file",
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ProviderError(
            f"{path} is not JSON: {exc}", hint="it must be the output of terraform output -json"
        ) from None
    if not isinstance(data, dict):
        raise ProviderError(f"{path} is not a terraform output -json document (expected an object)")
    return data


def parse_outputs(data: dict[str, Any], origin: str = "terraform outputs") -> list[Record]:
    """Validate the `skyferry_hosts` output; every problem names the host and field."""
    if OUTPUT not in data:
        found = ", ".join(sorted(data)) or "none"
        raise ProviderError(
            f"{origin} have no {OUTPUT!r} output (outputs: {found})",
            hint="use terraform/modules/aws-hosts or gcp-hosts and expose their skyferry_hosts output",
        )
    entry = data[OUTPUT]
    value = entry.get("value") if isinstance(entry, dict) and "value" in entry else entry
    if not isinstance(value, list):
        raise ProviderError(f"{origin}: {OUTPUT} must be a list of hosts, not {type(value).__name__}")
    records, seen = [], set()
    for i, item in enumerate(value):
        where = f"{origin}: {OUTPUT}[{i}]"
        if not isinstance(item, dict):
            raise ProviderError(f"{where} is not an object")
        missing = [f for f in FIELDS if not item.get(f)]
        if missing:
            raise ProviderError(f"{where} lacks {', '.join(missing)}")
        name = str(item["name"])
        where = f"{origin}: host {name!r}"
        if not _NAME.fullmatch(name):
            raise ProviderError(f"{where}: invalid name (lowercase letters, digits and '-')")
        if name in seen:
            raise ProviderError(f"{where} appears twice")
        seen.add(name)
        try:
            address = str(ipaddress.ip_address(item["public_ip"]))
            private = str(ipaddress.ip_address(item["private_ip"])) if item.get("private_ip") else None
        except ValueError as exc:
            raise ProviderError(f"{where}: {exc}") from None
        port = item.get("wireguard_port", WIREGUARD_PORT)
        if not isinstance(port, int) or not 0 < port < 65536:
            raise ProviderError(f"{where}: wireguard_port {port!r} is not a UDP port")
        host = Host(
            name=name,
            provider=str(item["provider"]),
            plan=str(item.get("plan") or ""),
            id=str(item.get("id") or name),
            address=address,
            private_address=private,
            state="unknown",  # Terraform's output does not say; the cloud does (`provision`, `decommission`)
            region=item.get("region"),
            size=item.get("size"),
        )
        records.append(Record(host, port))
    return records


def record(state: Path, records: list[Record]) -> list[str]:
    """Keep what the cloud says about `records` (upsert, checked against the mesh); returns the names
    added or changed. The port must be the mesh's: a joined host's WireGuard listens on no other."""
    mesh = Mesh.load(state)
    for r in records:
        name = r.host.name
        if name == mesh.controller.name:
            raise ProviderError(f"host {name!r}: the name is reserved for the controller")
        if name in mesh.hosts and mesh.hosts[name].netns:
            raise ProviderError(f"host {name!r} is already a local host of mesh {mesh.name}")
        if r.port != mesh.listen_port:
            raise ProviderError(
                f"host {name!r}: wireguard_port {r.port} is not mesh {mesh.name}'s port {mesh.listen_port}",
                hint=f"joined hosts listen on {mesh.listen_port}: set the module's wireguard_port to it",
            )
    old = recorded(state)
    changed = [r.host.name for r in records if r.host.name not in old or old[r.host.name] != r]
    marks = ",".join("?" * len(_COLUMNS))
    with closing(store.connect(state, SCHEMA)) as conn, store.immediate(conn):
        conn.executemany(
            f"INSERT OR REPLACE INTO inventory_hosts ({','.join(_COLUMNS)}) VALUES ({marks})",
            [r._row() for r in records if r.host.name in changed],
        )
    return changed


def recorded(state: Path, plan: str | None = None) -> dict[str, Record]:
    """The hosts imported so far (of `plan`, if given), by name."""
    with closing(store.connect(state, SCHEMA)) as conn:
        rows = conn.execute("SELECT * FROM inventory_hosts ORDER BY name").fetchall()
    out = {}
    for r in rows:
        if plan is None or r["plan"] == plan:
            host = Host(
                name=r["name"], provider=r["provider"], plan=r["plan"], id=r["id"], address=r["public_ip"],
                private_address=r["private_ip"], state="unknown", region=r["region"], size=r["size"],
            )  # fmt: skip
            out[r["name"]] = Record(host, r["wireguard_port"])
    return out


def forget(state: Path, names: list[str]) -> list[str]:
    """Drop the records of `names` (their machines are gone); returns those that were recorded."""
    known = recorded(state)
    gone = [n for n in names if n in known]
    with closing(store.connect(state, SCHEMA)) as conn, store.immediate(conn):
        conn.executemany("DELETE FROM inventory_hosts WHERE name=?", [(n,) for n in gone])
    return gone


def adopt(state: Path, records: list[Record]) -> dict[str, MeshHost]:
    """Bring the mesh rows of hosts that have joined in line with their records, in the fields the cloud
    owns: provider, and endpoint (public address and port). Hosts not joined yet are not touched: they
    are no members. Returns the members changed, as they were; peers of one whose endpoint moved must be
    told (routes.apply)."""
    mesh = Mesh.load(state)
    changed = {}
    for r in records:
        old = mesh.hosts.get(r.host.name)
        if old is None or old.netns:
            continue
        new = replace(old, provider=r.host.provider, endpoint=r.endpoint)
        if new != old:
            mesh.hosts[new.name] = new
            changed[new.name] = old
    if changed:
        mesh.save(state)
    return changed


def leave(state: Path, names: list[str]) -> list[str]:
    """Remove hosts from the mesh and release their overlay addresses; returns those removed. The members'
    WireGuard is the caller's to update (routes.remove_peer)."""
    if not Mesh.exists(state):
        return []
    mesh = Mesh.load(state)
    ipam = Ipam(state)
    gone = [n for n in names if n in mesh.hosts and mesh.hosts[n].netns is None]
    for name in gone:
        member = mesh.remove_host(name)
        assert member is not None
        ipam.release(member.overlay_ip)
    return gone
