"""The host agent: HTTPS with mutual TLS on the host's overlay address. Routing only: container requests
go to the `Host`, migration steps to the migration's `SourceSession` or `TargetSession`, by name.

Routes (JSON in, JSON out; errors are {"error", "hint"} with 4xx/5xx, "log": the failing tool's log tail,
and "restore": "not asked" or "failed" when a transfer that carried the restore failed):
  GET    /v1/facts                          kernel, CRIU version and kernel features, CPU flags
  GET    /v1/cpuinfo                        {"image": base64}: this CPU as `criu cpuinfo dump` describes it
                                            (null on architectures where CRIU has no cpuinfo)
  POST   /v1/cpuinfo/check                  {"image": base64} of another host's: {"ok", "error"} of
                                            `criu cpuinfo check` here (the check stage, before any freeze)
  GET    /v1/capacity                       free memory and CPU, for placement (pipeline/agent/capacity.py)
  GET    /v1/containers                     list
  POST   /v1/containers                     run a ContainerSpec
  GET    /v1/containers/NAME                one container
  GET    /v1/containers/NAME/logs           raw log bytes
  GET    /v1/containers/NAME/preflight      process shapes CRIU cannot dump, found while it runs
                                            (agent/preflight.py); ?forks=later: auto's rounds count the forks
  POST   /v1/containers/NAME/exec           {"args", "stdin", "timeout"}: run a command inside the container
                                            (hostapi/execute.py); {"exit_code", "stdout", "stderr"}
  DELETE /v1/containers/NAME                stop and remove
  POST   /v1/containers/NAME/route          {"present": bool}: this host's /32 route to the container
  GET    /v1/doctor                         every `skyferry doctor` check, run on this host
  PUT    /v1/mesh/peers                     {"peers", "remove"}: this host's WireGuard peers (routes.PeerUpdate)
  POST   /v1/tls/csr                        {"csr_pem"}: a new key made here and its signing request (mesh rotate)
  PUT    /v1/tls/cert                       {"cert_pem"}: install the certificate for that key (agent/certs.py)
  PUT    /v1/tls/revoked                    {"serials"}: the controller's revocation list (hostapi/revocation.py);
                                            open connections of peers it now revokes are cut ({"cut": n})
  POST   /v1/containers/NAME/ingress        {"ports": ["80", "443=8443/tcp", …]}: DNAT exactly these ports of
                                            this host's addresses to the container here (pipeline/agent/dnat.py)
  DELETE /v1/containers/NAME/ingress        drop the container's published ports (it may have left already)
  GET    /v1/ingress                        every published port on this host
  GET    /v1/metrics                        Prometheus exposition (text/plain): pipeline/agent/metrics.py
  POST   /v1/migrations/ID/OP               OP is a step of the source (SOURCE_OPS: SourceSession's methods),
                                            of the target (TARGET_OPS: TargetSession's; `lazy` waits for the
                                            last lazy page), or a test-cutover
                                            clone-* operation (pipeline/agent/clone.py)
  PUT    /v1/migrations/ID/STREAM?name=N    from the source agent (chunked): STREAM is `receive` (stop-copy:
                                            images and payload in one tar), `precopy-round`, or
                                            `precopy-final` (builds the image from the pre-copied store),
                                            `lazy-final` (hybrid: a lazy dump and the clean map), or
                                            `fs-round` (files changed since the last round); TargetSession
                                            handles each in the method of the same name

Who may call what (ACCESS, checked before a request body is read): every certificate names its holder's
role and name (pipeline/hostapi/pki.py). Everything is the controller's, except what one host sends
another during a migration: the streams above and the target steps `precopy-reset` and `hold` (the
transfer's last request, which may carry the restore: the target restores as soon as the bytes are in),
and `abort` (the controller's too: the source's freeze watchdog fences the target with it). Those
only the host the controller bound to that migration id may call: `prepare` (and a test cutover's
`clone-prepare`) names the source host as `peer`, and the target takes that migration's streams from a
certificate of that name, with the host role, and from nobody else (the controller included). A refusal
is 403 with a JSON {"error", "hint"}; a certificate without a role (made before roles existed) is
refused on every route. A `monitor` certificate (`skyferry mesh issue-monitor-cert`, for Prometheus)
may read the metrics and nothing else. Every body is a pydantic model (pipeline/hostapi/bodies.py): a malformed one,
a bad container name in the path, or a rootfs or image outside the host's imports directory is a 400.
"""

