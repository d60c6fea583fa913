"""Clients that keep real servers busy during a migration and say afterwards what they lost.

A standalone script (standard library only, plus psycopg2 for `pg`): it runs with the host's python3 in
another host's network namespace, or inside a client container from the PostgreSQL image. Each client
works until STOP_FILE exists, keeps PROGRESS current (one number: operations acknowledged so far), then
checks what the server holds and writes one JSON verdict to OUT:
`{"ok": bool, "errors": [...], ...}`, ok only with no error and nothing acknowledged missing.

    workload_clients.py pg HOST PORT --out F --stop-file F --progress F
    workload_clients.py http HOST PORT --connections 3 --download /big.bin --release F ...
    workload_clients.py memcached HOST PORT --connections 4 --keys 2000 ...
    workload_clients.py echo HOST PORT --connections 4 ...     (the JVM's and Node's line-echo servers)
"""

import argparse
import hashlib
import json
import os
import random
import socket
import threading
import time
from pathlib import Path
from typing import Any

TIMEOUT = 60.0  # the longest wait for one answer: far beyond any freeze, short of a hung test


class Progress:
    """A shared counter of acknowledged operations, mirrored to a file the test polls."""

    def __init__(self, path: Path) -> None:
        self.path, self.count, self.lock, self.errors = path, 0, threading.Lock(), []
        self.max_gap_s, self._last = 0.0, time.monotonic()

    def ack(self, n: int = 1) -> None:
        with self.lock:
            now = time.monotonic()
            self.max_gap_s = max(self.max_gap_s, now - self._last)
            self._last = now
            self.count += n
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(str(self.count))
            tmp.replace(self.path)

    def error(self, what: str) -> None:
        with self.lock:
            self.errors.append(what)


