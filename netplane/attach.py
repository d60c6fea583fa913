"""Container attachment: a netns whose `eth0` holds the container's overlay /32 behind a host-side veth.

Inside: `eth0` with ip/32 and `default dev eth0` (link scope, so no gateway address is needed).
Host side: proxy ARP answers the container's ARP for every destination, and a /32 route sends the
container's address down the veth. All calls are idempotent.
"""

import errno
import hashlib
import ipaddress

from pyroute2 import IPRoute, NetlinkError

from . import netns
from .errors import NetplaneError
from .mesh import DEFAULT_MTU

CONTAINER_IF = "eth0"


def host_ifname(netns_name: str) -> str:
    """The host end's name: derived from the container netns name, unique per host, 14 characters."""
    return "ve" + hashlib.blake2s(netns_name.encode(), digest_size=6).hexdigest()


def _ipr(netns_name: str | None) -> IPRoute:
    return IPRoute(netns=netns_name) if netns_name else IPRoute()


def _check_ip(ip: str) -> str:
    try:
        return str(ipaddress.IPv4Address(ip))
    except ValueError:
        raise NetplaneError(f"{ip!r} is not an IPv4 address") from None


def _link(ipr: IPRoute, ifname: str) -> int | None:
    found = ipr.link_lookup(ifname=ifname)
    return found[0] if found else None


def attach(
    netns_name: str, ip: str, *, host_netns: str | None = None, route: bool = True, mtu: int = DEFAULT_MTU
) -> None:
    """Give netns `netns_name` (created if missing) eth0 with `ip`/32, wired to `host_netns`."""
    ip = _check_ip(ip)
    host_if = host_ifname(netns_name)
    netns.create(netns_name)
    with _ipr(host_netns) as host, IPRoute(netns=netns_name) as cont:
        host_idx = _link(host, host_if)
        if host_idx is None:
            if _link(cont, CONTAINER_IF) is not None:
                raise NetplaneError(
                    f"{netns_name} already has an {CONTAINER_IF} whose peer is not in "
                    f"{host_netns or 'this network namespace'}",
                    hint=f"detach it from its current host first (attach.detach({netns_name!r}, ...))",
                )
            host.link(
                "add", ifname=host_if, kind="veth", mtu=mtu,
                peer={"ifname": CONTAINER_IF, "net_ns_fd": netns_name, "mtu": mtu},
            )  # fmt: skip
            host_idx = _link(host, host_if)
        netns.sysctl(host_netns, f"net/ipv4/conf/{host_if}/proxy_arp", "1")
        # Proxy ARP answers after a random delay of up to proxy_delay (0.8 s by default). A restored
        # container resolves its peers afresh on the target, so that delay would add to the freeze.
        netns.sysctl(host_netns, f"net/ipv4/neigh/{host_if}/proxy_delay", "0")
        netns.sysctl(host_netns, "net/ipv4/ip_forward", "1")
        host.link("set", index=host_idx, mtu=mtu, state="up")

        cont_idx = _link(cont, CONTAINER_IF)
        cont.link("set", index=_link(cont, "lo"), state="up")
        cont.link("set", index=cont_idx, mtu=mtu, state="up")
        held = {a.get("IFA_ADDRESS") for a in cont.get_addr(index=cont_idx, family=2)}
        if ip not in held:
            cont.addr("add", index=cont_idx, address=ip, prefixlen=32)
        cont.route("replace", dst="0.0.0.0/0", oif=cont_idx, scope="link")
        if route:
            host.route("replace", dst=f"{ip}/32", oif=host_idx)


def set_route(netns_name: str, ip: str, present: bool, *, host_netns: str | None = None) -> None:
    """Add or remove the host-side /32 route to the container in `netns_name`."""
    ip = _check_ip(ip)
    host_if = host_ifname(netns_name)
    with _ipr(host_netns) as host:
        idx = _link(host, host_if)
        if present:
            if idx is None:
                raise NetplaneError(
                    f"container netns {netns_name} is not attached in {host_netns or 'this network namespace'}",
                    hint="attach.attach() it first",
                )
            host.route("replace", dst=f"{ip}/32", oif=idx)
        elif idx is not None:
            try:
                host.route("del", dst=f"{ip}/32", oif=idx)
            except NetlinkError as exc:
                if exc.code != errno.ESRCH:
                    raise


def detach(netns_name: str, *, host_netns: str | None = None) -> None:
    """Remove the veth (and with it the /32 route) and the container netns. Safe to repeat."""
    host_if = host_ifname(netns_name)
    if host_netns is None or netns.exists(host_netns):
        with _ipr(host_netns) as host:
            idx = _link(host, host_if)
            if idx is not None:
                host.link("del", index=idx)
    netns.remove(netns_name)