import base64
import contextlib
import json
import logging
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import parse_qs, urlencode, urlsplit

from skyferry.netplane import routes
from skyferry.pipeline.agent import capacity, clone, dnat, doctor, facts, freeze, metrics
from skyferry.pipeline.agent.certs import LiveIdentity, NewCert
from skyferry.pipeline.agent.host import Host, HostConfig
from skyferry.pipeline.agent.source import Lane, SourceSession, expire
from skyferry.pipeline.agent.target import TargetSession, stop_unfinished_lazy
from skyferry.pipeline.errors import CarriedRestore, SkyferryError
from skyferry.pipeline.hostapi import bodies, compat, faults, pki, privdir
from skyferry.pipeline.hostapi.client import AgentClient
from skyferry.pipeline.hostapi.execute import ExecRequest, ExecResult
from skyferry.pipeline.hostapi.layout import AGENT_PORT, IMAGES_TMPFS
from skyferry.pipeline.hostapi.pki import Identity
from skyferry.pipeline.hostapi.publish import PublicPort
from skyferry.pipeline.hostapi.revocation import RevocationList
from skyferry.pipeline.hostapi.spec import SPEC_NAME, ContainerSpec
from skyferry.pipeline.hostapi.tlsserver import TLSServer
from skyferry.pipeline.memory import lazypages
from skyferry.pipeline.memory.pagetunnel import PageSource
from skyferry.pipeline.memory.policy import ConvergencePolicy

