"""A controller-only mesh on this machine (`skyferry mesh init`): the controller's own WireGuard member,
which hosts made elsewhere then join. The interface lives in this machine's (or the caller's) network
namespace; the local provider builds its meshes differently, with a namespace per member.
"""

import ipaddress
import shutil
from pathlib import Path

from pyroute2 import IPRoute

from . import wg
from .errors import NetplaneError
from .ipam import DEFAULT_CIDR, Ipam, parse_cidr
from .mesh import CONTROLLER, DEFAULT_MTU, DEFAULT_PORT, MACHINE_INTERFACE, Mesh, MeshHost

PROVIDER = "controller"


def init(
    state: Path,
    name: str,
    endpoint: str,
    cidr: str | None = None,
    port: int = DEFAULT_PORT,
    interface: str = MACHINE_INTERFACE,
) -> tuple[Mesh, bool]:
    """Make the mesh, or find the same one already here; returns (mesh, created)."""
    try:
        ipaddress.ip_address(endpoint)
    except ValueError:
        raise NetplaneError(f"--endpoint {endpoint!r} is not an IP address", hint="the address hosts reach") from None
    if Mesh.exists(state):
        mesh = Mesh.load(state)
        if (mesh.name, mesh.controller.endpoint) != (name, f"{endpoint}:{port}"):
            raise NetplaneError(
                f"mesh {mesh.name} (controller at {mesh.controller.endpoint}) is already recorded in {state}",
                hint="skyferry hosts down first to change it",
            )
        return mesh, False
    net = str(parse_cidr(cidr or DEFAULT_CIDR))
    with IPRoute() as ipr:
        if ipr.link_lookup(ifname=interface):
            raise NetplaneError(f"this machine already has an interface {interface}", hint="another mesh runs here")
    root = state / CONTROLLER
    member = MeshHost(
        name=CONTROLLER,
        overlay_ip=Ipam(state, net).allocate(f"host:{CONTROLLER}"),
        endpoint=f"{endpoint}:{port}",
        public_key=wg.genkey(root),
        interface=interface,
        netns=None,
        state_root=str(root),
        provider=PROVIDER,
    )
    mesh = Mesh(name=name, cidr=net, controller=member, mtu=DEFAULT_MTU, listen_port=port)
    mesh.backend = wg.choose_backend(None)
    mesh.save(state)  # first, so `down` can always clean up
    try:
        member.pid = wg.start_interface(mesh.backend, interface, None)
        mesh.persist()
        wg.wg(None, "set", interface, "private-key", str(root / "private.key"), "listen-port", str(port))
        if member.pid is not None:
            wg.widen_buffers(member.pid)
        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=interface)[0]
            ipr.addr("add", index=idx, address=member.overlay_ip, prefixlen=ipaddress.ip_network(net).prefixlen)
            ipr.link("set", index=idx, mtu=mesh.mtu, state="up")
    except BaseException:
        down(state)
        raise
    return mesh, True


def down(state: Path) -> list[str]:
    """Remove the controller's interface and the mesh's records; [] if there is no such mesh here."""
    if not Mesh.exists(state):
        return []
    mesh = Mesh.load(state)
    ctl = mesh.controller
    removed = []
    if wg.stop_process(ctl.pid, ctl.interface):
        removed.append(f"process {ctl.pid} (wireguard-go {ctl.interface})")
    if wg.remove_socket(ctl.interface):
        removed.append(f"socket {wg.SOCKET_DIR / ctl.interface}.sock")
    with IPRoute() as ipr:
        if idx := ipr.link_lookup(ifname=ctl.interface):
            ipr.link("del", index=idx[0])
            removed.append(f"interface {ctl.interface}")
    if Path(ctl.state_root).exists():
        shutil.rmtree(ctl.state_root)
        removed.append(f"dir {ctl.state_root}")
    Mesh.delete(state)
    Ipam.drop(state)
    removed.append(f"mesh {mesh.name}")
    return removed
