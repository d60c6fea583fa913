"""The embedded local provider: hosts are network namespaces on an underlay bridge, joined by WireGuard.

Layout for mesh id ID (docs/architecture.md): netns `ID-wan` holds bridge `br0` (the underlay switch,
198.18.0.0/24) and the WAN delay relay; netns `ID-ctl` is the controller's member; host `local-K` is
netns `ID-local-K` with underlay veth `ul0` and WireGuard interface `ID-wgK`. Everything created is
named with ID or recorded (pids) in the mesh's rows of the store, so `down` removes exactly this mesh and nothing else.
"""

import builtins
import ipaddress
import re
import secrets
import shutil
from pathlib import Path

from pyroute2 import IPRoute
from skyferry.netplane import netns, routes, store, wan, wg
from skyferry.netplane.errors import NetplaneError
from skyferry.netplane.ipam import DEFAULT_CIDR, Ipam, parse_cidr
from skyferry.netplane.mesh import CONTROLLER, DEFAULT_MTU, DEFAULT_PORT, Local, Mesh, MeshHost, Wan
from skyferry.netplane.wan import WanSpec

from .base import WIREGUARD_PORT, Host
from .errors import ProviderError

UNDERLAY = ipaddress.ip_network("198.18.0.0/24")
SWITCH_ADDRESS = "198.18.0.1"  # br0: the relay listens here
UNDERLAY_IF = "ul0"
RELAY_BASE_PORT = 40000
MAX_HOSTS = 200
TCP_BUFFER_MAX = 16 * 1024 * 1024
NAME_RE = re.compile(r"[a-z][a-z0-9]{0,7}")


def underlay_address(index: int) -> str:
    """The controller is index 0 (198.18.0.2); host local-K is 198.18.0.(10+K)."""
    return str(UNDERLAY[2] if index == 0 else UNDERLAY[10 + index])


def _check_args(name: str, count: int, cidr: str) -> None:
    if not NAME_RE.fullmatch(name):
        raise NetplaneError(
            f"bad mesh name {name!r}: 1-8 lowercase letters and digits, starting with a letter",
            hint="it prefixes every namespace and interface name, which the kernel limits to 15 characters",
        )
    if not 0 <= count <= MAX_HOSTS:  # 0: just the underlay and the controller, for VM or cloud hosts
        raise NetplaneError(f"--count must be between 0 and {MAX_HOSTS}, not {count}")
    net = parse_cidr(cidr)
    need = (count + 1) + 4 * max(count, 1)  # every member, and room for at least 4 containers per host
    if net.num_addresses - 2 < need:
        raise NetplaneError(
            f"overlay CIDR {net} is too small: {max(net.num_addresses - 2, 0)} usable addresses, "
            f"{count} hosts and a controller need at least {need}",
            hint=f"use a larger range, e.g. --cidr {DEFAULT_CIDR}",
        )
    if net.overlaps(UNDERLAY):
        raise NetplaneError(
            f"overlay CIDR {net} overlaps the local underlay {UNDERLAY}", hint=f"e.g. --cidr {DEFAULT_CIDR}"
        )
    with IPRoute() as ipr:  # read-only look at this machine's own networks
        for r in ipr.get_routes(family=2, table=254):
            if r["dst_len"] == 0:
                continue
            used = ipaddress.ip_network(f"{r.get('RTA_DST')}/{r['dst_len']}", strict=False)
            if net.overlaps(used):
                raise NetplaneError(
                    f"overlay CIDR {net} overlaps {used}, a network this machine is on",
                    hint=f"pick a free range, e.g. --cidr {DEFAULT_CIDR}",
                )


def _in_use(name: str) -> list[str]:
    """Kernel objects that already carry the mesh id `name` (another mesh, or leftovers)."""
    found = [n for n in netns.RUN_DIR.glob(f"{name}-*")] if netns.RUN_DIR.exists() else []
    found += list(wg.SOCKET_DIR.glob(f"{name}-*.sock")) if wg.SOCKET_DIR.exists() else []
    return [str(p) for p in found]


def _local_members(mesh: Mesh) -> list[MeshHost]:
    """The controller and the local hosts: the members whose namespaces and processes are ours."""
    return [m for m in mesh.members if m is mesh.controller or m.provider == "local"]


