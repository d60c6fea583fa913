"""The controller's enrolment service: admits a host that holds a join token (hostapi/enrolment.py).

It checks the token, signs the host's own key (a CSR: no private key is made here), gives the host an
overlay address and its peers, records it in the mesh and adds it to every other member's WireGuard:
the controller's here, the hosts' through their agents. It also serves the wheel the host installs.
"""

import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from skyferry.netplane import routes
from skyferry.netplane.errors import NetplaneError
from skyferry.netplane.ipam import Ipam
from skyferry.netplane.mesh import Mesh, MeshHost
from skyferry.netplane.netns import in_netns
from skyferry.pipeline.controller import agentctl, certs, db, dist, tokens
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.hostapi import pki
from skyferry.pipeline.hostapi.enrolment import JOIN_PORT, JoinAnswer, JoinRequest
from skyferry.pipeline.hostapi.layout import HOST_STATE, WG_INTERFACE
from skyferry.pipeline.hostapi.tlsserver import TLSServer

log = logging.getLogger(__name__)


class Enrolment:
    """Admits hosts into the mesh at `state`; `joined` lists who came in, for callers that wait."""

    def __init__(self, state: Path) -> None:
        self.state = state
        self.joined: dict[str, MeshHost] = {}
        self.changed = threading.Condition()

    def join(self, req: JoinRequest, caller: str) -> JoinAnswer:
        mesh = Mesh.load(self.state)
        if req.name == mesh.controller.name or (req.name in mesh.hosts and mesh.hosts[req.name].netns):
            raise tokens.TokenRefused(f"host name {req.name!r} is taken in mesh {mesh.name}")
        grant = tokens.consume(self.state, req.token, req.name)
        ipam = Ipam(self.state)
        ip = ipam.lookup(f"host:{req.name}") or ipam.allocate(f"host:{req.name}")
        old = mesh.hosts.get(req.name)
        member = MeshHost(
            name=req.name,
            overlay_ip=ip,
            endpoint=req.endpoint or f"{caller}:{mesh.listen_port}",
            public_key=req.wireguard_public_key,
            interface=WG_INTERFACE,
            netns=None,
            state_root=str(HOST_STATE),
            provider=grant.provider,
        )
        mesh.hosts[req.name] = member
        mesh.save(self.state)
        cert = pki.sign_csr(self.state / "ca", req.csr_pem, req.name, [ip], role=pki.HOST)
        certs.record(self.state, req.name, cert)
        push = agentctl.Pusher(self.state, mesh)
        if old and old.public_key != member.public_key:  # a rejoin with a new key: drop the old one
            routes.remove_peer(mesh, old, push)
        try:
            routes.apply(mesh, push, only={req.name})
        except NetplaneError as exc:  # the new host still reaches the controller; `mesh sync` repairs
            log.warning("host %s joined, but not every member learnt it: %s", req.name, exc)
        log.info("host %s joined mesh %s as %s (%s, WireGuard %s)", req.name, mesh.name, ip, req.kernel, req.wireguard)
        with closing(db.connect(self.state)) as conn:  # what the host said of itself, for `hosts ls`
            conn.execute(
                "INSERT OR REPLACE INTO joins (host, kernel, wireguard, at) VALUES (?,?,?,?)",
                (req.name, req.kernel, req.wireguard, time.time()),
            )
        with self.changed:
            self.joined[req.name] = member
            self.changed.notify_all()
        return JoinAnswer(
            mesh=mesh.name, name=req.name, overlay_ip=ip, cidr=mesh.cidr, listen_port=mesh.listen_port,
            mtu=mesh.mtu, cert_pem=cert, ca_pem=(self.state / "ca" / "ca.pem").read_text(),
            peers=routes.desired(mesh, member).peers, revoked=certs.revoked(self.state),
        )  # fmt: skip

    def wait(self, names: set[str], timeout: float, alive: Callable[[], None] = lambda: None) -> None:
        """Until every host in `names` has joined; `alive()` may raise to give up early (a VM died)."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while not names <= set(self.joined):
                alive()
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = ", ".join(sorted(names - set(self.joined)))
                    raise SkyferryError(
                        f"hosts did not join within {timeout:g} s: {missing}",
                        hint="they keep their tokens: run the same command again once they boot (their cloud-init "
                        "log, /var/log/cloud-init-output.log, says how far they got)",
                    )
                self.changed.wait(min(left, 5.0))


def reported(state: Path) -> dict[str, dict[str, str]]:
    """What each joined host said of itself when it joined: {"kernel", "wireguard"} by host name."""
    with closing(db.connect(state)) as conn:
        return {
            r["host"]: {"kernel": r["kernel"], "wireguard": r["wireguard"]} for r in conn.execute("SELECT * FROM joins")
        }


def address(mesh: Mesh) -> str:
    """Where joining hosts reach the controller: its WireGuard endpoint's address."""
    return mesh.controller.endpoint_address


