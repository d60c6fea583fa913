"""The WAN delay relay: forwards WireGuard's UDP between two hosts, holding each datagram `delay` seconds.

Per host pair and direction: a socket connected to the sending host (the kernel hands it only that
host's datagrams; SO_REUSEPORT lets both directions share the pair's port), a ring of preallocated
slots, a receiver thread that fills slots with recvmmsg(2) and a sender thread that sends whole due
batches with sendmmsg(2) from the socket connected to the other host. One syscall moves a batch, and
ctypes drops the GIL during it. The delay is constant, so batches fall due in FIFO order.
Run it as
`python -m skyferry.netplane.relay --delay 0.015 --pair 198.18.0.1:40001=198.18.0.11:51820,198.18.0.12:51820`.
"""

import argparse
import ctypes
import signal
import socket
import threading
import time
from collections import deque

BUFFER = 16 * 1024 * 1024
SO_RCVBUFFORCE = 33  # root may exceed net.core.rmem_max, which a child netns cannot raise
SO_SNDBUFFORCE = 32
MSG_WAITFORONE = 0x10000
SLOTS = 4096  # > 1 Gbit/s x 30 ms of 1452-byte datagrams
SLOT = 2048  # an MTU-1420 WireGuard datagram is 1452 bytes
BATCH = 256

_libc = ctypes.CDLL(None, use_errno=True)


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _Msghdr(ctypes.Structure):
    _fields_ = [
        ("msg_name", ctypes.c_void_p),
        ("msg_namelen", ctypes.c_uint32),
        ("msg_iov", ctypes.POINTER(_Iovec)),
        ("msg_iovlen", ctypes.c_size_t),
        ("msg_control", ctypes.c_void_p),
        ("msg_controllen", ctypes.c_size_t),
        ("msg_flags", ctypes.c_int),
    ]


class _Mmsghdr(ctypes.Structure):
    _fields_ = [("msg_hdr", _Msghdr), ("msg_len", ctypes.c_uint)]


def _addr(text: str) -> tuple[str, int]:
    host, port = text.rsplit(":", 1)
    return host, int(port)


def _socket(listen: tuple[str, int], peer: tuple[str, int]) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, BUFFER)
    sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, BUFFER)
    sock.bind(listen)
    sock.connect(peer)
    return sock


class Direction:
    """Datagrams arriving on `src` (connected to one host) go out of `dst` (connected to the other)."""

    def __init__(self, src: socket.socket, dst: socket.socket, delay: float) -> None:
        self.src, self.dst, self.delay = src, dst, delay
        self.buf = ctypes.create_string_buffer(SLOTS * SLOT)
        base = ctypes.addressof(self.buf)
        self.riov, self.siov = (_Iovec * SLOTS)(), (_Iovec * SLOTS)()
        self.rmsg, self.smsg = (_Mmsghdr * SLOTS)(), (_Mmsghdr * SLOTS)()
        for i in range(SLOTS):
            self.riov[i].iov_base = self.siov[i].iov_base = base + i * SLOT
            self.riov[i].iov_len = SLOT
            self.rmsg[i].msg_hdr.msg_iov = ctypes.pointer(self.riov[i])
            self.smsg[i].msg_hdr.msg_iov = ctypes.pointer(self.siov[i])
            self.rmsg[i].msg_hdr.msg_iovlen = self.smsg[i].msg_hdr.msg_iovlen = 1
        self.head = self.tail = 0  # slots filled / slots sent, counted forever (receiver / sender only)
        self.batches: deque[tuple[float, int, int]] = deque()  # (due, first slot, count)
        self.ready = threading.Condition(threading.Lock())

    def receive(self) -> None:
        fd, rmsg, siov, batches, now = self.src.fileno(), self.rmsg, self.siov, self.batches, time.monotonic
        size = ctypes.sizeof(_Mmsghdr)
        while True:
            start = self.head % SLOTS
            n = min(BATCH, SLOTS - (self.head - self.tail), SLOTS - start)
            if n == 0:  # the ring is full: let the kernel's socket buffer hold the rest a moment
                time.sleep(0.0005)
                continue
            got = _libc.recvmmsg(fd, ctypes.byref(rmsg, start * size), n, MSG_WAITFORONE, None)
            if got <= 0:
                continue  # EINTR, or an ICMP error queued on the socket
            due = now() + self.delay
            for i in range(start, start + got):
                siov[i].iov_len = rmsg[i].msg_len
            self.head += got
            batches.append((due, start, got))
            if len(batches) == 1:
                with self.ready:
                    self.ready.notify()

    def send(self) -> None:
        fd, smsg, batches, now = self.dst.fileno(), self.smsg, self.batches, time.monotonic
        size = ctypes.sizeof(_Mmsghdr)
        while True:
            if not batches:
                with self.ready:
                    self.ready.wait_for(lambda: bool(batches))
            due, start, count = batches[0]
            wait = due - now()
            if wait > 0:
                time.sleep(wait)
            done = 0
            while done < count:
                sent = _libc.sendmmsg(fd, ctypes.byref(smsg, (start + done) * size), count - done, 0)
                if sent <= 0:
                    break  # the other host is gone (ECONNREFUSED): drop the batch, as a link would
                done += sent
            batches.popleft()
            self.tail += count


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mesh", help="the mesh this relay serves (a label for ps and for cleanup)")
    parser.add_argument("--delay", type=float, default=0.0, help="one-way delay in seconds")
    parser.add_argument("--pair", action="append", default=[], help="LISTEN=A,B (each addr:port)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: exit(0))
    threads = []
    for spec in args.pair:
        listen, ends = spec.split("=")
        a, b = (_addr(e) for e in ends.split(","))
        to_a, to_b = _socket(_addr(listen), a), _socket(_addr(listen), b)
        for d in (Direction(to_a, to_b, args.delay), Direction(to_b, to_a, args.delay)):
            threads += [threading.Thread(target=d.receive, daemon=True), threading.Thread(target=d.send, daemon=True)]
    for t in threads:
        t.start()
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
