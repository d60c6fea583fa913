"""Who may call an agent, and with what: roles in certificates, migrations bound to their peer, bodies and
paths checked at the boundary, health checks confined to the container (docs/security.md, "Authorization").

Real agents in a real three-host mesh, reached with the real certificates each member holds (a host's own
key is what an attacker who took that host has). Every refusal has a positive control on the same route:
the identity that may call it gets past the check.
"""

import datetime as dt
import http.client
import json
import os
import secrets
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from kit.mesh import local_mesh
from skyferry.netplane.ipam import Ipam
from skyferry.netplane.mesh import Mesh
from skyferry.netplane.netns import in_netns
from skyferry.pipeline.agent.server import identity_for
from skyferry.pipeline.controller import agentctl, containers
from skyferry.pipeline.hostapi import pki
from skyferry.pipeline.hostapi.layout import AGENT_PORT
from skyferry.pipeline.hostapi.spec import HOST_PROGRAMS, ContainerSpec
from skyferry.pipeline.scenarios import demo as scenario

pytestmark = [pytest.mark.integration, pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Mesh]]:
    with local_mesh(tmp_path_factory, prefix="a") as made:
        yield made


def _ctx(state: Path, m: Mesh, who: str) -> ssl.SSLContext:
    """The client context of `who`: "controller", or a host's own certificate and key."""
    if who == "controller":
        return agentctl.controller_identity(state, m).client_context()
    return identity_for(Path(m.hosts[who].state_root)).client_context()


def _ask(m: Mesh, host: str, ctx: ssl.SSLContext, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """One request to `host`'s agent from the controller's netns: (status, parsed JSON reply)."""
    conn = http.client.HTTPSConnection(m.hosts[host].overlay_ip, AGENT_PORT, context=ctx, timeout=30)
    with in_netns(m.controller.netns):
        conn.connect()
    try:
        data = json.dumps(body).encode() if body is not None else b""
        conn.request(method, path, data, {"Content-Type": "application/json"} if body is not None else {})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def _refused(reply: tuple[int, Any]) -> str:
    status, body = reply
    assert status == 403, reply
    assert isinstance(body, dict) and body["error"], reply
    return body["error"]


def _spec(state: Path, name: str, **extra: Any) -> ContainerSpec:
    return ContainerSpec(name=name, args=["/bin/true"], ip=Ipam(state).allocate(f"authz:{name}"), **extra)


CONTROLLER_ROUTES = [
    ("GET", "/v1/facts", None),
    ("GET", "/v1/containers", None),
    ("DELETE", "/v1/containers/nobody", None),
    ("PUT", "/v1/mesh/peers", {"peers": [], "remove": []}),
    ("POST", "/v1/migrations/m-steal/clone-check", {"name": "nobody", "cmd": "true", "live": True}),
    ("POST", "/v1/migrations/m-steal/prepare", {"name": "nobody"}),
]


@pytest.mark.parametrize(("method", "path", "body"), CONTROLLER_ROUTES)
def test_a_host_certificate_is_refused_on_controller_routes(
    mesh: tuple[Path, Mesh], method: str, path: str, body: Any
) -> None:
    state, m = mesh
    error = _refused(_ask(m, "local-1", _ctx(state, m, "local-2"), method, path, body))
    assert "controller's" in error and "local-2" in error
    # Positive control: the controller's certificate gets past the check (an answer, or a refusal of the
    # body or of a missing container, but never 403).
    status, reply = _ask(m, "local-1", _ctx(state, m, "controller"), method, path, body)
    assert status != 403 and status < 500, reply


def test_a_host_cannot_run_a_container_on_another_host(mesh: tuple[Path, Mesh]) -> None:
    """The issue's attack: a host's key POSTs a container that copies the victim's /etc as its rootfs."""
    state, m = mesh
    spec = _spec(state, "steal-etc", rootfs="/etc")
    _refused(_ask(m, "local-1", _ctx(state, m, "local-2"), "POST", "/v1/containers", spec.to_dict()))
    # The controller gets past the role check, and is refused the path (the next test's subject).
    status, reply = _ask(m, "local-1", _ctx(state, m, "controller"), "POST", "/v1/containers", spec.to_dict())
    assert status == 400 and "outside" in reply["error"], reply


def _legacy_identity(state: Path, out: Path) -> tuple[Path, Path]:
    """A certificate the mesh CA signed before roles existed: a CN and SANs, no role."""
    ca_key = serialization.load_pem_private_key((state / "ca" / "ca.key").read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate((state / "ca" / "ca.pem").read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "controller")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("controller")]), critical=False)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (out / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return out / "cert.pem", out / "key.pem"


def test_a_certificate_without_a_role_is_refused_with_a_hint(mesh: tuple[Path, Mesh], tmp_path: Path) -> None:
    state, m = mesh
    cert, key = _legacy_identity(state, tmp_path / "legacy")
    assert pki.identify(x509.load_pem_x509_certificate(cert.read_bytes()).public_bytes(serialization.Encoding.DER)) == (
        None,
        "controller",
    )
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(state / "ca" / "ca.pem"))
    ctx.load_cert_chain(str(cert), str(key))
    status, reply = _ask(m, "local-1", ctx, "GET", "/v1/facts")
    assert status == 403 and "no role" in reply["error"], reply
    assert "skyferry mesh rotate" in reply["hint"]
    # Positive control: the same route, the role-carrying controller certificate.
    assert _ask(m, "local-1", _ctx(state, m, "controller"), "GET", "/v1/facts")[0] == 200