def _local_hosts(mesh: Mesh) -> list[MeshHost]:
    return [h for h in mesh.hosts.values() if h.provider == "local"]


def _veth_to_switch(switch: str, member_netns: str, switch_if: str, address: str) -> None:
    with IPRoute(netns=switch) as ipr:
        ipr.link("add", ifname=switch_if, kind="veth", peer={"ifname": UNDERLAY_IF, "net_ns_fd": member_netns})
        idx = ipr.link_lookup(ifname=switch_if)[0]
        ipr.link("set", index=idx, master=ipr.link_lookup(ifname="br0")[0], state="up")
    with IPRoute(netns=member_netns) as ipr:
        idx = ipr.link_lookup(ifname=UNDERLAY_IF)[0]
        ipr.addr("add", index=idx, address=address, prefixlen=UNDERLAY.prefixlen)
        ipr.link("set", index=idx, state="up")


def _switch(name: str) -> None:
    with IPRoute(netns=name) as ipr:
        ipr.link("add", ifname="br0", kind="bridge")
        idx = ipr.link_lookup(ifname="br0")[0]
        ipr.addr("add", index=idx, address=SWITCH_ADDRESS, prefixlen=UNDERLAY.prefixlen)
        ipr.link("set", index=idx, state="up")


def _wireguard(mesh: Mesh, member: MeshHost, prefixlen: int) -> None:
    """Start `member`'s WireGuard interface with its key, port and overlay address (no peers yet)."""
    member.pid = wg.start_interface(mesh.backend, member.interface, member.netns)  # type: ignore[arg-type]
    mesh.persist()  # record the pid at once: a crash from here on still leaves `down` able to kill it
    key = Path(member.state_root) / "private.key"
    wg.wg(member.netns, "set", member.interface, "private-key", str(key), "listen-port", str(mesh.listen_port))
    if member.pid is not None:
        wg.widen_buffers(member.pid)
    with IPRoute(netns=member.netns) as ipr:
        idx = ipr.link_lookup(ifname=member.interface)[0]
        ipr.addr("add", index=idx, address=member.overlay_ip, prefixlen=prefixlen)
        ipr.link("set", index=idx, mtu=mesh.mtu, state="up")
    netns.sysctl(member.netns, "net/ipv4/ip_forward", "1")
    # Room for a 1 Gbit/s x 30 ms bandwidth-delay product (the 4 MiB default stalls near 750 Mbit/s).
    netns.sysctl(member.netns, "net/ipv4/tcp_wmem", f"4096 16384 {TCP_BUFFER_MAX}")
    netns.sysctl(member.netns, "net/ipv4/tcp_rmem", f"4096 131072 {TCP_BUFFER_MAX}")