SOURCE_OPS = ("connect", "precopy", "checkpoint", "transfer", "rollback", "confirm")  # SourceSession's steps
TARGET_OPS = ("prepare", "precopy-reset", "hold", "restore", "lazy", "abort", "cleanup")  # TargetSession's steps
MIGRATION_ID = re.compile(r"[A-Za-z0-9_-]+")  # it names directories (images, logs)
STREAMS = ("receive", "precopy-round", "precopy-final", "lazy-final", "fs-round")  # TargetSession's streams
CONTROLLER, PEER = "controller", "peer"  # the controller's certificate; the migration's bound source host
CONTROLLER_OR_PEER = "controller or peer"
CONTROLLER_OR_MONITOR = "controller or monitor"  # a monitor certificate reads metrics and nothing else
# Every route and who may call it (the path after /v1/; NAME and OP are one segment, ID a migration id).
# The first match decides; a path that matches none is the controller's (and then most likely a 404).
ACCESS: tuple[tuple[str, str, str], ...] = (
    ("GET", "facts", CONTROLLER),
    ("GET", "cpuinfo", CONTROLLER),
    ("POST", "cpuinfo/check", CONTROLLER),
    ("GET", "capacity", CONTROLLER),
    ("GET", "doctor", CONTROLLER),
    ("GET", "containers", CONTROLLER),
    ("POST", "containers", CONTROLLER),
    ("GET", "containers/NAME", CONTROLLER),
    ("GET", "containers/NAME/logs", CONTROLLER),
    ("GET", "containers/NAME/preflight", CONTROLLER),
    ("POST", "containers/NAME/exec", CONTROLLER),
    ("DELETE", "containers/NAME", CONTROLLER),
    ("POST", "containers/NAME/route", CONTROLLER),
    ("POST", "containers/NAME/ingress", CONTROLLER),
    ("DELETE", "containers/NAME/ingress", CONTROLLER),
    ("GET", "ingress", CONTROLLER),
    ("GET", "metrics", CONTROLLER_OR_MONITOR),
    ("PUT", "mesh/peers", CONTROLLER),
    ("POST", "tls/csr", CONTROLLER),
    ("PUT", "tls/cert", CONTROLLER),
    ("PUT", "tls/revoked", CONTROLLER),
    ("POST", "migrations/ID/(precopy-reset|hold)", PEER),
    ("POST", "migrations/ID/abort", CONTROLLER_OR_PEER),  # the source's freeze watchdog fences the target
    ("POST", "migrations/ID/OP", CONTROLLER),
    ("PUT", f"migrations/ID/({'|'.join(STREAMS)})", PEER),
)
_SHAPES = [
    (method, re.compile(shape.replace("NAME", "[^/]+").replace("OP", "[^/]+").replace("ID", MIGRATION_ID.pattern)), who)
    for method, shape, who in ACCESS
]
log = logging.getLogger("skyferry.agent")
# A first rounds' connection idle longer than this opens anew: TCP restarted its window after an RTO idle
# anyway, and an agent closes a connection idle for 600 s.
BULK_KEEP_S = 30.0


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
    """Routes each request to the host (containers) or to the migration's session, by the step's name."""

    def __init__(self, host: Host, identity: Identity) -> None:
        self.host = host
        self.identity = identity
        self.live = LiveIdentity(identity)  # renewed and revocation-checked without a restart
        self.recheck: Callable[[], int] = lambda: 0  # cuts open connections of peers revoked since (serve)
        self._peers: dict[tuple[str, int, str, str], AgentClient] = {}  # (address, port, lane, migration)
        self._peers_lock = threading.Lock()
        self._bulk: dict[tuple[str, int], list[tuple[AgentClient, float]]] = {}  # idle, most recent last

    def authorize(self, caller: tuple[str | None, str], method: str, path: str) -> None:
        """Raise _Forbidden unless `caller` ((role, name) of its certificate) may call `method path`."""
        role, name = caller
        if role is None:
            raise _Forbidden(
                f"the certificate of {name!r} carries no role (it was issued before roles existed)",
                hint="re-issue the mesh's certificates: skyferry mesh rotate",
            )
        rest = path.removeprefix("/v1/")
        who = next((who for m, shape, who in _SHAPES if m == method and shape.fullmatch(rest)), CONTROLLER)
        if who == CONTROLLER_OR_MONITOR:
            if role not in (pki.CONTROLLER, pki.MONITOR):
                raise _Forbidden(f"{method} {path} is the controller's and monitors'; {role} {name!r} may not call it")
            return
        if who == CONTROLLER or (who == CONTROLLER_OR_PEER and role == pki.CONTROLLER):
            if role != pki.CONTROLLER:
                raise _Forbidden(f"{method} {path} is the controller's; {role} {name!r} may not call it")
            return
        mig = rest.split("/")[1]
        bound = self.host.peer(mig)
        if role != pki.HOST or name != bound:
            why = f"it takes them from {bound} only" if bound else f"{self.host.cfg.name} was not prepared for it"
            raise _Forbidden(f"{role} {name!r} may not send migration {mig}'s streams: {why}")

    def handle(self, method: str, path: str, query: dict[str, list[str]], body: Any) -> Any:
        parts = [p for p in path.split("/") if p][1:]  # drop "v1"
        if parts[:1] == ["containers"] and len(parts) > 1 and not SPEC_NAME.fullmatch(parts[1]):
            raise ValueError(f"bad container name {parts[1]!r}")  # it names a bundle and a netns
        host = self.host
        match method, parts:
            case "GET", ["facts"]:
                faults.check(host.cfg.state_root, "facts")
                return facts.collect(host.cfg.name, host.runtimes, host.cfg.wg_interface)
            case "GET", ["cpuinfo"]:
                image = facts.cpuinfo_image()
                return {"image": base64.b64encode(image).decode() if image else None}
            case "POST", ["cpuinfo", "check"]:
                return facts.cpuinfo_check(bodies.CpuinfoCheck.model_validate(body).image)
            case "GET", ["doctor"]:
                return doctor.report()
            case "GET", ["capacity"]:
                return capacity.collect(host)
            case "GET", ["containers"]:
                return host.list()
            case "POST", ["containers"]:
                spec = ContainerSpec.from_dict(body)
                with host.lock(spec.name):
                    return host.run(spec)
            case "GET", ["containers", name]:
                return host.info(name)
            case "GET", ["containers", name, "logs"]:
                return host.logs(name)
            case "GET", ["containers", name, "preflight"]:
                forks = bodies.PreflightQuery.model_validate({k: v[0] for k, v in query.items()}).forks
                return [asdict(f) for f in host.preflight(name, forks)]
            case "POST", ["containers", name, "exec"]:
                req = ExecRequest.model_validate(body)
                done = host.exec(name, req.args, base64.b64decode(req.stdin), req.timeout)
                return ExecResult.of(*done).model_dump()
            case "POST", ["containers", name, "route"]:
                host.set_route(name, bodies.Route.model_validate(body).present)
                return {"ok": True}
            case "POST", ["containers", name, "ingress"]:
                ports = [PublicPort.parse(p) for p in bodies.Ingress.model_validate(body).ports]
                with host.lock(name):
                    return {"published": host.publish(name, ports)}
            case "DELETE", ["containers", name, "ingress"]:
                return {"removed": dnat.unpublish(name)}
            case "GET", ["ingress"]:
                return dnat.published()
            case "GET", ["metrics"]:
                return _Text(metrics.exposition(), metrics.CONTENT_TYPE)
            case "DELETE", ["containers", name]:
                with host.lock(name):
                    host.remove(name)
                return {"removed": name}
            case "PUT", ["mesh", "peers"]:
                faults.check(host.cfg.state_root, "peers")
                routes.configure(None, host.cfg.wg_interface, routes.PeerUpdate.model_validate(body))
                return {"ok": True}
            case "POST", ["tls", "csr"]:
                return {"csr_pem": self.live.csr(host.cfg.name)}
            case "PUT", ["tls", "cert"]:
                return {"serial": self.live.install(NewCert.model_validate(body))}
            case "PUT", ["tls", "revoked"]:
                self.live.revoked.write(RevocationList.model_validate(body))
                return {"ok": True, "cut": self.recheck()}
            case "POST", ["migrations", mig, op] if MIGRATION_ID.fullmatch(mig):  # not `..`: it names a dir
                return self._step(mig, op, body)
        raise _NotFound(f"no route {method} {path}")

    def _step(self, mig: str, op: str, body: Any) -> Any:
        if op not in SOURCE_OPS + TARGET_OPS + clone.OPS:
            raise _NotFound(f"no migration operation {op!r}")
        req = bodies.STEPS[op].model_validate(body)
        faults.check(self.host.cfg.state_root, op)
        waited = 0.0
        if isinstance(req, bodies.Hold) and req.restore and req.after:  # outside the lock the streams need
            finals = TargetSession.of(self.host, mig, req.name).finals
            waited = finals.wait(req.after.transfer, list(req.after.streams), req.restore.freeze_deadline)
        with self.host.lock(req.name):
            if isinstance(req, bodies.Prepare):  # the source host whose streams this migration takes
                self.host.bind(mig, req.peer)
            if op in clone.OPS:
                return clone.dispatch(self.host, mig, op, req, lambda to: self._lane(mig, req.target, to, "mem"))
            side = metrics.SOURCE if op in SOURCE_OPS else metrics.TARGET
            with metrics.step(side, mig, req.name, op, req.mode):
                if op in SOURCE_OPS:
                    done = self._source_step(SourceSession.of(self.host, mig, req.name), op, req)
                else:
                    done = self._target_step(TargetSession.of(self.host, mig, req.name), op, req, waited)
                self._record(side, mig, op, req, done)
            return done

    def _record(self, side: str, mig: str, op: str, req: Any, done: Any) -> None:
        """The metrics of a step that went through: a migration ends here with the controller's confirm,
        cleanup, rollback or abort (the source watchdog's fence, an abort that names no mode, is followed
        by the controller's rollback)."""
        if op == "lazy" and isinstance(done, dict):
            metrics.lazy_pages(int(done.get("pages_from_source", 0)))
        if req.mode is None:
            return
        if op in ("confirm", "cleanup"):
            metrics.finish(side, mig, req.name, metrics.DONE, freeze_s=getattr(req, "freeze_s", None))
        elif op in ("rollback", "abort"):
            metrics.finish(side, mig, req.name, metrics.ROLLED_BACK, failed_stage=req.failed_stage)

    def _source_step(self, session: SourceSession, op: str, req: Any) -> Any:
        match op:
            case "connect":  # at prepare: a migration waiting for its turn to stream is ready to at once
                lanes = self._lanes(session.mig, req.target, session.name)
                warm = [lane.warm for lane in lanes]
                if req.mode not in compat.NO_ROUNDS:  # a first round to warm its connection for
                    warm.append(lambda: self._warm_bulk(req.target))
                with ThreadPoolExecutor(len(warm)) as pool:  # the handshakes' round trips side by side
                    list(pool.map(lambda open_: open_(), warm))
                return {"ok": True}
            case "precopy":
                policy = ConvergencePolicy(**req.policy.model_dump(exclude_none=True))
                lanes = self._lanes(session.mig, req.target, session.name)
                mem, fs, _ = lanes
                done = session.precopy(mem, fs, policy, req.method, req.freeze_timeout, req.completion_timeout,
                                       req.forks, req.streams)  # fmt: skip
                # The final deltas and the restore order cross these inside the freeze: no handshake may fall
                # there, and a lane the target held back during the rounds (a slow disk, the container's
                # lock), or closed as idle during long ones, is reopened now, before its next wait cuts it.
                with ThreadPoolExecutor(len(lanes)) as pool:
                    list(pool.map(lambda lane: lane.warm(), lanes))
                return done
            case "checkpoint":
                fence = f"{req.target.address}:{req.target.port}" if req.target else None  # the watchdog's fence
                done = session.checkpoint(req.lazy, req.freeze_timeout, fence, peer=req.peer,
                                          tls=self.live.server(), check=self.live.check)  # fmt: skip
                if req.target is None:
                    return done
                mem, fs, _ = self._lanes(session.mig, req.target, session.name)
                return _Then(done, lambda: session.send_finals(mem, fs))  # while the controller cuts over
            case "transfer":
                order = req.restore.model_dump() if req.restore else None
                return session.transfer(*self._lanes(session.mig, req.target, session.name), restore=order)
            case "rollback":
                try:
                    return session.rollback()
                finally:
                    self._drop_lanes(session.mig)
            case "confirm":
                try:
                    return session.confirm()
                finally:
                    self._drop_lanes(session.mig)
        raise _NotFound(f"no source operation {op!r}")

    def _target_step(self, session: TargetSession, op: str, req: Any, waited: float = 0.0) -> Any:
        match op:
            case "prepare":
                session.prepare(req.spec)
            case "precopy-reset":
                session.precopy_reset(req.method)
            case "hold":
                held = session.hold([base64.b64decode(p) for p in req.packets])
                if req.restore is None:
                    return {"held": held}
                # The source's last request of the transfer: restore now, no controller call in between.
                faults.check(self.host.cfg.state_root, "restore")
                with metrics.step(metrics.TARGET, session.mig, session.name, "restore", None):
                    restored = self._restore(session, req.restore)
                return {"held": held, "restore": {**restored, "finals_wait_s": round(waited, 4)}}
            case "restore":
                return self._restore(session, req)
            case "lazy":
                return session.lazy()
            case "abort":
                session.abort()
            case "cleanup":
                return session.cleanup()
            case _:
                raise _NotFound(f"no target operation {op!r}")
        return {"ok": True}

    def _restore(self, session: TargetSession, order: bodies.RestoreOrder) -> dict[str, Any]:
        return session.restore(lazy=order.lazy, deadline=order.freeze_deadline)

    def stream_in(self, mig: str, stream: str, query: dict[str, list[str]], reader: Any) -> Any:
        """A stream from the migration's source (authorize checked the sender). After a lazy dump it names
        its page tunnel (`page_server`), which must present that same host's certificate."""
        q = bodies.StreamQuery.model_validate({k: v[0] for k, v in query.items()})
        faults.check(self.host.cfg.state_root, stream)
        peer = self.host.peer(mig)
        if q.page_server and peer is None:
            raise SkyferryError(f"migration {mig} was not prepared on {self.host.cfg.name}")
        source = (
            PageSource(q.page_server, peer, self.live.client(), self.live.check) if q.page_server and peer else None
        )
        reader = metrics.Counted(metrics.TARGET, stream, reader)
        session = TargetSession.of(self.host, mig, q.name)
        with session.finals.landing(q.transfer, stream), self.host.lock(q.name).stream(stream):
            session = TargetSession.of(self.host, mig, q.name)  # again: an abort may have ended that one
            session.refuse_if_restored()
            match stream:
                case "receive":
                    return session.receive(reader, source)
                case "precopy-round":
                    return session.precopy_round(reader)
                case "precopy-final":
                    return session.precopy_final(reader)
                case "lazy-final":
                    return session.lazy_final(reader, source)
                case "fs-round":
                    return session.fs_round(reader)
        raise _NotFound(f"no stream {stream!r}")

    def _lanes(self, mig: str, target: bodies.Target, name: str) -> tuple[Lane, Lane, Lane]:
        """The memory, file and hold lanes to the target's agent for this migration (the session never sees
        the clients behind them). The hold lane carries the restore while the others wait for answers."""
        return (
            self._lane(mig, target, name, "mem"),
            self._lane(mig, target, name, "fs"),
            self._lane(mig, target, name, "hold"),
        )

    def _lane(self, mig: str, target: bodies.Target, name: str, lane: str) -> Lane:
        """One kept-alive client per peer, lane and migration: the connections warmed by the pre-copy rounds
        carry the final deltas inside the freeze without a new TCP and TLS handshake across the WAN; a
        connection opened later shows this host's current certificate. Per migration, because a client
        sends one request at a time: shared by parallel migrations to one target, their rounds went one
        after another and a freeze's final delta waited behind another migration's whole round (bench
        --evacuate: transfers of 27 s inside a freeze). Fault drills may damage an upload on the way
        (faults.corrupt)."""
        key = (target.address, target.port, lane, mig)
        with self._peers_lock:
            if key not in self._peers:
                self._peers[key] = AgentClient(key[0], key[1], self.live.client(), check=self.live.check)
            peer = self._peers[key]
            peer.context = self.live.client()
        state_root = self.host.cfg.state_root

        def upload(stream: str, chunks: Iterable[bytes], **query: str) -> dict[str, Any]:
            path = f"/v1/migrations/{mig}/{stream}?{urlencode({'name': name, **query}, safe=':')}"
            return peer.upload(path, metrics.counted(metrics.SOURCE, stream, faults.corrupt(state_root, path, chunks)))

        def call(op: str, body: dict[str, Any]) -> dict[str, Any]:
            return peer.call("POST", f"/v1/migrations/{mig}/{op}", {"name": name, **body})

        def warm() -> None:
            if (held := peer.drop_if_held_back()) is not None:  # reopened now, not cut inside the freeze
                log.info("reopening the %s lane to %s: the target held its sends back %.1f s", lane, key[0], held)
            with contextlib.suppress(SkyferryError):  # a cold lane only costs a handshake later
                peer.connect()

        def bulk(stream: str, chunks: Iterable[bytes], **query: str) -> dict[str, Any]:
            path = f"/v1/migrations/{mig}/{stream}?{urlencode({'name': name, **query}, safe=':')}"
            with self._bulk_client(target) as kept:
                return kept.upload(
                    path, metrics.counted(metrics.SOURCE, stream, faults.corrupt(state_root, path, chunks))
                )

        return Lane(upload, call, warm, bulk)

    def _warm_bulk(self, target: bodies.Target) -> None:
        """Open (or keep) the connection for the first round ahead of it, as the lanes are."""
        with contextlib.suppress(SkyferryError), self._bulk_client(target) as kept:
            kept.connect()

    @contextlib.contextmanager
    def _bulk_client(self, target: bodies.Target) -> Iterator[AgentClient]:
        """A connection to the target's agent that outlives migrations, for their first rounds (all their
        memory): the one the last round left (its TCP window open, if it ended under one RTO ago), or a
        new one. An evacuation's rounds, one after another, then move as one flow: each on a fresh
        connection spent 0.2-0.3 s of its 1.5 s (64 MiB) ramping up and overshooting. Its peer is checked
        against the revocation list again at each use: a kept connection may predate a revocation."""
        key = (target.address, target.port)
        with self._peers_lock:
            idle = self._bulk.setdefault(key, [])
            kept, since = idle.pop() if idle else (None, 0.0)
        if kept is None:
            kept = AgentClient(key[0], key[1], self.live.client(), check=self.live.check)
        elif time.monotonic() - since > BULK_KEEP_S:
            kept.close()  # its window is long gone, and its agent may be closing it as idle just now
        kept.context = self.live.client()
        kept.recheck()
        try:
            yield kept
        finally:
            if (held := kept.drop_if_held_back()) is not None:
                log.info("not keeping the connection to %s: the target held its sends back %.1f s", key[0], held)
            with self._peers_lock:
                idle.append((kept, time.monotonic()))

    def _drop_lanes(self, mig: str) -> None:
        """A migration's lanes end with it on the source (confirm or rollback)."""
        with self._peers_lock:
            gone = [self._peers.pop(key) for key in list(self._peers) if key[3] == mig]
        for peer in gone:
            peer.close()

    def peer(self, address: str, port: int) -> AgentClient:
        """A fresh client to another agent (the freeze watchdog's fence), with this host's current identity."""
        return AgentClient(address, port, self.live.client(), check=self.live.check)


