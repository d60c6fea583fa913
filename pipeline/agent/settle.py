"""Before a container's pause: let the replies it has sent land.

A reply still unacknowledged at the pause (in flight, or lost in a congested link and waiting for its
retransmission) is dumped with its socket. The source's lock drops that retransmission inside the
freeze, and the restored copy, without an RTT sample, probes for it only after the kernel's initial
1 s (TCP_TIMEOUT_INIT): its client waited 1.0-2.1 s beyond the freeze in four of six 8-container
evacuations (2026-12-05; each time `ss` in the container had shown data in flight just before the
pause, and the client's wait ended 1.0 s after the restore). So the source waits up to SETTLE_S, before
the pause and while its bulk rounds trickle (agent/bulk.py), until what each established socket of the
container had in flight has been acknowledged (what it sends meanwhile does not prolong the wait). A
reply usually lands within a round trip; a peer that never acknowledges only costs the bound, outside
the freeze. With it: no client waited more than 79 ms beyond its freeze in twelve such evacuations.
A reply sent after this wait begins and before the pause can still be in flight at the cutover, and
the client host's WireGuard then drops it: rare since wireguard-go's deeper queue (bench/README.md,
"Clients' gaps in evacuations"); a second wait after the pause did not make it rarer.
"""

import logging
import socket
import time

from pyroute2 import DiagSocket
from pyroute2.netlink.exceptions import NetlinkError
from skyferry.netplane.netns import in_netns

log = logging.getLogger("skyferry.agent.settle")

SETTLE_S = 0.3  # at most this long: longer than an RTO of 0.2 s plus a WAN round trip
POLL_S = 0.01
TCP_ESTABLISHED = 1
INET_DIAG_INFO = 2  # the tcp_info extension

Key = tuple[int, str, int, str, int]  # family, source address and port, peer address and port


def settle(netns: str, bound: float = SETTLE_S) -> float:
    """Wait until what the sockets in `netns` had in flight has been acknowledged (what they send
    meanwhile does not prolong it), at most `bound` seconds; the seconds waited. One netlink socket in
    the netns serves every poll."""
    start = time.monotonic()
    try:
        with in_netns(netns), DiagSocket() as diag:
            diag.bind()
            waiting = _owed(_read(diag))
            while waiting and time.monotonic() - start < bound:
                time.sleep(POLL_S)
                now = _read(diag)
                waiting = {key: sent for key, sent in waiting.items() if key in now and now[key][1] < sent}
    except (OSError, NetlinkError) as exc:  # only a courtesy to the clients: never a reason not to migrate
        log.warning("could not read the TCP sockets in %s (%s); pausing without waiting for replies", netns, exc)
    return time.monotonic() - start


def _read(diag: DiagSocket) -> dict[Key, tuple[int, int]]:
    """The established TCP sockets `diag` sees: (new bytes sent, bytes the peer acknowledged) each."""
    out: dict[Key, tuple[int, int]] = {}
    for family in (socket.AF_INET, socket.AF_INET6):
        ext = 1 << (INET_DIAG_INFO - 1)
        for sock in diag.get_sock_stats(family=family, states=1 << TCP_ESTABLISHED, extensions=ext):
            info = sock.get_attr("INET_DIAG_INFO")
            if info is None:
                continue
            key = (family, sock["idiag_src"], sock["idiag_sport"], sock["idiag_dst"], sock["idiag_dport"])
            new = (info.get("tcpi_bytes_sent") or 0) - (info.get("tcpi_bytes_retrans") or 0)
            out[key] = (new, info.get("tcpi_bytes_acked") or 0)
    return out


def _owed(found: dict[Key, tuple[int, int]]) -> dict[Key, int]:
    return {key: sent for key, (sent, acked) in found.items() if acked < sent}
