"""Agents accept only their mesh's peers, listen only on the overlay, and checkpoint images are secrets.

Real agents in a real two-host mesh (plus a client host). Every refusal test has a positive control on
the same path (the controller's own certificate gets an answer), so a refusal cannot pass by accident.
"""

import json
import os
import secrets
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kit.mesh import local_mesh
from kit.net import AGENT_REQUEST, ask_agent, open_agent
from skyferry.netplane import netns, store
from skyferry.netplane.mesh import Mesh
from skyferry.netplane.netns import in_netns
from skyferry.pipeline.controller import agentctl, containers, db, migration
from skyferry.pipeline.controller import state as state_mod
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.hostapi import pki
from skyferry.pipeline.hostapi.client import AgentClient, AgentUnreachable
from skyferry.pipeline.hostapi.layout import AGENT_PORT, IMAGES_TMPFS
from skyferry.pipeline.hostapi.spec import HOST_PROGRAMS
from skyferry.pipeline.scenarios import demo as scenario

pytestmark = [pytest.mark.integration, pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]
SKYFERRY = str(Path(sys.executable).parent / "skyferry")


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Mesh]]:
    with local_mesh(tmp_path_factory, prefix="s") as made:
        yield made


@pytest.fixture(scope="module")
def other_mesh_identity(tmp_path_factory: pytest.TempPathFactory) -> pki.Identity:
    """What an agent (or controller) of another mesh holds: a certificate from that mesh's own CA."""
    ca = tmp_path_factory.mktemp("other-ca")
    pki.ensure_ca(ca, "other")
    return pki.issue(ca, ca / "agent", "local-1", ["100.64.0.2"], role=pki.HOST)


def _controller_ctx(state: Path, m: Mesh) -> ssl.SSLContext:
    return agentctl.controller_identity(state, m).client_context()


def _no_cert_ctx(state: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(state / "ca" / "ca.pem"))  # trusts the agent, shows nothing
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    return ctx


def test_the_mesh_certificate_is_answered(mesh: tuple[Path, Mesh]) -> None:
    """The positive control for the refusals below: same path, same request, the controller's identity."""
    state, m = mesh
    reply = ask_agent(m, "local-1", _controller_ctx(state, m))
    assert isinstance(reply, bytes) and reply.startswith(b"HTTP/1.1 200"), reply