class _NotFound(Exception):
    pass


class _Text(NamedTuple):
    """A reply that is not JSON (the metrics' exposition)."""

    data: bytes
    ctype: str


class _Then(NamedTuple):
    """A step's answer, and what to start once the answer is on its way: the final deltas after a
    checkpoint, whose threads would otherwise hold the GIL while the answer waits to go out."""

    answer: Any
    after: Callable[[], None]


class _Forbidden(SkyferryError):
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
            if isinstance(payload, _Text):
                data, ctype = payload
            elif isinstance(payload, bytes):
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
                answer = fn()
                then = answer if isinstance(answer, _Then) else None
                self._reply(HTTPStatus.OK, then.answer if then else answer)
                if then:
                    then.after()
            except _NotFound as exc:
                self._reply(HTTPStatus.NOT_FOUND, {"error": str(exc), "hint": None})
            except SkyferryError as exc:
                log.warning("%s %s: %s", self.command, self.path, exc)
                carried = {"restore": exc.restore} if isinstance(exc, CarriedRestore) else {}
                self._reply(HTTPStatus.CONFLICT, {"error": str(exc), "hint": exc.hint, "log": exc.log, **carried})
            except (KeyError, ValueError, TypeError) as exc:
                self._reply(HTTPStatus.BAD_REQUEST, {"error": f"bad request: {exc}", "hint": None})
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
            try:
                agent.authorize(pki.identify(self.connection.getpeercert(binary_form=True)), self.command, url.path)
            except _Forbidden as exc:  # nothing of the request is read or run
                log.warning("refused %s %s: %s", self.command, self.path, exc)
                self.close_connection = True  # a refused stream's body stays unread
                self._reply(HTTPStatus.FORBIDDEN, {"error": str(exc), "hint": exc.hint})
                return
            m = re.fullmatch(rf"/v1/migrations/({MIGRATION_ID.pattern})/({'|'.join(STREAMS)})", url.path)
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


