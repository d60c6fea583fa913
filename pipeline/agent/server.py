"""The host agent: HTTPS with mutual TLS on the host's overlay address, in front of HostOps.

Routes (JSON in, JSON out; errors are {"error", "hint"} with 4xx/5xx):
  GET    /v1/facts                          kernel, CRIU version and features, CPU flags
  GET    /v1/capacity                       free memory and CPU, for placement (pipeline/agent/capacity.py)
  GET    /v1/containers                     list
  POST   /v1/containers                     run a ContainerSpec
  GET    /v1/containers/NAME                one container
  GET    /v1/containers/NAME/logs           raw log bytes
  DELETE /v1/containers/NAME                stop and remove
  POST   /v1/containers/NAME/route          {"present": bool}: this host's /32 route to the container
  POST   /v1/migrations/ID/OP               OP in prepare, precopy, precopy-reset, checkpoint, send, hold, restore,
                                            rollback-source, confirm-source, abort-target,
                                            finish-target, and the test-cutover clone-* operations
                                            (pipeline/agent/clone.py)
  PUT    /v1/migrations/ID/STREAM?name=N    from the source agent (chunked): STREAM is `receive` (stop-copy:
                                            images and payload in one tar), `precopy-round`, or
                                            `precopy-final` (builds the image from the pre-copied store),
                                            `lazy-final` (hybrid: a lazy dump and the clean map), or
                                            `fs-round` (files changed since the last round)
"""

import base64
import json
import logging
import os
import re
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from skyferry.pipeline.agent import capacity, clone, facts
from skyferry.pipeline.agent.host import HostConfig, HostOps
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.files import wire
from skyferry.pipeline.files.fsync import FsStats
from skyferry.pipeline.hostapi import faults
from skyferry.pipeline.hostapi.client import AgentClient, bound_stalls
from skyferry.pipeline.hostapi.layout import AGENT_PORT
from skyferry.pipeline.hostapi.pki import Identity
from skyferry.pipeline.hostapi.spec import ContainerSpec
from skyferry.pipeline.memory import lazypages
from skyferry.pipeline.memory.policy import ConvergencePolicy

MIGRATION_ID = re.compile(r"[A-Za-z0-9_-]+")  # it names directories (images, logs)
PAGE_SERVER = re.compile(r"\d{1,3}(\.\d{1,3}){3}:\d{1,5}")  # a source's CRIU page server, addr:port
log = logging.getLogger("skyferry.agent")


class _ChunkedReader:
    """Decodes an HTTP/1.1 chunked request body from the handler's rfile."""

    def __init__(self, rfile: Any) -> None:
        self.rfile = rfile
        self.left = 0
        self.done = False

    def read(self, size: int = -1) -> bytes:
        if self.done:
            return b""
        if self.left == 0:
            line = self.rfile.readline(65537)
            if not line:
                raise SkyferryError("image stream ended early (connection lost)")
            self.left = int(line.split(b";")[0].strip(), 16)
            if self.left < 0:  # read(-n) would wait for the client to hang up
                raise ValueError(f"bad chunk size {line[:20]!r}")
            if self.left == 0:
                while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                self.done = True
                return b""
        want = self.left if size is None or size < 0 else min(size, self.left)
        data = self.rfile.read(want)
        if not data:
            raise SkyferryError("image stream ended early (connection lost)")
        self.left -= len(data)
        if self.left == 0:
            self.rfile.readline(3)  # CRLF after each chunk
        return data