def test_roles_are_in_every_certificate_the_mesh_issued(mesh: tuple[Path, Mesh]) -> None:
    state, m = mesh

    def held(ident: pki.Identity) -> tuple[str | None, str]:
        der = x509.load_pem_x509_certificate(ident.cert.read_bytes()).public_bytes(serialization.Encoding.DER)
        return pki.identify(der)

    assert held(agentctl.controller_identity(state, m)) == (pki.CONTROLLER, "controller")
    for host in m.hosts.values():
        assert held(identity_for(Path(host.state_root))) == (pki.HOST, host.name)


@pytest.fixture
def bound(mesh: tuple[Path, Mesh]) -> Iterator[dict[str, Any]]:
    """Two migrations prepared on local-1 by the controller: one bound to local-2, one to local-3."""
    state, m = mesh
    ctl = agentctl.client(state, m, "local-1")
    tag = secrets.token_hex(3)
    made = {}
    for peer in ("local-2", "local-3"):
        spec = _spec(state, f"in-{peer[-1]}-{tag}")
        mig = f"m-{peer}-{tag}"
        ctl.call("POST", f"/v1/migrations/{mig}/prepare", {"name": spec.name, "spec": spec.to_dict(), "peer": peer})
        made[peer] = {"mig": mig, "name": spec.name, "ip": spec.ip}
    try:
        yield made
    finally:
        for it in made.values():
            ctl.call("POST", f"/v1/migrations/{it['mig']}/abort", {"name": it["name"]})
            Ipam(state).release(it["ip"])


