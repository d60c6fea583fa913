"""Joining a mesh with a one-time token: the controller's enrolment service and the host's `join`, for
real, between a local mesh and a "machine" (its own netns on the underlay switch) that joins it.

The host side runs `skyferry.pipeline.agent.join.join` itself with its files under a test directory and
without systemd; the test then brings the written WireGuard config up with wireguard-go and pings the
controller and a host over the overlay. VM tests run the same join through cloud-init and systemd.
"""

import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from kit.machine import machine_on_underlay, run_in
from kit.mesh import local_mesh
from skyferry.netplane import netns, wg
from skyferry.netplane.mesh import Mesh
from skyferry.pipeline.agent import doctor
from skyferry.pipeline.agent.join import Layout, fetch_ca, join
from skyferry.pipeline.controller import enrol, tokens
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.hostapi import pki

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

JOINER_ADDRESS = "198.18.0.200"


@pytest.fixture(scope="module")
def joined_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Mesh, str]]:
    """A local mesh with one host, and an empty netns `<mesh>-jn` on its underlay: the new machine."""
    with (
        local_mesh(tmp_path_factory, count=1, prefix="j") as (state, mesh),
        machine_on_underlay(mesh, JOINER_ADDRESS) as machine,
    ):
        yield state, mesh, machine


def test_join_admits_a_machine_whose_keys_never_leave_it(joined_mesh: tuple[Path, Mesh, str], tmp_path: Path) -> None:
    state, mesh, machine = joined_mesh
    layout = Layout(tmp_path / "host", tmp_path / "wg" / "skyferry.conf", tmp_path / "skyferry-agent.service")
    pin = pki.pin(pki.ensure_ca(state / "ca", mesh.name).read_bytes())
    token = tokens.issue(state, "edge-1", "manual")
    ifname = f"{mesh.name}wj"
    pid = None
    with enrol.serving(state) as service:
        result = run_in(machine, join, enrol.url(mesh), token, pin, "edge-1", start=False, layout=layout)
        assert set(service.joined) == {"edge-1"}
        # The same token again is refused, and so are tokens that expired or name another host.
        with pytest.raises(SkyferryError, match="already used"):
            run_in(machine, join, enrol.url(mesh), token, pin, "edge-1", start=False, layout=_fresh(tmp_path, "again"))
        expired = tokens.issue(state, "edge-2", "manual", ttl=-1)
        with pytest.raises(SkyferryError, match="expired"):
            run_in(machine, join, enrol.url(mesh), expired, pin, "edge-2", start=False, layout=_fresh(tmp_path, "exp"))
        other = tokens.issue(state, "edge-3", "manual")
        with pytest.raises(SkyferryError, match="is for host 'edge-3'"):
            run_in(machine, join, enrol.url(mesh), other, pin, "edge-4", start=False, layout=_fresh(tmp_path, "oth"))
        # A controller whose CA does not match the pin is not trusted with the request at all.
        with pytest.raises(SkyferryError, match="not the pinned"):
            run_in(machine, fetch_ca, enrol.url(mesh), "sha256:" + "0" * 64)
    try:
        after = Mesh.load(state)
        member = after.host("edge-1")
        assert result["overlay_ip"] == member.overlay_ip and member.netns is None
        assert member.endpoint == f"{JOINER_ADDRESS}:{mesh.listen_port}"
        # Its certificate names it, in the host role the CA gave it (whatever its CSR asked for).
        cert = x509.load_pem_x509_certificate((layout.state_root / "tls" / "cert.pem").read_bytes())
        assert pki.identify(cert.public_bytes(serialization.Encoding.DER)) == (pki.HOST, "edge-1")
        public = member.public_key
        # Every other member learnt the new peer: the controller here, local-1 through its own agent.
        for m in (after.controller, after.host("local-1")):
            assert public in wg.wg(m.netns, "show", m.interface, "peers")
        # The machine's private keys exist only in its own files.
        secrets = [(layout.state_root / "wireguard" / "private.key").read_text().strip()]
        secrets.append(_pem_body((layout.state_root / "tls" / "key.pem").read_text()))
        for path in [p for p in state.rglob("*") if p.is_file()]:
            data = path.read_bytes()
            assert not any(s.encode() in data for s in secrets), f"a private key of edge-1 is in {path}"
        # The agent's unit remounts cgroup2 with favordynmods first: its script, unescaped as systemd does,
        # runs cleanly here and leaves the option set. This machine's bootstrap has set it already, so the
        # remount itself is proven on the VMs, whose Debian default lacks it (test_vm_mesh.py).
        pre = next(x for x in layout.agent_unit.read_text().splitlines() if x.startswith("ExecStartPre=-/bin/sh -c "))
        script = shlex.split(pre.removeprefix("ExecStartPre=-/bin/sh -c "))[0].replace("$$", "$")
        assert subprocess.run(["sh", "-c", script]).returncode == 0 and doctor.probe_cgroup_favordynmods()
        # The written wg-quick config brings up an overlay that reaches the controller and local-1.
        pid = wg.start_interface(wg.USERSPACE, ifname, machine)
        stripped = subprocess.run(["wg-quick", "strip", str(layout.wg_config)], capture_output=True, text=True)
        for argv, stdin in (
            (["wg", "setconf", ifname, "/dev/stdin"], stripped.stdout),
            (["ip", "addr", "add", f"{member.overlay_ip}/16", "dev", ifname], None),
            (["ip", "link", "set", ifname, "up"], None),
        ):
            subprocess.run(netns.command(machine, argv), input=stdin, text=True, check=True)
        for target in (after.controller.overlay_ip, after.host("local-1").overlay_ip):
            ping = subprocess.run(netns.command(machine, ["ping", "-c", "2", "-W", "5", target]), capture_output=True)
            assert ping.returncode == 0, f"edge-1 cannot reach {target} over the overlay: {ping.stdout!r}"
    finally:
        wg.stop_process(pid, ifname)
        wg.remove_socket(ifname)


def _fresh(tmp_path: Path, name: str) -> Layout:
    return Layout(tmp_path / name, tmp_path / name / "wg.conf", tmp_path / name / "agent.service")


def _pem_body(pem: str) -> str:
    """The base64 of the private scalar: a P-256 PKCS#8 key's first 48 characters are the same in all."""
    return "".join(line for line in pem.splitlines() if not line.startswith("-----"))[48:88]
