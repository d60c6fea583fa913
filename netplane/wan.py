"""WAN emulation between local hosts: tbf for the rate, the delay relay (relay.py) for the round trip.

This kernel has tbf but no netem, so delay happens in user space: every WireGuard datagram between
two hosts goes through the relay in the switch netns, which holds it rtt/2 per direction.
"""

import re
import subprocess
import sys
import time
from dataclasses import dataclass

from pyroute2 import IPRoute

from . import netns, wg
from .errors import NetplaneError

_UNITS = {"": 1, "bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9}
_TIME = {"ms": 1e-3, "s": 1.0, "us": 1e-6}
RELAY_MARKER = "skyferry.netplane.relay"


@dataclass(frozen=True)
class WanSpec:
    """`rate` in bit/s and `rtt` in seconds; None leaves that property unshaped."""

    rate: int | None = None
    rtt: float | None = None
    rate_text: str | None = None
    rtt_text: str | None = None

    @classmethod
    def parse(cls, text: str) -> "WanSpec":
        """Parse "rate=1gbit,rtt=30ms" (either key may be left out)."""
        hint = "e.g. --wan rate=1gbit,rtt=30ms"
        values: dict[str, str] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, sep, value = part.partition("=")
            if not sep or key not in ("rate", "rtt") or key in values:
                raise NetplaneError(f"bad --wan item {part!r}", hint=hint)
            values[key] = value.strip().lower()
        rate = rtt = None
        if "rate" in values:
            m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(bit|kbit|mbit|gbit)", values["rate"])
            if not m or float(m[1]) <= 0:
                raise NetplaneError(f"bad WAN rate {values['rate']!r}", hint=hint)
            rate = int(float(m[1]) * _UNITS[m[2]])
            if rate > 30 * 10**9:
                raise NetplaneError(f"WAN rate {values['rate']} is above tbf's 30gbit", hint=hint)
        if "rtt" in values:
            m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(us|ms|s)", values["rtt"])
            if not m:
                raise NetplaneError(f"bad WAN rtt {values['rtt']!r}", hint=hint)
            rtt = float(m[1]) * _TIME[m[2]]
            if rtt > 10:
                raise NetplaneError(f"WAN rtt {values['rtt']} is over 10 s", hint=hint)
        if rate is None and rtt is None:
            raise NetplaneError(f"--wan {text!r} sets neither rate nor rtt", hint=hint)
        return cls(rate, rtt, values.get("rate"), values.get("rtt"))


def shape(netns_name: str, ifname: str, rate: int) -> None:
    """tbf at `rate` bit/s on `ifname`'s egress, with a bucket and queue sized for WAN-like bursts."""
    byte_rate = rate // 8
    burst = max(byte_rate // 250, 64 * 1024)  # at least one jiffy's worth at HZ=250
    with IPRoute(netns=netns_name) as ipr:
        idx = ipr.link_lookup(ifname=ifname)[0]
        ipr.tc("replace", "tbf", idx, "1:", rate=byte_rate, burst=burst, latency="50ms")


def start_relay(mesh: str, switch_netns: str, pairs: dict[int, tuple[str, str]], address: str, delay: float) -> int:
    """Start the relay in `switch_netns` for pairs {port: (endpoint_a, endpoint_b)}; returns its pid."""
    argv = [sys.executable, "-m", RELAY_MARKER, "--mesh", mesh, "--delay", repr(delay)]
    for port, (a, b) in sorted(pairs.items()):
        argv += ["--pair", f"{address}:{port}={a},{b}"]
    proc = subprocess.Popen(
        netns.command(switch_netns, argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    ports = set(pairs)
    deadline = time.monotonic() + 10
    while _bound_ports(switch_netns) & ports != ports:
        if proc.poll() is not None or time.monotonic() > deadline:
            wg.stop_process(proc.pid, RELAY_MARKER)
            err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
            raise NetplaneError(f"the WAN relay did not start: {err.splitlines()[-1:] or 'timeout'}")
        time.sleep(0.02)
    proc.stderr.close()  # type: ignore[union-attr]
    return proc.pid


def _bound_ports(netns_name: str) -> set[int]:
    with netns.in_netns(netns_name), open("/proc/thread-self/net/udp") as f:
        return {int(line.split()[1].split(":")[1], 16) for line in f.readlines()[1:]}
