"""Which host a container /32 lives on, as every member's WireGuard peer list (allowed-ips) says."""

import ipaddress
import time
from concurrent.futures import ThreadPoolExecutor

from . import wg
from .errors import NetplaneError
from .mesh import Mesh, MeshHost

KEEPALIVE = 25  # seconds; keeps every pair's session up, so a cutover never waits for a handshake


def peer_args(mesh: Mesh, member: MeshHost, only: set[str] | None = None, keepalive: bool = True) -> list[str]:
    """`wg set` arguments for `member`'s peers (all, or those named in `only`), allowed-ips replaced."""
    args: list[str] = []
    for peer, endpoint, allowed in mesh.peers(member):
        if only is None or peer.name in only:
            args += ["peer", peer.public_key, "endpoint", endpoint, "allowed-ips", ",".join(allowed)]
            # One side per pair keeps it warm: if both initiate at once across the delayed WAN, the
            # handshakes cross, both are dropped, and the pair waits out WireGuard's 5 s retry.
            args += ["persistent-keepalive", str(KEEPALIVE if keepalive and member.name < peer.name else 0)]
    return args


def apply(mesh: Mesh, only: set[str] | None = None, keepalive: bool = True) -> None:
    """Push the peer lists to every member at once: one `wg set` per member, so each switch is atomic.

    Turning keepalive on starts a handshake at once; a new mesh first applies every peer list with it
    off, so no member initiates towards one that does not know it yet (that costs a 5 s retry).
    """

    def one(member: MeshHost) -> None:
        args = peer_args(mesh, member, only, keepalive)
        if args:
            wg.wg(member.netns, "set", member.interface, *args)

    with ThreadPoolExecutor(max_workers=len(mesh.members)) as pool:
        list(pool.map(one, mesh.members))


def wait_handshakes(mesh: Mesh, timeout: float = 12.0) -> None:
    """Return once every member has a session with every peer, so no first packet starts a handshake
    that crosses the keepalive's own (crossed handshakes both fail and cost a 5 s retry)."""
    deadline = time.monotonic() + timeout
    while True:
        pending = [
            f"{member.name}->{peer[:8]}"
            for member in mesh.members
            for peer, stamp in _handshakes(member)
            if stamp == "0"
        ]
        if not pending:
            return
        if time.monotonic() > deadline:
            raise NetplaneError(
                f"WireGuard handshakes did not complete: {', '.join(pending[:4])}",
                hint="check the underlay (skyferry hosts exec HOST -- wg show)",
            )
        time.sleep(0.02)


def _handshakes(member: MeshHost) -> list[tuple[str, str]]:
    out = wg.wg(member.netns, "show", member.interface, "latest-handshakes")
    return [tuple(line.split("\t")) for line in out.splitlines() if line]  # type: ignore[misc]


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
    """Route `ip`/32 to `host` on every member (and off its previous home), and record it as its home."""
    ip = _check(mesh, ip)
    mesh.host(host)
    mesh.set_home(ip, host, then=lambda previous: apply(mesh, {host} | ({previous} if previous else set())))


def withdraw(mesh: Mesh, ip: str) -> None:
    """Stop routing `ip` anywhere in the mesh. Safe to repeat."""

    def unroute(previous: str | None) -> None:
        if previous is not None:
            apply(mesh, {previous})

    mesh.remove_home(ip, then=unroute)