class LocalProvider:
    """Local hosts in network namespaces. `plan` is the mesh id; one mesh per state directory."""

    name = "local"

    def __init__(self, state: Path, cidr: str | None = None, wan_spec: WanSpec | None = None) -> None:
        self.state = Path(state)
        self.cidr = cidr
        self.wan_spec = wan_spec

    # --- the mesh ---------------------------------------------------------------------------------

    def up(self, count: int, name: str | None = None) -> tuple[Mesh, bool]:
        """Build the mesh, or find the same one already up; returns (mesh, created)."""
        if Mesh.exists(self.state):
            return self._existing(count, name), False
        name = name or "sf" + secrets.token_hex(2)
        cidr = str(parse_cidr(self.cidr or DEFAULT_CIDR))
        _check_args(name, count, cidr)
        if leftovers := _in_use(name):
            raise NetplaneError(
                f"mesh id {name} is already in use on this machine: {', '.join(leftovers[:3])}",
                hint="pick another --name, or bring that mesh down with its own SKYFERRY_STATE",
            )
        mesh = self._plan(name, count, cidr)
        try:
            self._build(mesh)
        except BaseException:
            self._teardown(mesh)
            raise
        return mesh, True

    def _existing(self, count: int, name: str | None) -> Mesh:
        mesh = Mesh.load(self.state)
        wanted_wan = (self.wan_spec.rate_text, self.wan_spec.rtt_text) if self.wan_spec else (None, None)
        have_wan = (mesh.wan.rate, mesh.wan.rtt) if mesh.wan else (None, None)
        conflicts = [
            f"{what} is {have}, not {want}"
            for what, have, want in (
                ("name", mesh.name, name or mesh.name),
                ("local host count", len(_local_hosts(mesh)), count),
                ("overlay CIDR", mesh.cidr, str(parse_cidr(self.cidr)) if self.cidr else mesh.cidr),
                ("WAN", have_wan, wanted_wan),
            )
            if have != want
        ]
        if conflicts:
            raise NetplaneError(
                f"mesh {mesh.name} is already up in {self.state} and its {'; '.join(conflicts)}",
                hint="skyferry hosts down first to change it",
            )
        if broken := self._problems(mesh):
            raise NetplaneError(
                f"mesh {mesh.name} is recorded but broken: {broken[0]}",
                hint="skyferry hosts down, then up again",
            )
        return mesh

    def _problems(self, mesh: Mesh) -> list[str]:
        problems = []
        for m in _local_members(mesh):
            if m.netns and not netns.exists(m.netns):
                problems.append(f"network namespace {m.netns} is gone")
            if mesh.backend == wg.USERSPACE and not (m.pid and wg.process_matches(m.pid, m.interface)):
                problems.append(f"wireguard-go for {m.interface} is not running")
        if mesh.wan and mesh.wan.relay_pid and not wg.process_matches(mesh.wan.relay_pid, wan.RELAY_MARKER):
            problems.append("the WAN relay is not running")
        return problems

    def _plan(self, name: str, count: int, cidr: str) -> Mesh:
        """The mesh as it will be, saved before any kernel object exists so `down` can always clean up."""
        ipam = Ipam(self.state, cidr)

        def member(host: str, ns: str, interface: str, index: int) -> MeshHost:
            root = self.state / "hosts" / host
            return MeshHost(
                name=host,
                overlay_ip=ipam.allocate(f"host:{host}"),
                endpoint=f"{underlay_address(index)}:{DEFAULT_PORT}",
                public_key="",
                interface=interface,
                netns=ns,
                state_root=str(root),
                provider=self.name,
            )

        mesh = Mesh(
            name=name,
            cidr=cidr,
            mtu=DEFAULT_MTU,
            listen_port=DEFAULT_PORT,
            controller=member(CONTROLLER, f"{name}-ctl", f"{name}-wg0", 0),
            hosts={
                f"local-{k}": member(f"local-{k}", f"{name}-local-{k}", f"{name}-wg{k}", k) for k in range(1, count + 1)
            },
            local=Local(switch_netns=f"{name}-wan", underlay=str(UNDERLAY)),
        )
        if self.wan_spec:
            spec = self.wan_spec
            names = list(mesh.hosts)
            ports = {}
            if spec.rtt:
                pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
                ports = {Wan.pair(a, b): RELAY_BASE_PORT + i for i, (a, b) in enumerate(pairs)}
            mesh.wan = Wan(
                rate=spec.rate_text,
                rtt=spec.rtt_text,
                relay_address=SWITCH_ADDRESS if ports else None,
                relay_ports=ports,
            )
        mesh.save(self.state)
        return mesh

    def _build(self, mesh: Mesh) -> None:
        assert mesh.local is not None
        switch = mesh.local.switch_netns
        netns.create(switch)
        _switch(switch)
        for index, m in enumerate(mesh.members):
            assert m.netns is not None
            netns.create(m.netns)
            _veth_to_switch(switch, m.netns, "ctl" if index == 0 else f"h{index}", underlay_address(index))
        mesh.backend = wg.choose_backend(mesh.controller.netns)  # type: ignore[arg-type]
        for m in mesh.members:
            m.public_key = wg.genkey(Path(m.state_root))
            _wireguard(mesh, m, ipaddress.ip_network(mesh.cidr).prefixlen)
        if self.wan_spec and mesh.wan:
            self._wan(mesh, self.wan_spec)
        if mesh.hosts:  # a controller alone has no peers to tell or wait for
            # No agent runs yet: the provider that made these namespaces configures them, as cloud-init would.
            routes.apply(mesh, routes.here, keepalive=False)
            routes.apply(mesh, routes.here)  # now every member knows every peer: start the handshakes
            routes.wait_handshakes(mesh)
        mesh.persist()

    def _wan(self, mesh: Mesh, spec: WanSpec) -> None:
        assert mesh.local is not None and mesh.wan is not None
        if spec.rate:
            for index, h in enumerate(mesh.hosts.values(), start=1):
                wan.shape(h.netns, UNDERLAY_IF, spec.rate)  # type: ignore[arg-type]  # host upload
                wan.shape(mesh.local.switch_netns, f"h{index}", spec.rate)  # host download
        if spec.rtt and mesh.wan.relay_ports:
            pairs = {}
            for pair, port in mesh.wan.relay_ports.items():
                a, b = pair.split(",")
                pairs[port] = (mesh.hosts[a].endpoint, mesh.hosts[b].endpoint)
            mesh.wan.relay_pid = wan.start_relay(
                mesh.name, mesh.local.switch_netns, pairs, SWITCH_ADDRESS, spec.rtt / 2
            )
            mesh.persist()

    def down(self) -> list[str]:
        """Remove the mesh in this state directory and everything it created; [] if there is none."""
        if not Mesh.exists(self.state):
            return []
        return self._teardown(Mesh.load(self.state))

    def _teardown(self, mesh: Mesh) -> list[str]:
        removed: list[str] = []
        if mesh.wan and wg.stop_process(mesh.wan.relay_pid, wan.RELAY_MARKER):
            removed.append(f"process {mesh.wan.relay_pid} (WAN relay)")
        # Only what this provider made: a cloud or VM member's interface and state root are on its own machine.
        for m in _local_members(mesh):
            if wg.stop_process(m.pid, m.interface):
                removed.append(f"process {m.pid} (wireguard-go {m.interface})")
            if wg.remove_socket(m.interface):
                removed.append(f"socket {wg.SOCKET_DIR / m.interface}.sock")
        # Container namespaces carry the mesh id too (`<id>-<host>-<container>`), so they go as well.
        for path in sorted(netns.RUN_DIR.glob(f"{mesh.name}-*")) if netns.RUN_DIR.exists() else []:
            if netns.remove(path.name):
                removed.append(f"netns {path.name}")
        for m in _local_members(mesh):
            if Path(m.state_root).exists():
                shutil.rmtree(m.state_root)
                removed.append(f"dir {m.state_root}")
        Mesh.delete(self.state)
        Ipam.drop(self.state)
        removed.append(f"mesh {mesh.name} and its overlay addresses from {self.state / store.FILE}")
        hosts_dir = self.state / "hosts"
        if hosts_dir.exists() and not any(hosts_dir.iterdir()):
            hosts_dir.rmdir()
        return removed

    # --- the Provider protocol ---------------------------------------------------------------------

    def provision(
        self, plan: str, count: int, size: str | None = None, region: str | None = None,
        image: str | None = None, user_data: str | None = None,
    ) -> list[Host]:  # fmt: skip
        mesh, _ = self.up(count, plan)
        return self._hosts(mesh)

    def list(self, plan: str | None = None) -> list[Host]:
        if not Mesh.exists(self.state):
            return []
        mesh = Mesh.load(self.state)
        return [] if plan not in (None, mesh.name) else self._hosts(mesh)

    def wait_ready(self, hosts: builtins.list[Host], timeout: float = 600.0) -> builtins.list[Host]:
        """Local hosts are ready when `up` returns; this only confirms they still are."""
        mesh = Mesh.load(self.state)
        if problems := self._problems(mesh):
            raise ProviderError(f"local mesh {mesh.name} is not healthy: {problems[0]}", hint="hosts down, then up")
        ready = {h.name: h for h in self._hosts(mesh)}
        return [ready[h.name] for h in hosts if h.name in ready]

    def destroy(self, plan: str) -> builtins.list[str]:
        if not Mesh.exists(self.state) or Mesh.load(self.state).name != plan:
            return []
        return self.down()

    def open_wireguard_port(self, plan: str, port: int = WIREGUARD_PORT) -> None:
        """Nothing to open: namespaces on one bridge have no firewall between them."""

    def _hosts(self, mesh: Mesh) -> builtins.list[Host]:
        return [
            Host(
                name=h.name,
                provider=self.name,
                plan=mesh.name,
                id=h.netns or h.name,
                address=h.endpoint_address,
                private_address=h.overlay_ip,
                state="running" if h.netns and netns.exists(h.netns) else "terminated",
                tags={"netns": h.netns or "", "interface": h.interface},
            )
            for h in _local_hosts(mesh)
        ]
