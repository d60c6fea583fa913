"""Public ingress on this host: DNAT from the host's own addresses to a container's overlay /32 (nftables).

An Elastic IP or a DNS record moved to a host only brings traffic to the host; this is what carries it on
to the container. One table, `ip skyferry_ingress`, belongs to skyferry: a map per protocol from a public
port to the container's address and port, each element commented with the container's name (so the
source can drop a container's ports after the container has left), and one prerouting rule per map.

The rules match every local destination address but the host's overlay address, not one public
address: in a cloud the public address (an Elastic IP, a GCP external IP) is 1:1 NAT in front of the
instance, so packets arrive at its private address; agents and mesh peers use the overlay address, which
stays untouched. Replies need no rule: conntrack undoes the DNAT on their way back through this host.
Forwarding must be allowed (the container attach turns `ip_forward` on); a host whose other firewall
drops forwarded packets (Docker's FORWARD policy, for one) needs an accept for them.

Calls go through the `nft` tool (not in any freeze, so a process per call is fine) under one lock: a
publish reads the maps, refuses a conflict, and applies its change as one nft transaction.
"""

import json
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.hostapi.publish import PublicPort

TABLE = "skyferry_ingress"
MAPS = {"tcp": "tcp_ports", "udp": "udp_ports"}  # `tcp` and `udp` are nft keywords, not names
LISTEN = {"tcp": ("tcp", "tcp6"), "udp": ("udp", "udp6")}
_lock = threading.Lock()


def _nft(*args: str, script: str | None = None) -> subprocess.CompletedProcess[str]:
    nft = shutil.which("nft")
    if nft is None:
        raise SkyferryError(
            "the `nft` tool is missing: this host cannot publish container ports",
            hint="run `make host` (scripts/bootstrap-host.sh installs nftables)",
        )
    argv = [nft, *args, *(["-f", "-"] if script is not None else [])]
    return subprocess.run(argv, input=script, capture_output=True, text=True, check=False)


def _apply(script: str) -> None:
    done = _nft(script=script)
    if done.returncode != 0:
        raise SkyferryError(f"nft refused the ingress rules: {done.stderr.strip().splitlines()[0]}")


def _table(overlay_ip: str) -> str:
    """The table, declared idempotently, with its rules rewritten in the same transaction."""
    maps = "".join(f"map {m} {{ type inet_service : ipv4_addr . inet_service; }}\n" for m in MAPS.values())
    rules = "".join(
        f"add rule ip {TABLE} prerouting ip daddr != {overlay_ip} fib daddr type local "
        f"dnat ip to {proto} dport map @{m}\n"
        for proto, m in MAPS.items()
    )
    chain = "chain prerouting { type nat hook prerouting priority dstnat; policy accept; }"
    return f"table ip {TABLE} {{\n{maps}{chain}\n}}\nflush chain ip {TABLE} prerouting\n{rules}"


def published() -> list[dict[str, Any]]:
    """Every published port on this host: proto, public, ip, container (port), name."""
    if shutil.which("nft") is None:
        return []
    found: list[dict[str, Any]] = []
    for proto, m in MAPS.items():
        listed = _nft("-j", "list", "map", "ip", TABLE, m)
        if listed.returncode != 0:
            return []  # no table yet: nothing published
        for item in json.loads(listed.stdout)["nftables"]:
            for key, value in item.get("map", {}).get("elem", []):
                ip, port = value["concat"]
                elem = key["elem"]
                found.append(
                    {"proto": proto, "public": elem["val"], "ip": ip, "container": port, "name": elem.get("comment")}
                )
    return sorted(found, key=lambda p: (p["proto"], p["public"]))


def _listening(proto: str, port: int, overlay_ip: str) -> bool:
    """A host process has a socket bound to `port` on an address DNAT would shadow (anything but
    loopback and the overlay address)."""
    shadowed = {_hex_v4(overlay_ip)}
    for table in LISTEN[proto]:
        path = Path("/proc/self/net") / table
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            address, hexport = fields[1].rsplit(":", 1)
            listening = fields[3] == ("0A" if proto == "tcp" else "07")
            loopback = address.startswith(("0100007F", "00000000000000000000000001000000"))
            if listening and int(hexport, 16) == port and not loopback and address not in shadowed:
                return True
    return False


def _hex_v4(ip: str) -> str:
    """An IPv4 address as /proc/net/tcp writes it (little-endian hex)."""
    return "".join(f"{int(b):02X}" for b in reversed(ip.split(".")))


def publish(host: str, name: str, ip: str, ports: list[PublicPort], overlay_ip: str) -> list[dict[str, Any]]:
    """Publish exactly `ports` for container `name` at `ip` (ports it had before and not now go);
    idempotent. Refuses a port another container holds here, or one a host process listens on."""
    with _lock:
        current = published()
        for p in ports:
            for have in current:
                if (have["proto"], have["public"]) == (p.proto, p.public) and have["name"] != name:
                    raise SkyferryError(
                        f"port {p.public}/{p.proto} on {host} is already published for container {have['name']!r}",
                        hint="give this container another public port, or move one of them to another host",
                    )
            if _listening(p.proto, p.public, overlay_ip):
                raise SkyferryError(
                    f"port {p.public}/{p.proto} on {host} belongs to a process of the host itself",
                    hint="publish the container on another port (PORT=CONTAINER_PORT maps it, docs/runbooks.md)",
                )
        mine = [c for c in current if c["name"] == name]
        stale = [c for c in mine if c["ip"] != ip or _port(c) not in ports]
        script = _table(overlay_ip) + _delete(stale)
        script += "".join(
            f'add element ip {TABLE} {MAPS[p.proto]} {{ {p.public} comment "{name}" : {ip} . {p.container} }}\n'
            for p in ports
        )
        _apply(script)
        return [c for c in published() if c["name"] == name]


def unpublish(name: str) -> list[dict[str, Any]]:
    """Remove every port published for container `name`; idempotent, and nothing to do without nft."""
    with _lock:
        mine = [c for c in published() if c["name"] == name]
        if mine:
            _apply(_delete(mine))
        return mine


def _port(c: dict[str, Any]) -> PublicPort:
    return PublicPort(c["proto"], c["public"], c["container"])


def _delete(elements: list[dict[str, Any]]) -> str:
    return "".join(f"delete element ip {TABLE} {MAPS[c['proto']]} {{ {c['public']} }}\n" for c in elements)
