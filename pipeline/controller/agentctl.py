"""Start and stop the agents of local hosts, and reach any mesh member's agent from the controller.

Local agents join only their host's network namespace (nsenter --net): `ip netns exec` would also
remount /sys and hide the cgroup hierarchies runc needs. Their PIDs are kept in `<state>/agents.json`,
so stopping them kills exactly what was started.
"""

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from skyferry.netplane import netns as nsutil
from skyferry.netplane import routes
from skyferry.netplane.mesh import Mesh, MeshHost
from skyferry.pipeline.controller import certs
from skyferry.pipeline.controller.journal import Journal
from skyferry.pipeline.controller.registry import Registry
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.hostapi import pki, privdir
from skyferry.pipeline.hostapi.client import AgentClient
from skyferry.pipeline.hostapi.layout import AGENT_PORT, IMAGES_TMPFS
from skyferry.pipeline.hostapi.revocation import RevokedFile, checker

PIDS = "agents.json"
log = logging.getLogger(__name__)
START_TIMEOUT_ENV = "SKYFERRY_AGENT_START_TIMEOUT"  # seconds to wait for a local agent (default 20)


def controller_identity(state: Path, mesh: Mesh) -> pki.Identity:
    ca = state / "ca"
    pki.ensure_ca(ca, mesh.name)
    ident = pki.issue(ca, ca / "controller", "controller", [mesh.controller.overlay_ip], role=pki.CONTROLLER)
    certs.record_file(state, "controller", ident.cert)
    return ident


def monitor_subject(name: str) -> str:
    return f"monitor:{name}"  # in the ledger: never a host's name, so a host's decommission leaves it


def issue_monitor(state: Path, mesh: Mesh, name: str, out: Path) -> pki.Identity:
    """A certificate in the monitor role for `name` (Prometheus), its key and the mesh CA, in `out` (key
    0600): it may read every agent's metrics and nothing else. One already there is kept until a third of
    its 90 days is left, like every member's; recorded in the ledger as `monitor:NAME`."""
    ca = state / "ca"
    pki.ensure_ca(ca, mesh.name)
    ident = pki.issue(ca, out, name, [], role=pki.MONITOR)
    certs.record_file(state, monitor_subject(name), ident.cert)
    return ident


def client(state: Path, mesh: Mesh, host: str) -> AgentClient:
    """A client for `host`'s agent, connecting from the controller's place in the mesh; it refuses an agent
    whose certificate is revoked (the list is read at each new connection)."""
    member = mesh.host(host)
    ctx = controller_identity(state, mesh).client_context()
    check = checker(lambda: certs.revoked(state).serials)
    return AgentClient(member.overlay_ip, AGENT_PORT, ctx, netns=mesh.controller.netns, label=host, check=check)


class Pusher:
    """Hands a host its WireGuard peers through its own agent (`routes.Push`), over one kept-alive
    connection per host: a cutover pushes to every member inside the client's pause."""

    def __init__(self, state: Path, mesh: Mesh, clients: dict[str, AgentClient] | None = None) -> None:
        self.state, self.mesh = state, mesh
        self._clients = dict(clients or {})

    def warm(self) -> None:
        """Connect to every host now (in parallel), so the cutover's pushes, inside the client's pause,
        pay no TLS handshake. A host that does not answer is left for the push itself to report."""

        def connect(name: str) -> None:
            with contextlib.suppress(SkyferryError):
                self._client(name).connect()

        with ThreadPoolExecutor(max_workers=max(1, len(self.mesh.hosts))) as pool:
            list(pool.map(connect, self.mesh.hosts))

    def _client(self, name: str) -> AgentClient:
        if name not in self._clients:
            self._clients[name] = client(self.state, self.mesh, name)
        return self._clients[name]

    def __call__(self, member: MeshHost, update: routes.PeerUpdate) -> None:
        self._client(member.name).call("PUT", "/v1/mesh/peers", update.model_dump(), retry_for=2.0)


def _pids(state: Path) -> dict[str, int]:
    path = state / PIDS
    return json.loads(path.read_text()) if path.exists() else {}


def _save_pids(state: Path, pids: dict[str, int]) -> None:
    (state / PIDS).write_text(json.dumps(pids, indent=2))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/cmdline").read_bytes().find(b"agent") >= 0


def _agent_argv(mesh: Mesh, host: MeshHost, *extra: str) -> list[str]:
    """`skyferry agent` for a local host, with the venv's Python."""
    base = ["agent", "--host", host.name, "--mesh", mesh.name, "--state-root", host.state_root, *extra]
    return [sys.executable, "-m", "skyferry.pipeline.cli", *base]


