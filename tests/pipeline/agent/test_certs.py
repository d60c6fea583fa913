"""Certificate lifecycle against real agents in a real local mesh: revoked and expired certificates are
refused, `mesh rotate` renews every certificate while a container runs and no agent restarts, and a
decommissioned host's certificate stops working. Every refusal has a positive control on the same path
(the same kind of certificate, not revoked or not expired, gets an answer), so a refusal cannot pass by
accident. The last tests revoke local-3, so they run last in this module.
"""

import datetime as dt
import ipaddress
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from kit.mesh import local_mesh, mesh_in
from kit.net import ask_agent
from skyferry.netplane.mesh import Mesh
from skyferry.netplane.netns import in_netns
from skyferry.pipeline.controller import agentctl, certs, containers, migration, revoke
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.hostapi import pki
from skyferry.pipeline.hostapi.client import AgentClient, AgentUnreachable
from skyferry.pipeline.hostapi.layout import AGENT_PORT
from skyferry.pipeline.hostapi.revocation import serial
from skyferry.pipeline.hostapi.spec import HOST_PROGRAMS
from skyferry.pipeline.scenarios import demo as scenario

pytestmark = [pytest.mark.integration, pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]
SKYFERRY = str(Path(sys.executable).parent / "skyferry")


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Mesh]]:
    with local_mesh(tmp_path_factory, prefix="c") as made:
        yield made


def _ctx(ident: pki.Identity) -> ssl.SSLContext:
    return ident.client_context()


def _accepted(reply: bytes | Exception) -> bool:
    return isinstance(reply, bytes) and reply.startswith(b"HTTP/1.1 ")


def _assert_refused(m: Mesh, host: str, ctx: ssl.SSLContext, reason: str) -> None:
    """No HTTP answer, and the agent's log says it refused the handshake for `reason` (TLS 1.3 ends the
    client's handshake before the server judges its certificate, so the log is the proof that does not race)."""
    log_path = Path(m.hosts[host].state_root) / "agent.log"
    seen = len(log_path.read_text())
    reply = ask_agent(m, host, ctx)
    assert not _accepted(reply), reply
    deadline = time.monotonic() + 10
    while reason not in (log := log_path.read_text()[seen:]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "refused" in log and reason in log, log


def _sign(state: Path, out: Path, name: str, ip: str, start: dt.datetime, end: dt.datetime) -> pki.Identity:
    """A certificate from the mesh CA with the given validity (pki always signs from now)."""
    ca_key = serialization.load_pem_private_key((state / "ca" / "ca.key").read_bytes(), password=None)
    ca = x509.load_pem_x509_certificate((state / "ca" / "ca.pem").read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(ip)), x509.UniformResourceIdentifier(pki.ROLE_URI + pki.HOST)]
            ),
            False,
        )
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    out.mkdir(parents=True, exist_ok=True)
    ident = pki.Identity(ca=state / "ca" / "ca.pem", cert=out / "cert.pem", key=out / "key.pem")
    ident.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    ident.key.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return ident


def _served(state: Path, m: Mesh, host: str) -> x509.Certificate:
    """The certificate `host`'s agent shows on a new connection."""
    client = agentctl.client(state, m, host)
    try:
        return x509.load_der_x509_certificate(client.peer_certificate())
    finally:
        client.close()


def _agent_pids(state: Path) -> dict[str, int]:
    return json.loads((state / agentctl.PIDS).read_text())


def test_new_certificates_last_90_days(mesh: tuple[Path, Mesh]) -> None:
    state, m = mesh
    for host in m.hosts:
        cert = _served(state, m, host)
        days = (cert.not_valid_after_utc - cert.not_valid_before_utc).days
        assert days == 90, (host, days)


