"""Route cutover: move a container /32 from its source host to its target host with the fewest drops.

Order (field notes §2): the target's host route first, so packets that arrive early are delivered;
then every member's WireGuard switches the /32 to the target peer in one `wg set` each; the source's
host route goes last, so nothing in flight towards the source is blackholed before the switch.
"""

import errno
import time

from pyroute2 import IPRoute, NetlinkError

from . import routes
from .errors import NetplaneError
from .mesh import Mesh, MeshHost


def _ipr(host: MeshHost) -> IPRoute:
    return IPRoute(netns=host.netns) if host.netns else IPRoute()


def host_routes(ipr: IPRoute, ip: str) -> list[int]:
    """Output interfaces of the /32 routes for `ip` in the main table (a dump: `dst=` would do a lookup)."""
    return [
        r.get("RTA_OIF") for r in ipr.get_routes(family=2, table=254) if r["dst_len"] == 32 and r.get("RTA_DST") == ip
    ]


def cutover(mesh: Mesh, ip: str, source: str, target: str) -> float:
    """Move `ip` from `source` to `target`; returns the seconds between the first and the last change."""
    src, tgt = mesh.host(source), mesh.host(target)
    home = mesh.homes.get(ip)
    if home not in (source, target):
        raise NetplaneError(
            f"{ip} is homed on {home or 'no host'}, not on {source}",
            hint="skyferry hosts ls shows the mesh; routes.publish() sets a home",
        )
    with _ipr(tgt) as t_ipr, _ipr(src) as s_ipr:
        started = time.perf_counter()
        if not host_routes(t_ipr, ip):
            raise NetplaneError(
                f"{target} has no host route for {ip}; nothing there would receive its packets",
                hint="attach the container on the target (attach.attach or attach.set_route) first",
            )
        routes.publish(mesh, ip, target)
        for oif in host_routes(s_ipr, ip):
            try:
                s_ipr.route("del", dst=f"{ip}/32", oif=oif)
            except NetlinkError as exc:
                if exc.code != errno.ESRCH:
                    raise
        return time.perf_counter() - started
