"""Helpers for netplane tests: ICMP and TCP probes inside namespaces, a local mesh that always comes down."""

import http.client
import ipaddress
import itertools
import socket
import sqlite3
import ssl
import statistics
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute
from skyferry.netplane import netns, store, wg
from skyferry.netplane.mesh import Mesh
from skyferry.netplane.netns import in_netns
from skyferry.netplane.wan import WanSpec
from skyferry.pipeline.hostapi.layout import AGENT_PORT
from skyferry.providers.local import UNDERLAY, LocalProvider


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


class Pinger:
    """ICMP echo from netns `ns` to `dst` (no ping binary on this machine); one request per `interval`."""

    def __init__(self, ns: str, dst: str, interval: float) -> None:
        with in_netns(ns):
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        self.dst, self.interval = dst, interval
        self.ident = threading.get_native_id() & 0xFFFF
        self.sent: dict[int, float] = {}
        self.rtts: dict[int, float] = {}
        self._stop = threading.Event()  # no more requests
        self._done = threading.Event()  # no more waiting for replies
        self._threads = [threading.Thread(target=self._send), threading.Thread(target=self._receive)]

    def once(self, seq: int) -> None:
        payload = struct.pack("!d", time.perf_counter()) + b"x" * 48
        header = struct.pack("!BBHHH", 8, 0, 0, self.ident, seq & 0xFFFF)
        packet = struct.pack("!BBHHH", 8, 0, _checksum(header + payload), self.ident, seq & 0xFFFF) + payload
        self.sent[seq] = time.perf_counter()
        self.sock.sendto(packet, (self.dst, 0))

    def _send(self) -> None:
        seq = 0
        while not self._stop.is_set():
            self.once(seq)
            seq += 1
            self._stop.wait(self.interval)

    def _receive(self) -> None:
        self.sock.settimeout(0.05)
        while not self._done.is_set():
            try:
                data = self.sock.recv(2048)
            except TimeoutError:
                continue
            ihl = (data[0] & 0x0F) * 4
            kind, _, _, ident, seq = struct.unpack("!BBHHH", data[ihl : ihl + 8])
            if kind == 0 and ident == self.ident and seq in self.sent:
                self.rtts.setdefault(seq, time.perf_counter() - self.sent[seq])

    def start(self) -> "Pinger":
        for t in self._threads:
            t.start()
        return self

    def stop(self, grace: float = 2.0) -> None:
        self._stop.set()
        self._threads[0].join()
        deadline = time.monotonic() + grace
        while len(self.rtts) < len(self.sent) and time.monotonic() < deadline:
            time.sleep(0.02)
        self._done.set()
        self._threads[1].join()
        self.sock.close()

    @property
    def lost(self) -> list[int]:
        return sorted(set(self.sent) - set(self.rtts))

    def median_rtt(self) -> float:
        return statistics.median(self.rtts.values())


def rtt(ns: str, dst: str, count: int, interval: float = 0.05) -> Pinger:
    """Send `count` echoes and wait for the answers."""
    p = Pinger(ns, dst, interval)
    p._threads[0] = threading.Thread(target=lambda: [p.once(s) or time.sleep(interval) for s in range(count)])
    p.start()
    p.stop()
    return p


@dataclass
class Stream:
    """A TCP client in one netns that sends a numbered line every `interval` and reads the echo back."""

    sock: socket.socket
    interval: float
    sent: int = 0
    echoed: list[tuple[int, float]] = field(default_factory=list)  # (number, when it came back)
    error: BaseException | None = None
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        reader = self.sock.makefile("rb")
        try:
            while not self.stop.is_set():
                self.sock.sendall(f"{self.sent}\n".encode())
                self.sent += 1
                line = reader.readline()
                if not line:
                    raise ConnectionError("server closed the stream")
                self.echoed.append((int(line), time.monotonic()))
                self.stop.wait(self.interval)
        except BaseException as exc:
            self.error = exc

    def max_gap(self) -> float:
        times = [t for _, t in self.echoed]
        return max(b - a for a, b in itertools.pairwise(times))


@contextmanager
def echo_server(ns: str, address: str, port: int) -> Iterator[None]:
    """A line echo server listening on address:port inside netns `ns` (a stand-in container process)."""
    with in_netns(ns):
        listener = socket.create_server((address, port))
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=echo, args=(conn,), daemon=True).start()

    def echo(conn: socket.socket) -> None:
        with conn:
            for line in conn.makefile("rb"):
                conn.sendall(line)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        listener.close()