def test_migration_streams_take_only_the_bound_peer(mesh: tuple[Path, Mesh], bound: dict[str, Any]) -> None:
    state, m = mesh
    mig, name = bound["local-2"]["mig"], bound["local-2"]["name"]
    stream = f"/v1/migrations/{mig}/fs-round?name={name}"
    reset = (f"/v1/migrations/{mig}/precopy-reset", {"name": name})
    # Another host of the mesh (bound to a different migration here) may not send this one's streams.
    error = _refused(_ask(m, "local-1", _ctx(state, m, "local-3"), "PUT", stream, {}))
    assert "local-3" in error and "from local-2 only" in error
    _refused(_ask(m, "local-1", _ctx(state, m, "local-3"), "POST", *reset))
    # Nor may the controller: streams are between the migration's two hosts.
    _refused(_ask(m, "local-1", _ctx(state, m, "controller"), "PUT", stream, {}))
    # Positive control: the bound peer is accepted (its empty stream then reaches the decoder, which
    # refuses it for what it is).
    assert _ask(m, "local-1", _ctx(state, m, "local-2"), "POST", *reset) == (200, {"ok": True})
    status, reply = _ask(m, "local-1", _ctx(state, m, "local-2"), "PUT", stream, {})
    assert status == 409 and "stream rejected" in reply["error"], reply
    # The transfer's last request may carry the restore: another host and the controller are refused it;
    # the bound peer's reaches the restore (which fails here: nothing was ever sent to restore).
    order = (f"/v1/migrations/{mig}/hold", {"name": name, "packets": [], "restore": {"lazy": False}})
    assert "from local-2 only" in _refused(_ask(m, "local-1", _ctx(state, m, "local-3"), "POST", *order))
    _refused(_ask(m, "local-1", _ctx(state, m, "controller"), "POST", *order))
    status, reply = _ask(m, "local-1", _ctx(state, m, "local-2"), "POST", *order)
    assert status == 409 and "restore" in reply["error"], reply
    # The peer of one migration is refused on another's (bound to local-3), and on one never prepared here.
    other = bound["local-3"]
    elsewhere = f"/v1/migrations/{other['mig']}/fs-round?name={other['name']}"
    assert "from local-3 only" in _refused(_ask(m, "local-1", _ctx(state, m, "local-2"), "PUT", elsewhere, {}))
    error = _refused(_ask(m, "local-1", _ctx(state, m, "local-2"), "POST", "/v1/migrations/m-never/hold",
                          {"name": name, "packets": []}))  # fmt: skip
    assert "not prepared" in error


def test_a_finished_migration_takes_no_more_streams(mesh: tuple[Path, Mesh]) -> None:
    state, m = mesh
    ctl = agentctl.client(state, m, "local-1")
    spec = _spec(state, f"done-{secrets.token_hex(3)}")
    mig = f"m-done-{secrets.token_hex(3)}"
    ctl.call("POST", f"/v1/migrations/{mig}/prepare", {"name": spec.name, "spec": spec.to_dict(), "peer": "local-2"})
    reset = (f"/v1/migrations/{mig}/precopy-reset", {"name": spec.name})
    try:
        assert _ask(m, "local-1", _ctx(state, m, "local-2"), "POST", *reset)[0] == 200  # positive control
    finally:
        ctl.call("POST", f"/v1/migrations/{mig}/abort", {"name": spec.name})
        Ipam(state).release(spec.ip)
    _refused(_ask(m, "local-1", _ctx(state, m, "local-2"), "POST", *reset))


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/v1/containers/../logs", None),
        ("DELETE", "/v1/containers/..", None),
        ("POST", "/v1/migrations/m-names/abort", {"name": "../../x"}),
        ("POST", "/v1/migrations/m-names/clone-check", {"name": "x/../../etc", "cmd": "true"}),
        ("POST", "/v1/containers", {"name": "../x", "args": ["true"], "ip": "100.64.9.9"}),
        ("POST", "/v1/migrations/m-names/prepare", {"name": "a", "peer": "local-2", "spec": {"name": "a", "args": []}}),
        ("POST", "/v1/migrations/m-names/checkpoint", {"name": "a", "lazy": "yes"}),
        ("POST", "/v1/migrations/m-names/abort", {"name": "a", "surprise": 1}),
        ("POST", "/v1/containers/a/route", {"present": "no"}),
    ],
)
def test_bad_names_and_bodies_get_a_json_400(mesh: tuple[Path, Mesh], method: str, path: str, body: Any) -> None:
    state, m = mesh
    status, reply = _ask(m, "local-1", _ctx(state, m, "controller"), method, path, body)
    assert status == 400 and reply["error"].startswith("bad "), (status, reply)


def test_a_good_name_passes_the_same_checks(mesh: tuple[Path, Mesh]) -> None:
    """Positive control of the test above: a well-formed name and body reach the host (which has no such
    container: a 409 that names it)."""
    state, m = mesh
    status, reply = _ask(m, "local-1", _ctx(state, m, "controller"), "GET", "/v1/containers/no-such/logs")
    assert status == 409 and "no-such" in reply["error"], reply


