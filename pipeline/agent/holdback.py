"""Hold back the TCP segments that reach a container's new home before it is live, and replay them then.

From the cutover on, clients' packets for the container arrive at the target, whose netns drops them
until the restore is done (an empty netns would answer with RSTs). Clients whose packets were dropped
during the freeze back off (200 ms, 400 ms, 800 ms...), so without help a client would notice the
container is back only at its next timer, often hundreds of milliseconds after the restore. The target
therefore records the segments it drops and injects them into the container's netns the moment it opens:
the restored stack answers the request at once, and the client carries on. TCP tolerates duplicates, so
replaying a segment the container has seen is harmless.

Segments sent before the cutover reach the frozen source, whose lock drops them; the source holds those
back as well, replays them itself if the migration rolls back, and hands them to the target otherwise:
with the restore order, and once more right after the restore (outside the freeze) for those that were
still in flight towards it when the cutover moved their route, which the live target delivers at once
(`inject`).
"""

import os
import select
import socket
import threading
from collections import OrderedDict

from skyferry.netplane.netns import in_netns

ETH_P_IP = 0x0800
MAX_HELD = 1024  # segments; a burst beyond this is left to TCP's own retransmission


class Holdback:
    """Capture segments addressed to `ip` on the netns's eth0 (before its firewall drops them)."""

    def __init__(self, netns: str, ip: str, ifname: str = "eth0") -> None:
        self.netns, self.ip, self.ifname = netns, socket.inet_aton(ip), ifname
        self.held: OrderedDict[bytes, bytes] = OrderedDict()  # newest copy of each distinct segment
        self._stop = threading.Event()
        # Protocol 0, then bind with ETH_P_IP: a socket made with a protocol hooks every device at once,
        # and bind() then unhooks it with synchronize_net (10-17 ms here), which the source pays in its freeze.
        with in_netns(netns):
            self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, 0)
        self._sock.bind((ifname, ETH_P_IP))
        self._sock.setblocking(False)
        # close() wakes the capture through this pipe: it runs inside the freeze, where waiting out a
        # receive timeout cost up to 100 ms.
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._capture, name=f"holdback-{netns}", daemon=True)
        self._thread.start()

    def _capture(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self._sock, self._wake_r], [], [])
            if self._wake_r in ready:
                return
            try:
                packet, addr = self._sock.recvfrom(65535)
            except BlockingIOError:
                continue
            except OSError:
                return
            if addr[2] == socket.PACKET_OUTGOING or len(packet) < 40 or packet[9] != socket.IPPROTO_TCP:
                continue
            if packet[16:20] != self.ip:
                continue
            ihl = (packet[0] & 0x0F) * 4
            key = packet[12:20] + packet[ihl : ihl + 14]  # addresses, ports, seq, ack, flags
            self.held.pop(key, None)
            self.held[key] = packet
            while len(self.held) > MAX_HELD:
                self.held.popitem(last=False)

    def snapshot(self) -> list[bytes]:
        """The segments held so far, oldest first; capturing goes on."""
        return list(self.held.copy().values())

    def add(self, packets: list[bytes]) -> None:
        """Hold segments captured elsewhere too: the frozen source hands over what its lock dropped
        before the cutover, so the restore answers those clients at once as well."""
        for packet in packets:
            if len(packet) >= 40 and packet[9] == socket.IPPROTO_TCP and packet[16:20] == self.ip:
                ihl = (packet[0] & 0x0F) * 4
                self.held.setdefault(packet[12:20] + packet[ihl : ihl + 14], packet)

    def close(self) -> list[bytes]:
        """Stop capturing; returns the held segments, oldest first. Once only: later calls just return them
        (the wake pipe's descriptors may belong to someone else by then)."""
        if self._stop.is_set():
            return list(self.held.values())
        self._stop.set()
        os.write(self._wake_w, b"x")
        self._thread.join(timeout=2)
        # Closing a packet socket waits for the kernel (synchronize_net, about 10 ms): not in the freeze.
        threading.Thread(target=self._release, name="holdback-close", daemon=True).start()
        return list(self.held.values())

    def _release(self) -> None:
        self._sock.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def replay(self) -> int:
        """Stop capturing and deliver every held segment into the (now open) netns; returns how many."""
        return inject(self.netns, socket.inet_ntoa(self.ip), self.close())


def inject(netns: str, ip: str, packets: list[bytes]) -> int:
    """Deliver the TCP segments addressed to `ip` among `packets` into `netns`, as if they had just
    arrived; returns how many."""
    ours = [p for p in packets if len(p) >= 40 and p[9] == socket.IPPROTO_TCP and p[16:20] == socket.inet_aton(ip)]
    if not ours:
        return 0
    with in_netns(netns):
        raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    with raw:
        for packet in ours:
            raw.sendto(packet, (ip, 0))
    return len(ours)