def _assert_refused(m: Mesh, ask: Callable[[], bytes | Exception], alert: str) -> None:
    """No HTTP answer, and the agent's log says it refused this handshake. TLS 1.3 checks the client's
    certificate after the client's side of the handshake is done, so the agent's alert may reach us or our
    request may meet the closed connection first; the agent's own log line is the proof that does not race."""
    log_path = Path(m.hosts["local-1"].state_root) / "agent.log"
    seen = len(log_path.read_text())  # the module's other tests share this agent: judge only what follows
    reply = ask()
    assert not (isinstance(reply, bytes) and b"HTTP/" in reply), reply
    if isinstance(reply, Exception):
        assert alert in str(reply).lower() or isinstance(reply, ssl.SSLEOFError | ConnectionError), reply
    deadline = time.monotonic() + 10  # the agent logs from its handshake thread, maybe just after we return
    while "refused" not in (log := log_path.read_text()[seen:]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "refused" in log and "certificate" in log.lower(), log


def test_a_request_without_a_client_certificate_is_refused(mesh: tuple[Path, Mesh]) -> None:
    state, m = mesh
    _assert_refused(m, lambda: ask_agent(m, "local-1", _no_cert_ctx(state)), "certificate required")
    # Plain HTTP, no TLS at all: no answer either.
    sock = open_agent(m, "local-1")
    try:
        sock.sendall(AGENT_REQUEST)
        sock.settimeout(5)
        assert b"HTTP/" not in sock.recv(65536)
    except OSError:
        pass  # reset: refused just as well
    finally:
        sock.close()


def test_a_certificate_from_another_mesh_is_refused(mesh: tuple[Path, Mesh], other_mesh_identity: pki.Identity) -> None:
    state, m = mesh
    ctx = ssl.create_default_context(cafile=str(state / "ca" / "ca.pem"))
    ctx.load_cert_chain(str(other_mesh_identity.cert), str(other_mesh_identity.key))
    _assert_refused(m, lambda: ask_agent(m, "local-1", ctx), "unknown ca")


def test_an_agent_of_another_mesh_is_refused_by_our_side(
    mesh: tuple[Path, Mesh], other_mesh_identity: pki.Identity
) -> None:
    """Our controller (and every agent, which uses the same client context) refuses a server whose
    certificate another mesh's CA signed: it would otherwise hand that impostor a container's image."""
    state, m = mesh
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    errors: list[Exception] = []

    def accept_one() -> None:
        conn, _ = server.accept()
        try:
            other_mesh_identity.server_context().wrap_socket(conn, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            errors.append(exc)
        finally:
            conn.close()

    thread = threading.Thread(target=accept_one, daemon=True)
    thread.start()
    try:
        impostor = AgentClient("127.0.0.1", port, _controller_ctx(state, m), label="impostor")
        with pytest.raises(AgentUnreachable, match="refused our certificate or we refused its"):
            impostor.call("GET", "/v1/facts", retry_for=1.0)
    finally:
        thread.join(10)
        server.close()


def _recorded_request(m: Mesh, host: str, ctx: ssl.SSLContext, request: bytes) -> tuple[bytes, bytes]:
    """Make one genuine request over TLS through memory BIOs: (every byte the client sent, the reply)."""
    sock = open_agent(m, host)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=m.hosts[host].overlay_ip)
    sent = bytearray()

    def flush() -> None:
        data = outgoing.read()
        if data:
            sent.extend(data)
            sock.sendall(data)

    def pump() -> None:
        flush()
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("agent closed the connection")
        incoming.write(data)

    try:
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                pump()
        flush()
        tls.write(request)
        reply = b""
        while b"\r\n\r\n" not in reply:
            try:
                reply += tls.read(65536)
            except ssl.SSLWantReadError:
                pump()
        return bytes(sent), reply
    finally:
        sock.close()


def test_a_replayed_request_is_refused(mesh: tuple[Path, Mesh]) -> None:
    """An eavesdropper on the overlay records a whole authenticated exchange and sends the client's bytes
    again: TLS 1.3 keys are fresh per connection (no 0-RTT), so the agent refuses the handshake and the
    request never runs. The agent logs each request it runs, which is how the test knows."""
    state, m = mesh
    probe = f"/v1/containers/replay-probe-{secrets.token_hex(4)}"
    request = f"GET {probe} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n".encode()
    log = Path(m.hosts["local-1"].state_root) / "agent.log"
    sent, reply = _recorded_request(m, "local-1", _controller_ctx(state, m), request)
    assert reply.startswith(b"HTTP/1.1 409"), reply  # the genuine request ran (no such container)
    time.sleep(0.2)  # the agent writes its log line after the reply
    ran = log.read_text().count(probe)
    assert ran >= 1, "the agent logs the requests it runs"

    sock = open_agent(m, "local-1")
    sock.settimeout(5)
    answer = b""
    try:
        sock.sendall(sent)
        while chunk := sock.recv(65536):
            answer += chunk
    except OSError:
        pass  # reset: refused
    finally:
        sock.close()
    time.sleep(0.2)
    assert log.read_text().count(probe) == ran, "the replayed request ran"
    assert b"HTTP/" not in answer


def test_agents_listen_only_on_overlay_addresses(mesh: tuple[Path, Mesh]) -> None:
    _, m = mesh
    for host in m.hosts.values():
        out = subprocess.run(netns.command(host.netns, ["ss", "-Hltn"]), capture_output=True, text=True, check=True)
        listening = [line.split()[3] for line in out.stdout.splitlines() if line.split()[3].endswith(f":{AGENT_PORT}")]
        assert listening == [f"{host.overlay_ip}:{AGENT_PORT}"], (host.name, listening)
        underlay = host.endpoint.rsplit(":", 1)[0]
        with in_netns(m.controller.netns), pytest.raises(ConnectionRefusedError):
            socket.create_connection((underlay, AGENT_PORT), 5)


def test_keys_are_0600_and_the_state_directory_0700(mesh: tuple[Path, Mesh], tmp_path: Path) -> None:
    state, m = mesh
    keys = [p for p in state.rglob("*") if p.is_file() and (p.suffix == ".key" or p.name == "key.pem")]
    # The mesh CA, the controller's TLS key, and per host its TLS key and WireGuard key.
    assert len(keys) >= 2 + 2 * len(m.hosts), keys
    for key in keys:
        assert key.stat().st_mode & 0o777 == 0o600, f"{key} is {oct(key.stat().st_mode & 0o777)}"
        assert key.parent.stat().st_mode & 0o077 == 0, f"{key.parent} is readable by others"
    fresh = tmp_path / "nested" / "skyferry"
    old = os.environ.get("SKYFERRY_STATE")
    os.environ["SKYFERRY_STATE"] = str(fresh)
    try:
        assert state_mod.state_dir().stat().st_mode & 0o777 == 0o700
        fresh.chmod(0o755)  # an operator loosened it: the next command tightens it again
        assert state_mod.state_dir().stat().st_mode & 0o777 == 0o700
    finally:
        os.environ["SKYFERRY_STATE"] = old or str(state)
    proc = subprocess.run([SKYFERRY, "migrations", "ls", "--json"], capture_output=True, text=True,
                          env={**os.environ, "SKYFERRY_STATE": str(tmp_path / "cli-made")})  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "cli-made").stat().st_mode & 0o777 == 0o700


def _fstype(path: Path) -> str:
    stat = subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True, check=True)
    return stat.stdout.strip()