def test_a_revoked_certificate_is_refused(mesh: tuple[Path, Mesh], tmp_path: Path) -> None:
    state, m = mesh
    ident = pki.issue(state / "ca", tmp_path / "spare", "spare-1", ["100.64.0.250"], role=pki.HOST)
    certs.record_file(state, "spare-1", ident.cert)
    assert _accepted(ask_agent(m, "local-1", _ctx(ident))), "positive control: the CA's certificate is answered"
    revoked = certs.revoke_subjects(state, ["spare-1"])
    assert revoked == [serial(x509.load_pem_x509_certificate(ident.cert.read_bytes()))]
    assert revoke.push(state, m) == []
    for host in m.hosts:
        _assert_refused(m, host, _ctx(ident), "revoked")
    assert _accepted(ask_agent(m, "local-1", agentctl.controller_identity(state, m).client_context()))


def _keepalive(m: Mesh, host: str, ctx: ssl.SSLContext) -> ssl.SSLSocket:
    with in_netns(m.controller.netns):
        sock = socket.create_connection((m.hosts[host].overlay_ip, AGENT_PORT), 5)
    sock.settimeout(10)
    return ctx.wrap_socket(sock, server_hostname=m.hosts[host].overlay_ip)


def _exchange(tls: ssl.SSLSocket) -> bytes | Exception:
    """One request on a kept-alive connection: the whole reply (by its Content-Length), or the error."""
    try:
        tls.sendall(b"GET /v1/facts HTTP/1.1\r\nHost: agent\r\n\r\n")
        reply = b""
        while b"\r\n\r\n" not in reply:
            chunk = tls.recv(65536)
            if not chunk:
                return ConnectionError("closed")
            reply += chunk
        head, _, body = reply.partition(b"\r\n\r\n")
        length = int(
            next(v for k, v in (ln.split(b":", 1) for ln in head.split(b"\r\n")[1:]) if k.lower() == b"content-length")
        )
        while len(body) < length:
            chunk = tls.recv(65536)
            if not chunk:
                return ConnectionError("closed mid-reply")
            body += chunk
        return head
    except (ssl.SSLError, OSError) as exc:
        return exc


def test_a_connection_open_before_the_revocation_is_cut(mesh: tuple[Path, Mesh], tmp_path: Path) -> None:
    """A kept-alive connection outlives its handshake: when the list arrives, the agent cuts those whose
    peer it now revokes. The controller's connection, open just as long, keeps working (control).
    The doomed one is a controller certificate too (as a replaced one is after `mesh rotate`), so its
    requests are answered and its connection stays open until the list arrives."""
    state, m = mesh
    ident = pki.issue(state / "ca", tmp_path / "spare", "spare-6", ["100.64.0.252"], role=pki.CONTROLLER)
    certs.record_file(state, "spare-6", ident.cert)
    doomed = _keepalive(m, "local-1", _ctx(ident))
    control = _keepalive(m, "local-1", agentctl.controller_identity(state, m).client_context())
    try:
        assert _accepted(_exchange(doomed)) and _accepted(_exchange(control))
        log_path = Path(m.hosts["local-1"].state_root) / "agent.log"
        seen = len(log_path.read_text())
        certs.revoke_subjects(state, ["spare-6"])
        assert revoke.push(state, m) == []
        assert "cut a connection" in log_path.read_text()[seen:]
        assert _accepted(_exchange(control)), "the controller's kept-alive connection still answers"
        assert not _accepted(_exchange(doomed))
    finally:
        doomed.close()
        control.close()


def test_an_expired_certificate_is_refused(mesh: tuple[Path, Mesh], tmp_path: Path) -> None:
    state, m = mesh
    now = dt.datetime.now(dt.UTC)
    valid = _sign(
        state, tmp_path / "valid", "spare-2", "100.64.0.251", now - dt.timedelta(days=1), now + dt.timedelta(days=1)
    )
    assert _accepted(ask_agent(m, "local-1", _ctx(valid))), "positive control: the same kind of certificate, in date"
    expired = _sign(
        state, tmp_path / "expired", "spare-2", "100.64.0.251", now - dt.timedelta(days=91), now - dt.timedelta(days=1)
    )
    _assert_refused(m, "local-1", _ctx(expired), "expired")