def pg(args: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    """One connection; each transaction inserts one row and commits; every acknowledged row must remain."""
    import psycopg2  # only in the PostgreSQL image

    deadline = time.monotonic() + TIMEOUT
    while True:  # a server that has just started may still refuse ("the database system is starting up")
        try:
            conn = psycopg2.connect(host=args.host, port=args.port, user="postgres", dbname="postgres",
                                    connect_timeout=10, tcp_user_timeout=int(TIMEOUT * 1000))  # fmt: skip
            break
        except psycopg2.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    cur = conn.cursor()
    cur.execute("CREATE TABLE IF NOT EXISTS acked (n integer PRIMARY KEY, at timestamptz DEFAULT now(), pad text)")
    conn.commit()
    cur.execute("SELECT pg_backend_pid()")
    backend = cur.fetchone()[0]
    acked: list[int] = []
    pad = "x" * 200
    n = 0
    try:
        while not args.stop_file.exists():
            n += 1
            cur.execute("INSERT INTO acked (n, pad) VALUES (%s, %s)", (n, pad))
            conn.commit()  # returned: the commit is acknowledged
            acked.append(n)
            progress.ack()
            time.sleep(args.interval)
        cur.execute("SELECT pg_backend_pid()")
        same = cur.fetchone()[0] == backend
        cur.execute("SELECT n FROM acked")
        missing = sorted(set(acked) - {row[0] for row in cur.fetchall()})
    except Exception as exc:  # the verdict names it; any error fails the run
        progress.error(f"transaction {n}: {type(exc).__name__}: {exc}".strip())
        return {"commits": len(acked), "last_acked": acked[-1] if acked else 0}
    conn.close()
    if not same:
        progress.error("the server-side backend changed: the connection was not the same")
    return {"commits": len(acked), "missing": missing, "backend_pid": backend, "same_backend": same}


def _http_request(sock: socket.socket, reader: Any, path: str) -> tuple[int, dict[str, str]]:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: workload\r\n\r\n".encode())
    status = reader.readline()
    if not status:
        raise ConnectionError("the server closed the connection")
    code = int(status.split()[1])
    headers = {}
    while (line := reader.readline()) not in (b"\r\n", b""):
        key, _, value = line.decode().partition(":")
        headers[key.strip().lower()] = value.strip()
    return code, headers


def http(args: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    """Keep-alive clients polling a small page on their own connections, and one large download that reads
    slowly (a small receive buffer, paced) until the release file appears, then at full speed."""
    served = [0] * args.connections
    download: dict[str, Any] = {}

    def keepalive(i: int) -> None:
        try:
            with socket.create_connection((args.host, args.port), timeout=TIMEOUT) as sock:
                reader = sock.makefile("rb")
                while not args.stop_file.exists():
                    code, headers = _http_request(sock, reader, "/ping")
                    body = reader.read(int(headers["content-length"]))
                    if code != 200 or body != b"ok\n":
                        raise ValueError(f"/ping answered {code} {body[:40]!r}")
                    served[i] += 1
                    progress.ack()
                    time.sleep(args.interval)
        except Exception as exc:
            progress.error(f"keep-alive connection {i} after {served[i]} requests: {type(exc).__name__}: {exc}")

    def fetch() -> None:
        got, digest, paced = 0, hashlib.sha256(), True
        try:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)  # before connect: a small window
            sock.settimeout(TIMEOUT)
            sock.connect((args.host, args.port))
            with sock:
                reader = sock.makefile("rb")
                code, headers = _http_request(sock, reader, args.download)
                size = int(headers["content-length"])
                download.update(status=code, size=size)
                while got < size:
                    chunk = reader.read1(min(16 * 1024 if paced else 1 << 20, size - got))
                    if not chunk:
                        raise ConnectionError(f"the server closed the download at {got} of {size} bytes")
                    got += len(chunk)
                    digest.update(chunk)
                    download["bytes"] = got
                    paced = paced and not args.release.exists()
                    if paced:  # ~80 kB/s: the download stays in flight across minutes of migrations
                        time.sleep(0.2)
        except Exception as exc:
            progress.error(f"download after {got} bytes: {type(exc).__name__}: {exc}")
        download.update(bytes=got, sha256=digest.hexdigest())

    threads = [threading.Thread(target=keepalive, args=(i,), daemon=True) for i in range(args.connections)]
    if args.download:
        threads.append(threading.Thread(target=fetch, daemon=True))
    for t in threads:
        t.start()
    _watch(args, progress, download)
    for t in threads:
        t.join()
    return {"requests": served, "download": download}


def _watch(args: argparse.Namespace, progress: Progress, download: dict[str, Any]) -> None:
    """Mirror the download's progress next to the request count, until told to stop."""
    side = Path(f"{args.progress}.download")
    while not args.stop_file.exists():
        side.write_text(json.dumps(download))
        time.sleep(0.1)
    side.write_text(json.dumps(download))


def _mc_call(sock: socket.socket, reader: Any, line: bytes) -> bytes:
    sock.sendall(line)
    reply = reader.readline()
    if not reply:
        raise ConnectionError("memcached closed the connection")
    return reply


def memcached(args: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    """Each connection sets its own keys over and over (and reads some back); at the end every key must hold
    the last value memcached acknowledged with STORED."""
    acked: dict[str, bytes] = {}
    sets = [0] * args.connections
    lock = threading.Lock()

    def worker(c: int) -> None:
        rng = random.Random(c)
        try:
            with socket.create_connection((args.host, args.port), timeout=TIMEOUT) as sock:
                reader = sock.makefile("rb")
                while not args.stop_file.exists():
                    key = f"k{c}-{rng.randrange(args.keys)}"
                    value = f"{c}:{sets[c]}:{rng.getrandbits(64):016x}".encode() * 8
                    reply = _mc_call(sock, reader, b"set %s 0 0 %d\r\n%s\r\n" % (key.encode(), len(value), value))
                    if reply != b"STORED\r\n":
                        raise ValueError(f"set {key} answered {reply!r}")
                    with lock:
                        acked[key] = value
                    sets[c] += 1
                    progress.ack()
                    if sets[c] % 4 == 0:  # read back what this connection alone writes
                        got = _mc_get(sock, reader, key)
                        if got != value:
                            raise ValueError(f"get {key} returned {got!r:.60}, not the value just stored")
                    if args.interval:
                        time.sleep(args.interval)
        except Exception as exc:
            progress.error(f"connection {c} after {sets[c]} sets: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=worker, args=(c,), daemon=True) for c in range(args.connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lost: list[str] = []
    with socket.create_connection((args.host, args.port), timeout=TIMEOUT) as sock:
        reader = sock.makefile("rb")
        for key, value in acked.items():
            if _mc_get(sock, reader, key) != value:
                lost.append(key)
    return {"sets": sets, "keys": len(acked), "lost": lost[:20], "lost_count": len(lost)}


def _mc_get(sock: socket.socket, reader: Any, key: str) -> bytes | None:
    reply = _mc_call(sock, reader, f"get {key}\r\n".encode())
    if reply == b"END\r\n":
        return None
    if not reply.startswith(b"VALUE "):
        raise ValueError(f"get {key} answered {reply!r}")
    value = reader.read(int(reply.split()[3]) + 2)[:-2]
    if reader.readline() != b"END\r\n":
        raise ValueError(f"get {key}: no END")
    return value


def echo(args: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    """Each connection sends numbered lines; the server answers each with its own count of lines on that
    connection, then the line. A wrong count means the server lost its per-connection state (its heap)
    or a line; a wrong line, a mixed-up or torn answer."""
    answered = [0] * args.connections

    def worker(c: int) -> None:
        try:
            with socket.create_connection((args.host, args.port), timeout=TIMEOUT) as sock:
                reader = sock.makefile("rb")
                while not args.stop_file.exists():
                    line = f"c{c} line {answered[c] + 1} {random.getrandbits(64):016x}"
                    sock.sendall(line.encode() + b"\n")
                    reply = reader.readline()
                    if not reply:
                        raise ConnectionError("the server closed the connection")
                    if reply.decode() != f"{answered[c] + 1} {line}\n":
                        raise ValueError(f"sent {line!r}, got {reply!r:.120}")
                    answered[c] += 1
                    progress.ack()
                    time.sleep(args.interval)
        except Exception as exc:
            progress.error(f"connection {c} after {answered[c]} lines: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=worker, args=(c,), daemon=True) for c in range(args.connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"answered": answered}


CLIENTS = {"pg": pg, "http": http, "memcached": memcached, "echo": echo}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=sorted(CLIENTS))
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--stop-file", type=Path, required=True)
    parser.add_argument("--progress", type=Path, required=True)
    parser.add_argument("--interval", type=float, default=0.01)
    parser.add_argument("--connections", type=int, default=3)
    parser.add_argument("--keys", type=int, default=2000)
    parser.add_argument("--download", default="")
    parser.add_argument("--release", type=Path, default=Path("/nonexistent"))
    parser.add_argument("--print", action="store_true", help="also print the verdict (a container's log)")
    args = parser.parse_args()
    progress = Progress(args.progress)
    started = time.monotonic()
    try:
        verdict = CLIENTS[args.kind](args, progress)
    except Exception as exc:
        progress.error(f"{type(exc).__name__}: {exc}")
        verdict = {}
    verdict.update(
        errors=progress.errors, acked=progress.count, max_gap_ms=round(progress.max_gap_s * 1000, 1),
        seconds=round(time.monotonic() - started, 1),
    )  # fmt: skip
    verdict["ok"] = not verdict["errors"] and not verdict.get("missing") and not verdict.get("lost_count")
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(verdict))
    os.replace(tmp, args.out)
    if args.print:
        print(json.dumps(verdict), flush=True)


if __name__ == "__main__":
    main()