@contextmanager
def stream(ns: str, address: str, port: int, interval: float) -> Iterator[Stream]:
    with in_netns(ns):
        sock = socket.create_connection((address, port), timeout=10)
    s = Stream(sock, interval)
    thread = threading.Thread(target=s.run, daemon=True)
    thread.start()
    try:
        yield s
    finally:
        s.stop.set()
        thread.join(timeout=15)
        sock.close()


def state_left(state: Path) -> list[str]:
    """What a torn-down mesh left in its state directory: any file but the store, any row in the store."""
    database = (store.FILE, f"{store.FILE}-wal", f"{store.FILE}-shm")
    found = [f"file {p.name}" for p in state.iterdir() if p.name not in database]
    if (state / store.FILE).exists():
        with closing(sqlite3.connect(state / store.FILE)) as conn:
            tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
            assert set(store.MESH_TABLES + store.IPAM_TABLES) <= set(tables)  # positive control: the right file
            for table in tables:
                if (rows := conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]) and table != "sqlite_sequence":
                    found.append(f"{rows} rows in {table}")
    return found


def leftovers(run_id: str, cidr: str = "100.64.0.0/16") -> list[str]:
    """Every trace of mesh `run_id` on this machine: namespaces, sockets, processes, root interfaces/routes."""
    found = [f"netns {p.name}" for p in netns.RUN_DIR.glob(f"{run_id}-*")] if netns.RUN_DIR.exists() else []
    found += [f"socket {p}" for p in wg.SOCKET_DIR.glob(f"{run_id}-*")] if wg.SOCKET_DIR.exists() else []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(run_id.encode() in a for a in argv) and b"pytest" not in b" ".join(argv):
            found.append(f"process {proc.name}: {b' '.join(argv).decode(errors='replace')}")
    with IPRoute() as ipr:
        found += [f"root link {n}" for n in (link.get("ifname") for link in ipr.get_links()) if run_id in n]
        for r in ipr.get_routes(family=2, table=254):
            dst = r.get("RTA_DST")
            if dst and any(ipaddress.ip_address(dst) in ipaddress.ip_network(n) for n in (cidr, UNDERLAY)):
                found.append(f"root route {dst}/{r['dst_len']}")
    return found


@contextmanager
def mesh_up(state: Path, run_id: str, count: int, wan: str | None = None, cidr: str | None = None) -> Iterator[Mesh]:
    provider = LocalProvider(state, cidr=cidr, wan_spec=WanSpec.parse(wan) if wan else None)
    try:
        mesh, created = provider.up(count, run_id)
        assert created
        yield mesh
    finally:
        provider.down()


def host_routes(ipr: Any, ip: str) -> list[int]:
    """Output interfaces of the /32 routes for `ip` in the main table (a dump: `dst=` would do a lookup)."""
    return [
        r.get("RTA_OIF") for r in ipr.get_routes(family=2, table=254) if r["dst_len"] == 32 and r.get("RTA_DST") == ip
    ]


AGENT_REQUEST = b"GET /v1/facts HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n"


def open_agent(m: Mesh, host: str) -> socket.socket:
    """A TCP connection to `host`'s agent from the controller's netns."""
    with in_netns(m.controller.netns):
        return socket.create_connection((m.hosts[host].overlay_ip, AGENT_PORT), 5)


def ask_agent(m: Mesh, host: str, ctx: ssl.SSLContext) -> bytes | Exception:
    """One raw HTTPS request (AGENT_REQUEST) to `host`'s agent with `ctx`: the reply's bytes, or the error.
    Any HTTP reply means the agent accepted the certificate (what it may then do is authorization's part)."""
    sock = open_agent(m, host)
    try:
        tls = ctx.wrap_socket(sock, server_hostname=m.hosts[host].overlay_ip)
        tls.sendall(AGENT_REQUEST)
        reply = b""
        while chunk := tls.recv(65536):
            reply += chunk
        return reply
    except (ssl.SSLError, OSError) as exc:
        return exc
    finally:
        sock.close()


def http_get(conn: http.client.HTTPConnection, netns: str | None, path: str) -> tuple[int, bytes]:
    """GET `path` over `conn`, connected from inside `netns`; the status and the body."""
    with in_netns(netns):
        conn.connect()
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()