def test_a_revoked_or_expired_agent_is_refused_by_the_controller(mesh: tuple[Path, Mesh], tmp_path: Path) -> None:
    """The controller is the client: an agent impostor holding a CA-signed but revoked (or expired)
    certificate is refused; the same impostor with a valid one completes the handshake (positive control)."""
    state, m = mesh
    now = dt.datetime.now(dt.UTC)
    good = pki.issue(state / "ca", tmp_path / "good", "spare-3", ["127.0.0.1"], role=pki.HOST)
    gone = pki.issue(state / "ca", tmp_path / "gone", "spare-4", ["127.0.0.1"], role=pki.HOST)
    certs.record_file(state, "spare-3", good.cert)
    certs.record_file(state, "spare-4", gone.cert)
    certs.revoke_subjects(state, ["spare-4"])
    old = _sign(
        state, tmp_path / "old", "spare-5", "127.0.0.1", now - dt.timedelta(days=91), now - dt.timedelta(days=1)
    )

    def call_impostor(ident: pki.Identity) -> Exception:
        server = socket.create_server(("127.0.0.1", 0))
        port = server.getsockname()[1]

        def accept_one() -> None:
            conn, _ = server.accept()
            try:
                tls = ident.server_context().wrap_socket(conn, server_side=True)
                tls.recv(1)  # then hang up without an answer
            except (ssl.SSLError, OSError):
                pass
            finally:
                conn.close()

        thread = threading.Thread(target=accept_one, daemon=True)
        thread.start()
        real = agentctl.client(state, m, "local-1")  # the controller's own client: its context and its check
        impostor = AgentClient("127.0.0.1", port, real.context, label="impostor", check=real.check)
        try:
            with pytest.raises(AgentUnreachable) as caught:
                impostor.call("GET", "/v1/facts", retry_for=1.0)
            return caught.value
        finally:
            thread.join(10)
            server.close()

    assert "connection lost" in str(call_impostor(good)), "positive control: the handshake completed"
    assert "revoked" in str(call_impostor(gone))
    assert "expired" in str(call_impostor(old))