def url(mesh: Mesh) -> str:
    return f"https://{address(mesh)}:{JOIN_PORT}"


@contextmanager
def serving(state: Path, listen: str | None = None) -> Iterator[Enrolment]:
    """Run the enrolment service (in the controller's netns) for the duration of the block."""
    mesh = Mesh.load(state)
    ca = state / "ca"
    pki.ensure_ca(ca, mesh.name)
    bind = listen or _bind_address(mesh)
    ident = pki.issue(ca, ca / f"enrolment-{bind}", "controller", [address(mesh)], role=pki.CONTROLLER)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(ident.cert), str(ident.key))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    enrolment = Enrolment(state)
    files = dist.build(state).files()
    try:
        with in_netns(mesh.controller.netns):
            server = TLSServer((bind, JOIN_PORT), _handler(enrolment, files, (ca / "ca.pem").read_bytes()), ctx)
    except OSError as exc:
        raise SkyferryError(
            f"cannot serve joins on {bind}:{JOIN_PORT}: {exc.strerror}",
            hint="another `skyferry hosts join` or provision may be serving; wait for it",
        ) from None
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
    thread.start()
    log.info("enrolment service on %s:%d", bind, JOIN_PORT)
    try:
        yield enrolment
    finally:
        server.shutdown()
        server.server_close()


def _bind_address(mesh: Mesh) -> str:
    """The controller's endpoint address if it is on this machine; else (a public address NATed to this
    machine, as on a cloud VM) every address."""
    with in_netns(mesh.controller.netns), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((address(mesh), 0))
        except OSError:
            return "0.0.0.0"
    return address(mesh)


def _handler(enrolment: Enrolment, files: dict[str, Path], ca_pem: bytes) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt: str, *args: Any) -> None:
            log.info("join %s %s", self.client_address[0], fmt % args)

        def _reply(self, status: int, data: bytes, ctype: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, error: str, hint: str | None = None) -> None:
            self._reply(status, json.dumps({"error": error, "hint": hint}).encode())

        def do_GET(self) -> None:
            name = self.path.removeprefix("/v1/dist/")
            if self.path == "/v1/ca":
                self._reply(HTTPStatus.OK, ca_pem, "application/x-pem-file")
            elif name in files:
                self._reply(HTTPStatus.OK, files[name].read_bytes(), "application/octet-stream")
            else:
                self._error(HTTPStatus.NOT_FOUND, f"no {self.path}", hint=f"files: {', '.join(files)}")

        def do_POST(self) -> None:
            if self.path != "/v1/join":
                self._error(HTTPStatus.NOT_FOUND, f"no {self.path}")
                return
            try:
                length = int(self.headers.get("Content-Length") or 0)
                if not 0 < length <= 64 << 10:
                    raise ValueError(f"bad body length {length}")
                req = JoinRequest.model_validate_json(self.rfile.read(length))
                answer = enrolment.join(req, self.client_address[0])
            except tokens.TokenRefused as exc:
                log.warning("join refused from %s: %s", self.client_address[0], exc)
                self._error(HTTPStatus.FORBIDDEN, str(exc), exc.hint)
            except (ValidationError, ValueError) as exc:
                self._error(HTTPStatus.BAD_REQUEST, f"bad join request: {exc}")
            except SkyferryError as exc:
                self._error(HTTPStatus.CONFLICT, str(exc), exc.hint)
            else:
                self._reply(HTTPStatus.OK, answer.model_dump_json().encode())

    return Handler


def admit(
    state: Path, name: str, provider: str, ttl: float, timeout: float, announce: Callable[[dict[str, Any]], None]
) -> dict[str, Any]:
    """`skyferry hosts join NAME`: a one-time token for `name`, served until that host has joined and its
    agent answers over the overlay. `announce` gets the command to run on the host."""
    mesh = Mesh.load(state)
    if name == mesh.controller.name or (name in mesh.hosts and mesh.hosts[name].netns):
        raise SkyferryError(f"host name {name!r} is taken in mesh {mesh.name}")
    pin = pki.pin(pki.ensure_ca(state / "ca", mesh.name).read_bytes())
    token = tokens.issue(state, name, provider, ttl)
    with serving(state) as enrolment:
        command = join_command(mesh, name, token, pin)
        announce({"name": name, "token": token, "url": url(mesh), "ca_pin": pin, "command": command})
        enrolment.wait({name}, timeout)
    member = Mesh.load(state).host(name)
    agentctl.wait_agent(state, Mesh.load(state), member, timeout=timeout)
    return {"name": name, "overlay_ip": member.overlay_ip, "endpoint": member.endpoint, "provider": member.provider}


def join_command(mesh: Mesh, name: str, token: str, pin: str) -> str:
    return f"skyferry join {url(mesh)} --name {name} --token {token} --ca-pin {pin}"
