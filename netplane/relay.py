"""The WAN delay relay: forwards WireGuard's UDP between two hosts, holding each datagram `delay` seconds.

One socket per host pair; a datagram from one end goes to the other. Per socket, a receiver thread
stamps datagrams into a FIFO (the delay is constant, so FIFO order is due order) and a sender thread
sends each once it is due. Both block in syscalls that release the GIL. Run it as
`python -m skyferry.netplane.relay --delay 0.015 --pair 198.18.0.1:40001=198.18.0.11:51820,198.18.0.12:51820`.
"""

import argparse
import signal
import socket
import threading
import time
from collections import deque

BUFFER = 16 * 1024 * 1024
SO_RCVBUFFORCE = 33
SO_SNDBUFFORCE = 32


def _addr(text: str) -> tuple[str, int]:
    host, port = text.rsplit(":", 1)
    return host, int(port)


class Pair:
    def __init__(self, listen: tuple[str, int], a: tuple[str, int], b: tuple[str, int], delay: float) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, BUFFER)
        self.sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, BUFFER)
        self.sock.bind(listen)
        self.other = {a: b, b: a}
        self.delay = delay
        self.queue: deque[tuple[float, bytes, tuple[str, int]]] = deque()
        self.ready = threading.Condition(threading.Lock())

    def receive(self) -> None:
        recv, other, now = self.sock.recvfrom, self.other, time.monotonic
        if self.delay <= 0:
            send = self.sock.sendto
            while True:
                data, src = recv(65536)
                dst = other.get(src)
                if dst:
                    send(data, dst)
        queue, ready, delay = self.queue, self.ready, self.delay
        while True:
            data, src = recv(65536)
            dst = other.get(src)
            if dst:
                queue.append((now() + delay, data, dst))
                if len(queue) == 1:
                    with ready:
                        ready.notify()

    def send(self) -> None:
        queue, ready, send, now, sleep = self.queue, self.ready, self.sock.sendto, time.monotonic, time.sleep
        while True:
            if not queue:
                with ready:
                    ready.wait_for(lambda: bool(queue))
            due, data, dst = queue[0]
            wait = due - now()
            if wait > 0:
                sleep(wait)
            queue.popleft()
            send(data, dst)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mesh", help="the mesh this relay serves (a label for ps and for cleanup)")
    parser.add_argument("--delay", type=float, default=0.0, help="one-way delay in seconds")
    parser.add_argument("--pair", action="append", default=[], help="LISTEN=A,B (each addr:port)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: raise_exit())
    threads = []
    for spec in args.pair:
        listen, ends = spec.split("=")
        a, b = ends.split(",")
        pair = Pair(_addr(listen), _addr(a), _addr(b), args.delay)
        threads.append(threading.Thread(target=pair.receive, daemon=True))
        if args.delay > 0:
            threads.append(threading.Thread(target=pair.send, daemon=True))
    for t in threads:
        t.start()
    try:
        while True:
            time.sleep(3600)
    except SystemExit:
        pass


def raise_exit() -> None:
    raise SystemExit(0)


if __name__ == "__main__":
    main()
