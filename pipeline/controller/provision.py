"""Hosts from clouds joining and leaving the mesh: what `skyferry provision` and `decommission` do, and
what a cloud-exit plan's provisioning step calls.

A cloud host joins the mesh in the controller's state: the controller gives it a WireGuard key, an
overlay address and a TLS identity in its cloud-init user-data, and records it in the mesh once it has
an address. docs/providers.md explains the choices.
"""

import re
import tempfile
from pathlib import Path
from typing import Any

from skyferry.netplane.ipam import Ipam
from skyferry.netplane.mesh import Mesh
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.hostapi import pki
from skyferry.providers import inventory
from skyferry.providers.cloudinit import HostBootstrap, Peer, new_wireguard_key, render_user_data
from skyferry.providers.registry import NAMES, get_provider

DEFAULT_PLAN = "skyferry"
DEFAULT_PLANS = {"vm": "vm"}  # VM hosts are vm-1, vm-2, …


def _cloud(provider: str, state: Path, region: str | None, endpoint_url: str | None) -> Any:
    if provider not in NAMES:
        raise SkyferryError(f"unknown provider {provider!r}", hint=f"use one of: {', '.join(NAMES)}")
    if provider == "aws":
        return get_provider("aws", region=region, endpoint_url=endpoint_url, key_dir=state / "keys")
    if provider == "vm":  # QEMU on this machine, on the local mesh's underlay
        return get_provider("vm", state=state)
    return get_provider("gcp", region=region, endpoint_url=endpoint_url, cache_dir=state / "cache")


class Bootstrapper:
    """Renders each new host's user-data: a fresh WireGuard key, an overlay address, a TLS identity and
    the mesh's members as peers. Remembers what it handed out so the CLI can record or release it."""

    def __init__(self, state: Path, mesh: Mesh) -> None:
        self.state, self.mesh = state, mesh
        self.keys: dict[str, str] = {}  # host name -> WireGuard public key
        self.addresses: dict[str, str] = {}

    def __call__(self, name: str) -> str:
        private, public = new_wireguard_key()
        ip = Ipam(self.state).allocate(f"host:{name}")
        self.keys[name], self.addresses[name] = public, ip
        ca = self.state / "ca"
        pki.ensure_ca(ca, self.mesh.name)
        with tempfile.TemporaryDirectory(prefix="skyferry-tls-") as tmp:
            ident = pki.issue(ca, Path(tmp), name, [ip])
            ca_pem, cert_pem, key_pem = (p.read_text() for p in (ident.ca, ident.cert, ident.key))
        peers = [
            Peer(m.public_key, m.endpoint, self.mesh.allowed_ips(m))
            for m in self.mesh.members
            if m.public_key and m.name != name
        ]
        return render_user_data(
            HostBootstrap(
                name=name, mesh=self.mesh.name, overlay_ip=ip, private_key=private, peers=peers,
                listen_port=self.mesh.listen_port, mtu=self.mesh.mtu,
                ca_pem=ca_pem, cert_pem=cert_pem, key_pem=key_pem,
            )
        )  # fmt: skip

    def release(self) -> None:
        ipam = Ipam(self.state)
        for ip in self.addresses.values():
            ipam.release(ip)


def provision(
    state: Path,
    provider: str,
    count: int,
    plan: str | None = None,
    size: str | None = None,
    region: str | None = None,
    image: str | None = None,
    endpoint_url: str | None = None,
    timeout: float = 600,
) -> dict[str, Any]:
    """Make sure `plan` has `count` hosts on `provider`, bootstrapped into mesh members. Idempotent: a
    second run creates only what is missing; a failed run removes what it created."""
    if provider == "local":
        hosts = get_provider("local", state=state).provision(plan or "", count)
        result = [h.to_dict() for h in hosts]
    else:
        plan = plan or DEFAULT_PLANS.get(provider, DEFAULT_PLAN)
        mesh = Mesh.load(state)  # a clear NetplaneError when there is none
        cloud = _cloud(provider, state, region, endpoint_url)
        boot = Bootstrapper(state, mesh)
        try:
            hosts = cloud.provision(plan, count, size=size, image=image, user_data=boot)
            hosts = cloud.wait_ready(hosts, timeout=timeout)
            new = [inventory.Member(h, boot.keys[h.name], mesh.listen_port) for h in hosts if h.name in boot.keys]
            inventory.join(state, new)
        except BaseException:
            boot.release()
            raise
        overlay = {name: m.overlay_ip for name, m in Mesh.load(state).hosts.items()}
        result = [{**h.to_dict(), "overlay_ip": overlay.get(h.name)} for h in hosts]
    return {"plan": plan, "provider": provider, "hosts": result}


def decommission(
    state: Path, plan: str, provider: str | None = None, region: str | None = None, endpoint_url: str | None = None
) -> dict[str, Any]:
    """Remove everything `plan` made and take its hosts out of the mesh; safe to run twice."""
    mine = re.compile(rf"{re.escape(plan)}-\d+")
    if provider is None:
        mesh = Mesh.load(state) if Mesh.exists(state) else None
        found = {m.provider for n, m in (mesh.hosts.items() if mesh else []) if mine.fullmatch(n)}
        if len(found) != 1:
            raise SkyferryError(f"cannot tell which provider plan {plan!r} is on", hint="pass --provider")
        provider = found.pop()
    if provider == "local":
        removed = get_provider("local", state=state).destroy(plan)
        left: list[str] = []
    else:
        cloud = _cloud(provider, state, region, endpoint_url)
        names = [h.name for h in cloud.list(plan)]
        removed = cloud.destroy(plan)
        mesh = Mesh.load(state) if Mesh.exists(state) else None
        strays = [n for n, m in (mesh.hosts.items() if mesh else []) if mine.fullmatch(n) and m.provider == provider]
        left = inventory.leave(state, sorted(set(names) | set(strays)))
    return {"plan": plan, "provider": provider, "removed": removed, "left_mesh": left}
