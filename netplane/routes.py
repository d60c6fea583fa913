"""Which host a container /32 lives on, as every member's WireGuard peer list (allowed-ips) says."""

import ipaddress
from concurrent.futures import ThreadPoolExecutor

from . import wg
from .errors import NetplaneError
from .mesh import Mesh, MeshHost

KEEPALIVE = 25  # seconds; keeps every pair's handshake fresh, so a cutover never waits for one


def peer_args(mesh: Mesh, member: MeshHost, only: set[str] | None = None) -> list[str]:
    """`wg set` arguments for `member`'s peers (all, or those named in `only`), allowed-ips replaced."""
    args: list[str] = []
    for peer, endpoint, allowed in mesh.peers(member):
        if only is None or peer.name in only:
            args += ["peer", peer.public_key, "endpoint", endpoint, "allowed-ips", ",".join(allowed)]
            args += ["persistent-keepalive", str(KEEPALIVE)]
    return args


def apply(mesh: Mesh, only: set[str] | None = None) -> None:
    """Push the peer lists to every member at once: one `wg set` per member, so each switch is atomic."""

    def one(member: MeshHost) -> None:
        args = peer_args(mesh, member, only)
        if args:
            wg.wg(member.netns, "set", member.interface, *args)

    with ThreadPoolExecutor(max_workers=len(mesh.members)) as pool:
        list(pool.map(one, mesh.members))


def _check(mesh: Mesh, ip: str) -> str:
    try:
        addr = ipaddress.IPv4Address(ip)
    except ValueError:
        raise NetplaneError(f"{ip!r} is not an IPv4 address") from None
    if addr not in ipaddress.ip_network(mesh.cidr):
        raise NetplaneError(f"{ip} is outside the mesh's overlay {mesh.cidr}")
    if any(m.overlay_ip == ip for m in mesh.members):
        raise NetplaneError(f"{ip} is a mesh member's own address, not a container's")
    return str(addr)


def publish(mesh: Mesh, ip: str, host: str) -> None:
    """Route `ip`/32 to `host` on every member (and off its previous home), and persist it in mesh.homes."""
    ip = _check(mesh, ip)
    mesh.host(host)
    previous = mesh.homes.get(ip)
    mesh.homes[ip] = host
    apply(mesh, {host} | ({previous} if previous else set()))
    mesh.persist()


def withdraw(mesh: Mesh, ip: str) -> None:
    """Stop routing `ip` anywhere in the mesh. Safe to repeat."""
    previous = mesh.homes.pop(ip, None)
    if previous is not None:
        apply(mesh, {previous})
        mesh.persist()