def _files_containing(root: Path, needle: bytes) -> list[Path]:
    """Files below root holding `needle`. SQLite files are left out: closing any descriptor of a database
    file drops this process's POSIX locks on it, which breaks the open connections; the store's tables
    are checked through SQL instead."""
    found = []
    for p in root.rglob("*"):
        if p.name.startswith(store.FILE):
            continue
        try:
            if p.is_file() and not p.is_symlink() and needle in p.read_bytes():
                found.append(p)
        except OSError:
            continue
    return found


# at_restore reads every image file of both hosts inside the freeze. On a machine loaded far past its cores
# that can outlast the default freeze bound (30 s), and the watchdog's fence then removes the target's copy
# mid-scan (one run at load 12 saw the target's store vanish under the scan).
LONG_FREEZE = 600.0


@pytest.mark.parametrize("outcome", ["success", "failure"])
def test_images_hold_secrets_live_on_tmpfs_only_and_are_wiped(
    mesh: tuple[Path, Mesh], tmp_path: Path, outcome: str
) -> None:
    """A container with a secret in its environment (so in its memory, so in its checkpoint images)
    migrates; at the restore, its images exist on tmpfs only. Afterwards, success or failure, no image
    is left anywhere, and the secret is nowhere in the journal, reports, agent logs or CRIU logs."""
    state, m = mesh
    secret = "sf-secret-" + secrets.token_hex(12)
    name = f"secret-{outcome}"
    args = [scenario.PYTHON, "/app/counter.py", "serve", str(scenario.PORT)]
    rootfs = scenario.counter_rootfs(tmp_path)
    containers.run(state, "local-1", name, args, rootfs=rootfs, env={"SF_TOKEN": secret}, host_dirs=list(HOST_PROGRAMS))
    seen: dict[str, list[Path]] = {}
    target_faults = Path(m.hosts["local-2"].state_root) / "faults"

    def at_restore(stage: str) -> None:
        if stage == "restore":
            dirs = [IMAGES_TMPFS / m.name / h for h in ("local-1", "local-2")]
            seen["mig_dirs"] = [d for root in dirs if root.exists() for d in root.iterdir()]
            seen["images"] = [p for d in seen["mig_dirs"] for p in d.rglob("*.img")]
            seen["holding_secret"] = [p for d in seen["mig_dirs"] for p in _files_containing(d, secret.encode())]
            seen["not_tmpfs"] = [p for p in seen["mig_dirs"] + seen["images"] if _fstype(p) != "tmpfs"]

    try:
        if outcome == "failure":
            target_faults.write_text("restore\n")
            with pytest.raises(SkyferryError, match="Rolled back"):
                migration.migrate(state, name, "local-2", progress=at_restore, freeze_timeout=LONG_FREEZE)
        else:
            report = migration.migrate(state, name, "local-2", progress=at_restore, freeze_timeout=LONG_FREEZE)
            assert report["state"] == "done"
    finally:
        target_faults.unlink(missing_ok=True)
    mig_id = seen["mig_dirs"][0].name
    assert seen["images"], "the checkpoint wrote images"
    assert seen["holding_secret"], "the images carry the container's memory, secret included"
    assert seen["not_tmpfs"] == [], "images outside tmpfs"
    try:
        for root in (IMAGES_TMPFS / m.name / "local-1", IMAGES_TMPFS / m.name / "local-2"):
            assert not (root / mig_id).exists(), f"images of {mig_id} outlived the migration on {root.name}"
        assert not [p for p in state.rglob("*.img")], "an image file reached persistent state"
        # Where the secret may be: the container's own spec (the store's `containers` table, the host's
        # spec.json and runc bundle config.json). Nowhere else on disk, and in no other table of the store.
        holding = [p.relative_to(state) for p in _files_containing(state, secret.encode())]
        allowed = {"config.json", "spec.json"}
        assert [p for p in holding if p.name not in allowed] == [], holding
        conn = db.connect(state)
        tables = [r["name"] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        assert {"containers", "migrations", "transitions", "mesh_hosts", "ipam_allocations"} <= set(tables)
        dump = {t: json.dumps([dict(r) for r in conn.execute(f"SELECT * FROM {t}")]) for t in tables}
        assert secret in dump["containers"]  # positive control: the search reads the rows that hold the spec
        for table, rows in dump.items():
            if table != "containers":
                assert secret not in rows and "SF_TOKEN" not in rows, f"the secret is in the store's table {table}"
        shown = subprocess.run([SKYFERRY, "migrations", "show", mig_id, "--json"], capture_output=True, text=True)
        listed = subprocess.run([SKYFERRY, "migrations", "ls", "--json"], capture_output=True, text=True)
        assert shown.returncode == 0 and listed.returncode == 0, shown.stderr + listed.stderr
        for text in (shown.stdout, listed.stdout):
            assert secret not in text and "SF_TOKEN" not in text and "PRIVATE KEY" not in text
        report_keys = json.dumps(json.loads(shown.stdout)).lower()
        assert '"env"' not in report_keys and '"environment"' not in report_keys
        for log in [*state.rglob("agent.log"), *state.rglob("logs/*/*.log")]:
            text = log.read_bytes()
            assert secret.encode() not in text, f"the secret leaked into {log}"
    finally:
        containers.remove(state, name)
