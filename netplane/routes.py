"""Which host a container /32 lives on, as every member's WireGuard peer list (allowed-ips) says.

The controller computes each member's peer list from the mesh description and hands it to a `Push`: the
member's own agent applies it there (`configure`, the only place that runs `wg set`). The controller's
own interface is the one it configures itself. Nothing here reaches into another machine.
"""

import ipaddress
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from pydantic import BaseModel, Field

from . import wg
from .errors import NetplaneError
from .mesh import Mesh, MeshHost

KEEPALIVE = 25  # seconds; keeps every pair's session up, so a cutover never waits for a handshake
_KEY = r"^[A-Za-z0-9+/]{42}[AEIMQUYcgkosw480]=$"  # base64 of 32 bytes


class PeerConfig(BaseModel):
    """One WireGuard peer as a member should have it: what a route push carries."""

    public_key: str = Field(pattern=_KEY)
    endpoint: str | None = Field(default=None, max_length=64)
    allowed_ips: list[str] = Field(max_length=4096)
    keepalive: int = Field(default=0, ge=0, le=3600)

    def args(self) -> list[str]:
        out = ["peer", self.public_key]
        if self.endpoint:
            out += ["endpoint", self.endpoint]
        out += ["allowed-ips", ",".join(self.allowed_ips), "persistent-keepalive", str(self.keepalive)]
        return out


class PeerUpdate(BaseModel):
    """A member's change: peers to set (allowed-ips replaced, atomically) and peers to remove."""

    peers: list[PeerConfig] = Field(default_factory=list, max_length=4096)
    remove: list[str] = Field(default_factory=list, max_length=4096)


Push = Callable[[MeshHost, PeerUpdate], None]


class PushFailed(NetplaneError):
    """Some members did not get their peer list (the others did)."""

    def __init__(self, message: str, members: list[str], hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.members = members


def configure(netns: str | None, interface: str, update: PeerUpdate) -> None:
    """Apply `update` to WireGuard interface `interface` of this machine (in `netns`): one `wg set`."""
    args = [a for p in update.peers for a in p.args()]
    args += [a for key in update.remove for a in ("peer", key, "remove")]
    if args:
        wg.wg(netns, "set", interface, *args)


def here(member: MeshHost, update: PeerUpdate) -> None:
    """Push to a member whose interface is on this machine: the controller's, or a namespace host the
    local provider is still building (no agent runs there yet)."""
    configure(member.netns, member.interface, update)


def desired(mesh: Mesh, member: MeshHost, only: set[str] | None = None, keepalive: bool = True) -> PeerUpdate:
    """`member`'s peers (all, or those named in `only`) as its WireGuard should have them."""
    peers = [
        PeerConfig(
            public_key=peer.public_key,
            endpoint=endpoint or None,
            allowed_ips=allowed,
            # One side per pair keeps it warm: if both initiate at once across the delayed WAN, the
            # handshakes cross, both are dropped, and the pair waits out WireGuard's 5 s retry.
            keepalive=KEEPALIVE if keepalive and member.name < peer.name else 0,
        )
        for peer, endpoint, allowed in mesh.peers(member)
        if peer.public_key and (only is None or peer.name in only)
    ]
    return PeerUpdate(peers=peers)


def apply(mesh: Mesh, push: Push, only: set[str] | None = None, keepalive: bool = True) -> None:
    """Send every member its peer list at once (one atomic `wg set` each); the controller's own interface
    is configured here, every host's through `push`. Raises after all were tried if any failed.

    Turning keepalive on starts a handshake at once; a new mesh first applies every peer list with it
    off, so no member initiates towards one that does not know it yet (that costs a 5 s retry).
    """

    def one(member: MeshHost) -> None:
        update = desired(mesh, member, only, keepalive)
        if update.peers:
            (here if member is mesh.controller else push)(member, update)

    _all(mesh.members, one)


def remove_peer(mesh: Mesh, gone: MeshHost, push: Push) -> None:
    """Take `gone` out of every remaining member's WireGuard."""
    update = PeerUpdate(remove=[gone.public_key])
    _all(
        [m for m in mesh.members if m.name != gone.name],
        lambda m: (here if m is mesh.controller else push)(m, update),
    )


def _all(members: list[MeshHost], fn: Callable[[MeshHost], None]) -> None:
    with ThreadPoolExecutor(max_workers=len(members)) as pool:
        futures = {m.name: pool.submit(fn, m) for m in members}
    failed = {name: f.exception() for name, f in futures.items() if f.exception() is not None}
    if failed:
        name, exc = next(iter(failed.items()))
        raise PushFailed(
            f"could not update the WireGuard peers of {', '.join(failed)}: {name}: {exc}",
            sorted(failed),
            hint="check that the member's agent runs (skyferry hosts ls); skyferry mesh sync repairs it",
        )


def wait_handshakes(mesh: Mesh, timeout: float = 12.0) -> None:
    """Return once every member on this machine has a session with every peer, so no first packet
    starts a handshake that crosses the keepalive's own (crossed handshakes both fail and cost a 5 s
    retry)."""
    deadline = time.monotonic() + timeout
    while True:
        pending = [
            f"{member.name}->{peer[:8]}"
            for member in mesh.members
            if member.netns is not None
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


def publish(mesh: Mesh, ip: str, host: str, push: Push) -> None:
    """Route `ip`/32 to `host` on every member (and off its previous home), and record it as its home.

    A member that cannot be reached does not stop the others, nor the record: it raises PushFailed
    afterwards, naming it (its list is stale until `mesh sync`)."""
    ip = _check(mesh, ip)
    mesh.host(host)
    failed: list[PushFailed] = []

    def push_all(previous: str | None) -> None:
        try:
            apply(mesh, push, {host} | ({previous} if previous else set()))
        except PushFailed as exc:
            failed.append(exc)

    mesh.set_home(ip, host, then=push_all)
    if failed:
        raise failed[0]


def withdraw(mesh: Mesh, ip: str, push: Push) -> None:
    """Stop routing `ip` anywhere in the mesh, and forget its home. Safe to repeat. As for publish, a
    member that cannot be reached raises PushFailed only after the others and the record are done."""
    failed: list[PushFailed] = []

    def unroute(previous: str | None) -> None:
        try:
            if previous is not None:
                apply(mesh, push, {previous})
        except PushFailed as exc:
            failed.append(exc)

    mesh.remove_home(ip, then=unroute)
    if failed:
        raise failed[0]