class Agent:
    def __init__(self, ops: HostOps, identity: Identity) -> None:
        self.ops = ops
        self.identity = identity
        self.peer_ctx = identity.client_context()
        self._peers: dict[tuple[str, int], AgentClient] = {}
        self._peers_lock = threading.Lock()

    def handle(self, method: str, path: str, query: dict[str, list[str]], body: Any) -> Any:
        parts = [p for p in path.split("/") if p][1:]  # drop "v1"
        ops = self.ops
        match method, parts:
            case "GET", ["facts"]:
                return facts.collect(ops.cfg.name, ops.runtimes)
            case "GET", ["capacity"]:
                return capacity.collect(ops)
            case "GET", ["containers"]:
                return ops.list()
            case "POST", ["containers"]:
                spec = ContainerSpec.from_dict(body)
                with ops.lock(spec.name):
                    return ops.run(spec)
            case "GET", ["containers", name]:
                return ops.info(name)
            case "GET", ["containers", name, "logs"]:
                return ops.logs(name)
            case "POST", ["containers", name, "route"]:
                ops.set_route(name, bool(body["present"]))
                return {"ok": True}
            case "DELETE", ["containers", name]:
                with ops.lock(name):
                    ops.remove(name)
                return {"removed": name}
            case "POST", ["migrations", mig, op] if MIGRATION_ID.fullmatch(mig):  # not `..`: it names a dir
                return self._migration_op(mig, op, body)
        raise _NotFound(f"no route {method} {path}")

    def _migration_op(self, mig: str, op: str, body: dict[str, Any]) -> Any:
        ops = self.ops
        name = body["name"]
        faults.check(ops.cfg.state_root, op)
        with ops.lock(name):
            match op:
                case "prepare":
                    ops.prepare(mig, ContainerSpec.from_dict(body["spec"]))
                    return {"ok": True}
                case "checkpoint":
                    return ops.checkpoint(mig, name, lazy=bool(body.get("lazy")))
                case "precopy":
                    return self._precopy(mig, name, body["target"], body.get("policy", {}))
                case "precopy-reset":
                    ops.precopy_reset(mig, name)
                    return {"ok": True}
                case "send":
                    return self._send(mig, name, body["target"])
                case "hold":
                    return {"held": ops.hold(mig, [base64.b64decode(p) for p in body["packets"]])}
                case "restore":
                    return ops.restore(mig, name, page_server=body.get("page_server"))
                case "rollback-source":
                    return ops.rollback_source(mig, name)
                case "confirm-source":
                    return ops.confirm_source(mig, name)
                case "abort-target":
                    ops.abort_target(mig, name)
                    return {"ok": True}
                case "finish-target":
                    return ops.finish_target(mig)
                case op if op in clone.OPS:
                    return clone.dispatch(self.ops, self.peer_ctx, mig, op, body)
        raise _NotFound(f"no migration operation {op!r}")

    def _peer(self, target: dict[str, Any], lane: str = "mem") -> AgentClient:
        """One kept-alive client per peer and lane: the connections warmed by the pre-copy rounds carry
        the final deltas inside the freeze without a new TCP and TLS handshake across the WAN. Memory
        and files use separate lanes, so their finals travel side by side."""
        key = (target["address"], int(target.get("port", AGENT_PORT)), lane)
        with self._peers_lock:
            if key not in self._peers:
                self._peers[key] = AgentClient(key[0], key[1], self.peer_ctx)
            return self._peers[key]

    def _upload(self, peer: AgentClient, path: str, chunks: Iterable[bytes]) -> Any:
        """PUT a stream to a peer agent; fault drills may damage it on the way (faults.corrupt)."""
        return peer.upload(path, faults.corrupt(self.ops.cfg.state_root, path, chunks))

    def _precopy(self, mig: str, name: str, target: dict[str, Any], policy: dict[str, Any]) -> dict[str, Any]:
        """Memory rounds streamed straight to the target agent's store while the container runs."""
        peer, fs_peer = self._peer(target), self._peer(target, "fs")
        peer.call("POST", f"/v1/migrations/{mig}/precopy-reset", {"name": name})
        mem_path = f"/v1/migrations/{mig}/precopy-round?name={name}"
        fs_path = f"/v1/migrations/{mig}/fs-round?name={name}"
        return self.ops.precopy(
            mig,
            name,
            lambda chunks: self._upload(peer, mem_path, chunks),
            lambda chunks: self._upload(fs_peer, fs_path, chunks),
            ConvergencePolicy(**policy),
        )

    def _send(self, mig: str, name: str, target: dict[str, Any]) -> dict[str, Any]:
        """Stream the frozen container's state straight to the target agent, and the client segments our
        lock has dropped so far (the target replays them at its restore, so those clients need not wait
        out their back-off).

        After pre-copy rounds only the deltas travel: the memory pages and the files changed since the
        last round (each stream checksummed frame by frame), side by side on two lanes, the segments
        after the files. Without rounds (stop-copy) the whole image and payload go as one tar, whose
        SHA-256 both ends must agree on.
        """
        peer, fs_peer = self._peer(target), self._peer(target, "fs")
        t0 = time.monotonic()
        # After a lazy dump the target starts its pager as soon as the images are in (HostOps.start_pager).
        lazy = f"&page_server={self.ops.page_server(mig)}" if mig in self.ops.lazy_dumps else ""
        final = self.ops.final_out(mig, name)
        fs_stats = FsStats()
        fs_final = self.ops.fs_final_out(mig, name, fs_stats)
        if final is not None and fs_final is not None:
            kind, chunks, mem_stats = final

            def files_then_segments() -> int:
                self._upload(fs_peer, f"/v1/migrations/{mig}/fs-round?name={name}", fs_final)
                return self._hand_over(fs_peer, mig, name)

            with ThreadPoolExecutor(1) as pool:
                side = pool.submit(files_then_segments)
                self._upload(peer, f"/v1/migrations/{mig}/{kind}?name={name}{lazy}", chunks)
                t_mem = time.monotonic()
                handed_over = side.result()
            return {
                "memory_s": round(t_mem - t0, 4),
                "fs_s": round(time.monotonic() - t0, 4),
                "final": mem_stats.as_dict(),
                "fs_final": fs_stats.as_dict(),
                "bytes_raw": mem_stats.bytes_raw + fs_stats.bytes_raw,
                "bytes_wire": mem_stats.bytes_out + fs_stats.bytes_wire,
                "segments_handed_over": handed_over,
                "seconds": time.monotonic() - t0,
            }
        stats = wire.StreamStats()
        received = self._upload(
            peer, f"/v1/migrations/{mig}/receive?name={name}{lazy}", self.ops.stream_out(mig, name, stats)
        )
        if received.get("sha256") != stats.sha256:
            raise SkyferryError(
                f"image stream for {name!r} arrived corrupted (digest mismatch); nothing was restored",
                hint="the migration rolls back; check the link and retry",
            )
        return {
            "bytes_raw": stats.bytes_raw,
            "bytes_wire": stats.bytes_wire,
            "segments_handed_over": self._hand_over(peer, mig, name),
            "seconds": time.monotonic() - t0,
            "sha256": stats.sha256,
        }

    def _hand_over(self, peer: AgentClient, mig: str, name: str) -> int:
        """Pass the segments our lock has dropped so far to the target; how many."""
        held = self.ops.held_segments(mig)
        if held:
            packets = [base64.b64encode(p).decode() for p in held]
            peer.call("POST", f"/v1/migrations/{mig}/hold", {"name": name, "packets": packets})
        return len(held)

    def stream_in(self, mig: str, kind: str, query: dict[str, list[str]], reader: Any) -> Any:
        name = query["name"][0]
        faults.check(self.ops.cfg.state_root, kind)
        page_server = query.get("page_server", [""])[0]
        if page_server and not PAGE_SERVER.fullmatch(page_server):
            raise SkyferryError(f"bad page server address {page_server!r}")
        with self.ops.lock(name):
            match kind:
                case "receive":
                    stats = self.ops.receive(mig, name, reader)
                    if page_server:
                        self.ops.start_pager(mig, page_server)
                    return {"bytes_wire": stats.bytes_wire, "sha256": stats.sha256}
                case "precopy-round":
                    return self.ops.precopy_apply(mig, reader)
                case "precopy-final":
                    return self.ops.precopy_build(mig, reader)
                case "lazy-final":
                    accepted = self.ops.lazy_final_accept(mig, reader)
                    if page_server:
                        self.ops.start_pager(mig, page_server)
                    return accepted
                case "fs-round":
                    return self.ops.fs_apply(mig, reader)
        raise _NotFound(f"no stream {kind!r}")


