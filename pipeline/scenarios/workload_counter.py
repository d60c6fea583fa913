"""A TCP counter service and its client: the workload the demo, tests and benchmark migrate.

Standard library only: it is copied into containers and run by the host's python3. The server answers
each request line `SEQ` with `SEQ COUNT`, COUNT being how many requests this connection has served, so the
client can prove that nothing was lost or repeated across a migration. Optionally it holds N MiB of
non-trivial memory and dirties some of it every 0.1 s, like a real service, keeping a crc32 of every page
beside it. The line `CHECK` (not counted as a request) is answered with one line of JSON,
{"pages": N, "bad": K, "first_bad": [...]}, from recomputing every page's crc32: after a migration it proves
that every page arrived intact.

  python3 workload_counter.py serve PORT [--memory-mib N] [--dirty-mb-s R] [--incompressible]
  python3 workload_counter.py client HOST PORT --interval 0.05 --out RESULT.json [--stop-file F] [--duration S]
  python3 workload_counter.py check HOST PORT    (prints the CHECK answer; exit 1 if any page is bad)
"""

import argparse
import json
import os
import random
import socket
import sys
import threading
import time
import zlib
from array import array

PAGE = 4096


class HeldMemory:
    """Realistic memory (random-ish pages, compressible ~3x, like a heap), or with `incompressible` random
    bytes throughout (media, encrypted or already compressed data: what the link's speed alone bounds),
    some of it rewritten each tick, with a crc32 per page. Buffer and table both live in this process, so
    both migrate with it."""

    def __init__(self, mib: int, incompressible: bool = False) -> None:
        self.pages = mib * 256
        self.incompressible = incompressible
        self.lock = threading.Lock()
        self.ready = threading.Event()  # CHECK waits for the memory to be built: the server listens at once
        self.buf = bytearray()
        self.crcs = array("I")

    def hold(self, dirty_mb_s: float) -> None:
        if self.incompressible:  # no page repeats another, so no window of any compressor finds a match
            buf = bytearray(os.urandom(self.pages * PAGE))
        else:
            pool = [os.urandom(PAGE // 3) * 3 + b"\0" * (PAGE % 3) for _ in range(256)]
            buf = bytearray(b"".join(pool[random.randrange(256)] for _ in range(self.pages)))
        view = memoryview(buf)
        with self.lock:
            self.buf = buf
            self.crcs = array("I", (zlib.crc32(view[off : off + PAGE]) for off in range(0, len(buf), PAGE)))
        self.ready.set()
        per_tick = int(dirty_mb_s * 1e6 / 10 / PAGE)
        while True:
            for _ in range(per_tick):
                page = random.randrange(self.pages)
                off = page * PAGE
                with self.lock:  # a CHECK never sees a page written but its crc not yet updated
                    buf[off : off + 16] = os.urandom(16)
                    self.crcs[page] = zlib.crc32(view[off : off + PAGE])
            time.sleep(0.1)

    def check(self) -> dict:
        self.ready.wait()
        with self.lock:
            view = memoryview(self.buf)
            bad = [p for p in range(self.pages) if zlib.crc32(view[p * PAGE : (p + 1) * PAGE]) != self.crcs[p]]
            view.release()
        return {"pages": self.pages, "bad": len(bad), "first_bad": bad[:5]}


def serve(port: int, memory_mib: int, dirty_mb_s: float, incompressible: bool = False) -> None:
    memory = HeldMemory(memory_mib, incompressible) if memory_mib else None
    if memory:
        threading.Thread(target=memory.hold, args=(dirty_mb_s,), daemon=True).start()
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen()
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=_serve_one, args=(conn, memory), daemon=True).start()


def _serve_one(conn: socket.socket, memory: HeldMemory | None) -> None:
    count = 0
    with conn, conn.makefile("rwb") as f:
        for line in f:
            if line.strip() == b"CHECK":
                report = memory.check() if memory else {"pages": 0, "bad": 0, "first_bad": []}
                f.write(json.dumps(report).encode() + b"\n")
            else:
                count += 1
                f.write(line.strip() + b" %d\n" % count)
            f.flush()


def client(
    host: str, port: int, interval: float, out: str, stop_file: str | None, duration: float, timeout: float = 60
) -> None:
    """Send SEQ every `interval` on one connection; the largest gap is the longest wait for an answer, and
    one longer than `timeout` seconds ends the client (a VM under TCG freezes for minutes)."""
    result = {"requests": 0, "max_gap_ms": 0.0, "errors": [], "survived": True, "gaps_over_200ms": []}
    start = time.monotonic()
    try:
        conn = _connect(host, port, deadline=time.monotonic() + 20)
        conn.settimeout(timeout)
        f = conn.makefile("rwb")
        seq = 0
        while time.monotonic() - start < duration and not (stop_file and os.path.exists(stop_file)):
            seq += 1
            sent = time.monotonic()
            f.write(b"%d\n" % seq)
            f.flush()
            reply = f.readline().split()
            now = time.monotonic()
            if len(reply) != 2 or int(reply[0]) != seq or int(reply[1]) != seq:
                result["errors"].append(f"request {seq}: got {reply!r}")
                result["survived"] = False
                break
            gap = (now - sent) * 1000
            if gap > 200:
                result["gaps_over_200ms"].append(round(gap, 1))
            if gap > result["max_gap_ms"]:  # when, in wall-clock time, to line it up with a migration's journal
                result["max_gap_ms"] = round(gap, 1)
                result["max_gap_wall"] = [time.time() - (now - sent), time.time()]
            result["requests"] = seq
            with open(out + ".progress", "w") as fh:  # how far we got, for whoever started us
                fh.write(str(seq))
            time.sleep(max(0.0, interval - (time.monotonic() - now)))
    except (OSError, ValueError) as exc:
        result["errors"].append(f"{type(exc).__name__}: {exc}")
        result["survived"] = False
    tmp = out + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(result, fh)
    os.replace(tmp, out)


def check(host: str, port: int) -> int:
    """Ask the server to verify its memory; prints its JSON answer, returns 0 if every page is intact."""
    with _connect(host, port, deadline=time.monotonic() + 20) as conn, conn.makefile("rwb") as f:
        f.write(b"CHECK\n")
        f.flush()
        line = f.readline()
    if not line:
        sys.exit(f"check: {host}:{port} closed the connection without answering")
    print(line.decode().strip())
    return 0 if json.loads(line)["bad"] == 0 else 1


def _connect(host: str, port: int, deadline: float) -> socket.socket:
    """The first connection only: the service may still be starting. A migration never reconnects."""
    while True:
        try:
            return socket.create_connection((host, port), timeout=60)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def main() -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("port", type=int)
    s.add_argument("--memory-mib", type=int, default=0)
    s.add_argument("--dirty-mb-s", type=float, default=0.0)
    s.add_argument("--incompressible", action="store_true")
    c = sub.add_parser("client")
    c.add_argument("host")
    c.add_argument("port", type=int)
    c.add_argument("--interval", type=float, default=0.05)
    c.add_argument("--out", required=True)
    c.add_argument("--stop-file")
    c.add_argument("--duration", type=float, default=3600)
    c.add_argument("--timeout", type=float, default=60)
    k = sub.add_parser("check")
    k.add_argument("host")
    k.add_argument("port", type=int)
    args = parser.parse_args()
    if args.cmd == "serve":
        serve(args.port, args.memory_mib, args.dirty_mb_s, args.incompressible)
    elif args.cmd == "check":
        return check(args.host, args.port)
    else:
        client(args.host, args.port, args.interval, args.out, args.stop_file, args.duration, args.timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