def serve(cfg: HostConfig, identity: Identity, listen: str, port: int = AGENT_PORT) -> None:
    """Run until SIGTERM. `listen` is the host's overlay address: the agent never binds elsewhere."""
    host = Host(cfg)
    privdir.ensure(host.images_root, below=IMAGES_TMPFS.parent)  # /dev/shm is anyone's: check ours before use
    # An earlier agent died mid lazy restore: stop the copies first (their guards hold the uffds, so the
    # pages never fetched cannot read as zeros meanwhile), then the daemons that no proxy serves any more.
    for name in stop_unfinished_lazy(host):
        log.error("stopped %s: restored lazily by an earlier agent that died before every page arrived", name)
    for pid in lazypages.stop_strays(host.images_root):
        log.warning("stopped lazy-pages daemon %d left behind by an earlier agent", pid)
    # Its rounds died with the earlier agent: no one works on a container it throttled (auto-converge).
    for name in host.throttles.lift_all():
        log.warning("lifted the CPU throttle an earlier agent left on %s", name)
    agent = Agent(host, identity)
    metrics.watch(host, lambda: _pages_outstanding(host))
    freeze.Watchdog(host.freezes, lambda record: expire(host, record, agent.peer)).start()
    server = TLSServer((listen, port), _handler(agent), agent.live.server, agent.live.check)
    agent.recheck = server.recheck
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    log.info("agent for %s listening on %s:%d (pid %d)", cfg.name, listen, port, os.getpid())
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        host.shutdown()


def _pages_outstanding(host: Host) -> dict[str, int]:
    """The pages each lazily restored container here still has to fetch."""
    sessions = [s for s in list(host.targets.values()) if isinstance(s, TargetSession)]
    return {s.name: left for s in sessions if (left := s.pages_outstanding()) is not None}


def identity_for(state_root: Path) -> Identity:
    tls = state_root / "tls"
    return Identity(ca=tls / "ca.pem", cert=tls / "cert.pem", key=tls / "key.pem")


def remove_all(cfg: HostConfig) -> list[str]:
    """Remove every container of this host, whether or not its agent still runs (a host going down)."""
    host = Host(cfg)
    names = [c["name"] for c in host.list()]
    for name in names:
        host.remove(name)
    return names