def test_mesh_rotate_renews_every_certificate_while_a_container_runs(mesh: tuple[Path, Mesh], tmp_path: Path) -> None:
    state, m = mesh
    name = "rotated"
    args = [scenario.PYTHON, "/app/counter.py", "serve", str(scenario.PORT)]
    rootfs = scenario.counter_rootfs(tmp_path)
    containers.run(state, "local-1", name, args, rootfs=rootfs, host_dirs=list(HOST_PROGRAMS))  # the host's python3
    try:
        before = {h: _served(state, m, h) for h in m.hosts}
        controller_before = x509.load_pem_x509_certificate(agentctl.controller_identity(state, m).cert.read_bytes())
        pids = _agent_pids(state)
        ran = agentctl.client(state, m, "local-1").call("GET", f"/v1/containers/{name}")
        stolen = tmp_path / "stolen-local-2"  # local-2's files before the rotation, as a thief would keep them
        shutil.copytree(Path(m.hosts["local-2"].state_root) / "tls", stolen)
        time.sleep(1.1)  # notAfter has one-second resolution: the renewed one must be later

        done = subprocess.run([SKYFERRY, "mesh", "rotate", "--revoke-old", "--json"], capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
        report = json.loads(done.stdout)
        assert report["failed"] == {} and set(report["renewed"]) == {*m.hosts, "controller"}

        for host, old in before.items():
            now = _served(state, m, host)
            assert serial(now) == report["renewed"][host]["new"] != serial(old), host
            assert now.not_valid_after_utc > old.not_valid_after_utc, host
        controller_now = x509.load_pem_x509_certificate(agentctl.controller_identity(state, m).cert.read_bytes())
        assert serial(controller_now) == report["renewed"]["controller"]["new"] != serial(controller_before)
        assert _agent_pids(state) == pids and all(Path(f"/proc/{p}").exists() for p in pids.values()), (
            "no agent restarted"
        )
        still = agentctl.client(state, m, "local-1").call("GET", f"/v1/containers/{name}")
        assert still["state"] == "running" and still["pid"] == ran["pid"], (ran, still)

        # --revoke-old: the thief's copy is refused now; the agents' new certificates work agent to agent.
        thief = pki.Identity(ca=stolen / "ca.pem", cert=stolen / "cert.pem", key=stolen / "key.pem")
        _assert_refused(m, "local-1", thief.client_context(), "revoked")
        report = migration.migrate(state, name, "local-2")
        assert report["state"] == "done"
    finally:
        containers.remove(state, name)


def test_a_bad_certificate_is_not_installed(mesh: tuple[Path, Mesh], tmp_path: Path) -> None:
    """The install route takes only a certificate for the key the agent made, from its own CA: anything
    else would cost the host its identity (or hand it someone else's)."""
    state, m = mesh
    client = agentctl.client(state, m, "local-2")
    before = _served(state, m, "local-2")
    other = pki.issue(state / "ca", tmp_path / "other", "local-2", [m.hosts["local-2"].overlay_ip], role=pki.HOST)
    client.call("POST", "/v1/tls/csr", {})
    with pytest.raises(SkyferryError, match="not for the key"):
        client.call("PUT", "/v1/tls/cert", {"cert_pem": other.cert.read_text()})
    assert serial(_served(state, m, "local-2")) == serial(before)


def test_a_host_taken_out_is_refused_everywhere(mesh: tuple[Path, Mesh]) -> None:
    """What decommission does for a cloud host (revoke.hosts): local-3's own certificate, which every
    member accepted a moment ago, is refused by the other agents and by the controller."""
    state, m = mesh
    tls = Path(m.hosts["local-3"].state_root) / "tls"
    local3 = pki.Identity(ca=tls / "ca.pem", cert=tls / "cert.pem", key=tls / "key.pem")
    assert _accepted(ask_agent(m, "local-1", local3.client_context())), "positive control"
    agentctl.client(state, m, "local-3").call("GET", "/v1/facts")
    result = revoke.hosts(state, m, ["local-3"])
    assert result["revoked"] and result["not_told"] == []
    for host in ("local-1", "local-2"):
        _assert_refused(m, host, local3.client_context(), "revoked")
    with pytest.raises(AgentUnreachable, match="revoked"):
        agentctl.client(state, m, "local-3").call("GET", "/v1/facts", retry_for=1.0)
    agentctl.client(state, m, "local-2").call("GET", "/v1/facts")  # the others still answer


def test_hosts_down_revokes_its_hosts_for_the_next_mesh(tmp_path_factory: pytest.TempPathFactory) -> None:
    """`hosts down` keeps the CA (the next `hosts up` signs with it), so a certificate of a host it took
    down would otherwise work in the next mesh. It is refused there; the new mesh's own are answered."""
    state = tmp_path_factory.mktemp("down-state")
    loot = tmp_path_factory.mktemp("loot")
    with mesh_in(state, count=1, prefix="d") as first:
        shutil.copytree(Path(first.hosts["local-1"].state_root) / "tls", loot / "tls")
    old = pki.Identity(ca=loot / "tls" / "ca.pem", cert=loot / "tls" / "cert.pem", key=loot / "tls" / "key.pem")
    with mesh_in(state, count=1, prefix="d") as second:
        assert (state / "ca" / "ca.pem").read_bytes() == old.ca.read_bytes(), "the same CA signs the next mesh"
        assert _accepted(ask_agent(second, "local-1", agentctl.controller_identity(state, second).client_context()))
        _assert_refused(second, "local-1", old.client_context(), "revoked")