def test_a_stream_for_a_bad_name_gets_a_json_400(mesh: tuple[Path, Mesh], bound: dict[str, Any]) -> None:
    state, m = mesh
    mig = bound["local-2"]["mig"]
    status, reply = _ask(m, "local-1", _ctx(state, m, "local-2"), "PUT", f"/v1/migrations/{mig}/fs-round?name=..", {})
    assert status == 400 and "name" in reply["error"], reply


def test_rootfs_and_image_paths_stay_in_the_hosts_imports(mesh: tuple[Path, Mesh], tmp_path: Path) -> None:
    state, m = mesh
    ctl = _ctx(state, m, "controller")
    imports = Path(m.hosts["local-1"].state_root) / "imports"
    imports.mkdir(exist_ok=True)
    escape = imports / f"escape-{secrets.token_hex(3)}"
    escape.symlink_to("/etc")  # inside by name, outside once resolved
    tls_key = str(Path(m.hosts["local-1"].state_root) / "tls" / "key.pem")
    try:
        for paths in ({"rootfs": "/etc"}, {"rootfs": str(escape)}, {"image": tls_key}, {"image": "/etc/shadow"}):
            spec = _spec(state, f"path-{secrets.token_hex(3)}", **paths)
            status, reply = _ask(m, "local-1", ctl, "POST", "/v1/containers", spec.to_dict())
            Ipam(state).release(spec.ip)
            assert status == 400 and "outside" in reply["error"], (paths, status, reply)
    finally:
        escape.unlink()
    # Positive control: the controller stages a local host's rootfs into its imports, and the agent runs it.
    name = f"staged-{secrets.token_hex(3)}"
    info = containers.run(state, "local-1", name, [scenario.PYTHON, "-c", "import time; time.sleep(600)"],
                          rootfs=scenario.counter_rootfs(tmp_path), host_dirs=list(HOST_PROGRAMS))  # fmt: skip
    try:
        assert info["state"] == "running", info
        assert not (imports / name).exists(), "the staged copy outlived the run"
    finally:
        containers.remove(state, name)


@pytest.fixture
def running(mesh: tuple[Path, Mesh], tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A counter container on local-1 with a marker file in its rootfs, and a file only the host has."""
    state, _ = mesh
    name = f"hc-{secrets.token_hex(3)}"
    rootfs = scenario.counter_rootfs(tmp_path)
    (rootfs / "app" / "marker").write_text("in the container\n")
    host_only = Path("/tmp") / f"sf-authz-host-only-{secrets.token_hex(4)}"
    host_only.write_text("host\n")
    args = [scenario.PYTHON, "/app/counter.py", "serve", str(scenario.PORT)]
    info = containers.run(state, "local-1", name, args, rootfs=rootfs, host_dirs=list(HOST_PROGRAMS))  # python3, ip
    try:
        yield {"name": name, "ip": info["ip"], "host_only": host_only}
    finally:
        containers.remove(state, name)
        host_only.unlink()


def test_a_health_check_runs_inside_the_container(mesh: tuple[Path, Mesh], running: dict[str, Any]) -> None:
    state, m = mesh
    ctl = agentctl.client(state, m, "local-1")

    def check(cmd: str) -> dict[str, Any]:
        body = {"name": running["name"], "cmd": cmd, "live": True}
        return ctl.call("POST", f"/v1/migrations/hc-{secrets.token_hex(3)}/clone-check", body)

    # Positive controls: it sees the container's own files, address and processes.
    assert check("cat /app/marker")["output"] == "in the container"
    assert check(f'ip -o -4 addr show | grep -q " {running["ip"]}/"')["ok"]
    assert "/app/counter.py" in check("tr '\\0' ' ' </proc/1/cmdline")["output"]
    # And nothing of the host: a file the host has (and the check's own host-side view would see) ...
    assert running["host_only"].exists()
    seen = check(f"cat {running['host_only']}")
    assert seen["rc"] != 0 and "No such file" in seen["output"], seen
    # ... nor root: nobody, no capabilities, no way to gain them.
    assert check("id -u")["output"] == "65534"
    assert check("grep CapEff /proc/self/status")["output"].split()[-1] == "0000000000000000"
    assert check("grep NoNewPrivs /proc/self/status")["output"].split()[-1] == "1"
