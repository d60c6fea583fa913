"""Hosts made elsewhere (Terraform) or by a provider, added to the mesh (its rows in `<state>/skyferry.db`).

Terraform contract: the root module has an output `skyferry_hosts`, a list of objects with
name, provider, plan, id, public_ip, private_ip, region, wireguard_port and wireguard_public_key
(terraform/modules/*/outputs.tf). `skyferry inventory import` reads the JSON of `terraform output -json`
(a file, or a directory holding it as terraform-output.json).
"""

import base64
import binascii
import ipaddress
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from skyferry.netplane import netns, routes
from skyferry.netplane.ipam import Ipam
from skyferry.netplane.mesh import MACHINE_INTERFACE, MACHINE_STATE_ROOT, Mesh, MeshHost

from .base import WIREGUARD_PORT, Host
from .errors import ProviderError

OUTPUT = "skyferry_hosts"
OUTPUT_FILE = "terraform-output.json"
FIELDS = ("name", "provider", "public_ip", "wireguard_public_key")
_NAME = re.compile(r"[a-z][a-z0-9-]{0,62}")


@dataclass(frozen=True)
class Member:
    """A host that should be in the mesh: where WireGuard reaches it and the key it answers with."""

    host: Host
    public_key: str
    port: int = WIREGUARD_PORT

    @property
    def endpoint(self) -> str:
        return f"{self.host.address}:{self.port}"


def check_public_key(key: str, where: str) -> str:
    try:
        raw = base64.b64decode(key, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise ProviderError(f"{where}: {key!r} is not a WireGuard public key (base64 of 32 bytes)")
    return key


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


def parse_outputs(data: dict[str, Any], origin: str = "terraform outputs") -> list[Member]:
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
    members, seen = [], set()
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
            state="running",
            region=item.get("region"),
            size=item.get("size"),
        )
        members.append(Member(host, check_public_key(str(item["wireguard_public_key"]), where), port))
    return members


def join(state: Path, members: list[Member]) -> list[str]:
    """Add or update `members` in the mesh at `state`; returns the names added or changed.

    Each gets an overlay address from IPAM (kept if it already has one). When the controller's
    WireGuard interface is up on this machine (a local mesh), it learns the new peers at once.
    """
    mesh = Mesh.load(state)
    ipam = Ipam(state)
    changed = []
    for m in members:
        if m.host.name == mesh.controller.name:
            raise ProviderError(f"host name {m.host.name!r} is reserved for the controller")
        old = mesh.hosts.get(m.host.name)
        if old and old.provider == "local":
            raise ProviderError(f"host {m.host.name!r} is already a local host of mesh {mesh.name}")
        new = MeshHost(
            name=m.host.name,
            overlay_ip=old.overlay_ip if old else ipam.allocate(f"host:{m.host.name}"),
            endpoint=m.endpoint,
            public_key=m.public_key,
            interface=MACHINE_INTERFACE,
            netns=None,
            state_root=MACHINE_STATE_ROOT,
            provider=m.host.provider,
        )
        if new != old:
            mesh.hosts[m.host.name] = new
            changed.append(m.host.name)
    if changed:
        mesh.save(state)
        _tell_controller(mesh, set(changed))
    return changed


def leave(state: Path, names: list[str]) -> list[str]:
    """Remove hosts from the mesh and release their overlay addresses; returns those removed."""
    if not Mesh.exists(state):
        return []
    mesh = Mesh.load(state)
    ipam = Ipam(state)
    gone = [n for n in names if n in mesh.hosts and mesh.hosts[n].netns is None]
    for name in gone:
        member = mesh.remove_host(name)
        assert member is not None
        ipam.release(member.overlay_ip)
        if _controller_is_here(mesh):
            routes.here(mesh.controller, routes.PeerUpdate(remove=[member.public_key]))
    return gone


def _controller_is_here(mesh: Mesh) -> bool:
    return bool(mesh.controller.netns) and netns.exists(mesh.controller.netns)


def _tell_controller(mesh: Mesh, names: set[str]) -> None:
    if _controller_is_here(mesh):
        routes.here(mesh.controller, routes.desired(mesh, mesh.controller, only=names))