def _remove_containers(mesh: Mesh, host: MeshHost) -> None:
    result = subprocess.run(
        nsutil.command(host.netns, _agent_argv(mesh, host, "--remove-containers")),
        capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        raise SkyferryError(
            f"could not remove the containers of {host.name}: {result.stderr.strip()[-400:]}",
            hint=f"see {Path(host.state_root) / 'agent.log'}; run hosts down again",
        )


def start_agents(mesh: Mesh, state: Path) -> None:
    """Start an agent in every local host that has none running; waits until each answers."""
    ca = state / "ca"
    pki.ensure_ca(ca, mesh.name)
    pids = _pids(state)
    started: list[MeshHost] = []
    for host in mesh.hosts.values():
        if host.netns is None:
            continue  # real machines run the agent as a systemd unit (cloud-init)
        if host.name in pids and _alive(pids[host.name]):
            continue
        root = Path(host.state_root)
        ident = pki.issue(ca, root / "tls", host.name, [host.overlay_ip], role=pki.HOST)
        certs.record_file(state, host.name, ident.cert)
        RevokedFile(root / "tls" / "revoked.json").write(certs.revoked(state))  # before it takes a connection
        argv = _agent_argv(
            mesh, host, "--listen", host.overlay_ip, "--mtu", str(mesh.mtu), "--wg-interface", host.interface
        )
        with open(root / "agent.log", "ab") as logf:
            proc = subprocess.Popen(
                nsutil.command(host.netns, argv),
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=logf,
                start_new_session=True,
                close_fds=True,
            )
        pids[host.name] = proc.pid
        started.append(host)
    _save_pids(state, pids)
    for host in started:
        wait_agent(state, mesh, host)


def wait_agent(state: Path, mesh: Mesh, host: MeshHost, timeout: float | None = None) -> None:
    """Until `host`'s agent answers over the overlay. An agent answers within a second or two; in a VM
    under TCG (no nested KVM) it takes minutes."""
    timeout = timeout or float(os.environ.get(START_TIMEOUT_ENV) or 20.0)
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            client(state, mesh, host.name).call("GET", "/v1/facts", retry_for=0.5)
            return
        except SkyferryError as exc:
            last = exc
            time.sleep(0.1)
    where = Path(host.state_root) / "agent.log" if host.netns else "journalctl -u skyferry-agent on the host"
    raise SkyferryError(f"agent on {host.name} did not come up: {last}", hint=f"see {where}")


def stop_agents(mesh: Mesh, state: Path, hosts: list[str] | None = None) -> None:
    """Tear down local hosts' workloads and agents (all hosts, or `hosts`).

    Containers go down with their hosts: the host's own agent code removes each one through its engine,
    whether or not the agent still answers (an agent restart alone never touches containers). Then the
    agents get SIGTERM, and SIGKILL after 5 s.
    """
    registry = Registry(state)
    local = [h.name for h in mesh.hosts.values() if h.netns is not None and (hosts is None or h.name in hosts)]
    Journal(state).abandon(local)
    for host in mesh.hosts.values():
        if host.name not in local:
            continue
        _remove_containers(mesh, host)
        for entry in registry.all():
            if entry.host == host.name:
                registry.remove(entry.name)
    pids = _pids(state)
    victims = {h: p for h, p in pids.items() if hosts is None or h in hosts}
    for pid in victims.values():
        if _alive(pid):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 5.0
    for pid in victims.values():
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
        _reap(pid)
    for h in victims:
        pids.pop(h, None)
    _save_pids(state, pids)
    if hosts is None:
        (state / PIDS).unlink(missing_ok=True)
        _remove_cgroups(mesh.name)
        try:
            if privdir.verified(IMAGES_TMPFS / mesh.name, below=IMAGES_TMPFS.parent):
                shutil.rmtree(IMAGES_TMPFS / mesh.name, ignore_errors=True)
                _rmdir(IMAGES_TMPFS)
        except SkyferryError as exc:  # someone else's directory or link: leave it, say so, finish going down
            log.warning("%s%s", exc, f" ({exc.hint})" if exc.hint else "")


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def _remove_cgroups(mesh_name: str) -> None:
    """runc removes each container's cgroup; the per-host parents it leaves are ours to remove."""
    for hierarchy in Path("/sys/fs/cgroup").iterdir():
        top = hierarchy / "skyferry" / mesh_name
        if not top.is_dir():
            continue
        for d in sorted(top.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if d.is_dir():
                _rmdir(d)
        _rmdir(top)
        _rmdir(top.parent)  # only if no other mesh uses it


def _rmdir(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.rmdir()