class _NotFound(Exception):
    pass


def _handler(agent: Agent) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "skyferry-agent"

        def log_message(self, fmt: str, *args: Any) -> None:
            log.info("%s %s", self.client_address[0], fmt % args)

        def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
            """http.server's own refusals (bad request line, unknown method) in the API's JSON shape; an
            unknown method is 405, not 501 (the agent is complete, the caller asked for something else)."""
            if code == HTTPStatus.NOT_IMPLEMENTED:
                code = HTTPStatus.METHOD_NOT_ALLOWED
            self.close_connection = True
            self._reply(code, {"error": message or HTTPStatus(code).phrase, "hint": None})

        def _reply(self, status: int, payload: Any) -> None:
            if isinstance(payload, bytes):
                data, ctype = payload, "application/octet-stream"
            else:
                data, ctype = json.dumps(payload, default=str).encode(), "application/json"
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _dispatch(self, fn: Callable[[], Any]) -> None:
            try:
                self._reply(HTTPStatus.OK, fn())
            except _NotFound as exc:
                self._reply(HTTPStatus.NOT_FOUND, {"error": str(exc), "hint": None})
            except SkyferryError as exc:
                log.warning("%s %s: %s", self.command, self.path, exc)
                self._reply(HTTPStatus.CONFLICT, {"error": str(exc), "hint": exc.hint})
            except (KeyError, ValueError, TypeError) as exc:
                self._reply(HTTPStatus.BAD_REQUEST, {"error": f"bad request: {exc!r}", "hint": None})
                self.close_connection = True
            except Exception as exc:  # an agent bug must not kill the agent
                log.exception("%s %s failed", self.command, self.path)
                self._reply(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"agent error: {exc!r}", "hint": None})

        def _length(self) -> int:
            length = int(self.headers.get("Content-Length") or 0)
            if length < 0:  # read(-n) would wait for the client to hang up
                raise ValueError(f"bad Content-Length {length}")
            return length

        def _json_body(self) -> Any:
            length = self._length()
            if length > 1 << 20:
                raise ValueError("request body too large")
            return json.loads(self.rfile.read(length)) if length else {}

        def _route(self) -> None:
            url = urlsplit(self.path)
            if not re.fullmatch(r"/v1(/[A-Za-z0-9._-]+)+", url.path):
                self._reply(HTTPStatus.NOT_FOUND, {"error": "not found", "hint": None})
                return
            query = parse_qs(url.query)
            streams = "receive|precopy-round|precopy-final|lazy-final|fs-round"
            m = re.fullmatch(rf"/v1/migrations/([A-Za-z0-9_-]+)/({streams})", url.path)
            if self.command == "PUT" and m:
                chunked = self.headers.get("Transfer-Encoding", "").lower() == "chunked"
                self._dispatch(
                    lambda: agent.stream_in(
                        m.group(1),
                        m.group(2),
                        query,
                        _ChunkedReader(self.rfile) if chunked else _LimitedReader(self.rfile, self._length()),
                    )
                )
                return
            self._dispatch(lambda: agent.handle(self.command, url.path, query, self._json_body()))

        do_GET = do_POST = do_DELETE = do_PUT = _route

    return Handler


class _LimitedReader:
    def __init__(self, rfile: Any, length: int) -> None:
        self.rfile, self.left = rfile, length

    def read(self, size: int = -1) -> bytes:
        n = self.left if size is None or size < 0 else min(size, self.left)
        data = self.rfile.read(n) if n else b""
        self.left -= len(data)
        return data


class _TLSServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], ctx: ssl.SSLContext) -> None:
        super().__init__(address, handler)
        self.ctx = ctx

    def get_request(self) -> tuple[Any, Any]:
        sock, addr = self.socket.accept()
        sock.settimeout(600)
        bound_stalls(sock)  # a receive from a peer that vanished must not hold the container's lock
        # A reply goes out as headers, then body: with Nagle the body waited for the ACK of the headers
        # (a round trip plus the peer's delayed ACK: 70 ms per call across a 30 ms WAN, in the freeze).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # The handshake happens in the worker thread, so a slow or hostile client cannot block accept().
        return self.ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), addr

    def finish_request(self, request: Any, client_address: Any) -> None:
        try:
            request.do_handshake()
        except (ssl.SSLError, OSError) as exc:
            log.warning("refused %s: %s", client_address[0], exc)
            return
        super().finish_request(request, client_address)


def serve(cfg: HostConfig, identity: Identity, listen: str, port: int = AGENT_PORT) -> None:
    """Run until SIGTERM. `listen` is the host's overlay address: the agent never binds elsewhere."""
    ops = HostOps(cfg)
    for pid in lazypages.stop_strays(ops.images_root):  # an earlier agent died mid lazy restore
        log.warning("stopped lazy-pages daemon %d left behind by an earlier agent", pid)
    agent = Agent(ops, identity)
    server = _TLSServer((listen, port), _handler(agent), identity.server_context())
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    log.info("agent for %s listening on %s:%d (pid %d)", cfg.name, listen, port, os.getpid())
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        ops.shutdown()


def identity_for(state_root: Path) -> Identity:
    tls = state_root / "tls"
    return Identity(ca=tls / "ca.pem", cert=tls / "cert.pem", key=tls / "key.pem")


def remove_all(cfg: HostConfig) -> list[str]:
    """Remove every container of this host, whether or not its agent still runs (a host going down)."""
    ops = HostOps(cfg)
    names = [c["name"] for c in ops.list()]
    for name in names:
        ops.remove(name)
    return names
