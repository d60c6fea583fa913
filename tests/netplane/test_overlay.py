"""Real namespaces, real wireguard-go: reachability, attach, cutover under traffic, the netns switch."""

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from kit.net import Pinger, echo_server, host_routes, rtt, stream
from pyroute2 import IPRoute
from skyferry.netplane import attach, netns, routes, wg
from skyferry.netplane.errors import NetplaneError
from skyferry.netplane.ipam import Ipam
from skyferry.netplane.mesh import Mesh
from skyferry.netplane.netns import in_netns

pytestmark = [pytest.mark.integration, pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]
PORT = 9000


def _container(mesh: Mesh, state: Path, host: str, name: str) -> tuple[str, str]:
    """A container netns on `host` with an overlay /32 from IPAM, published to the mesh."""
    ip = Ipam(state).allocate(f"container:{name}")
    ns = f"{mesh.name}-{host}-{name}"
    attach.attach(ns, ip, host_netns=mesh.host(host).netns, mtu=mesh.mtu)
    routes.publish(mesh, ip, host, routes.here)
    return ns, ip


def test_in_netns_switches_only_the_calling_thread(run_id: str) -> None:
    ns = f"{run_id}-x"
    netns.create(ns)
    try:
        own = Path("/proc/thread-self/ns/net").stat().st_ino
        with in_netns(ns):
            inside = Path("/proc/thread-self/ns/net").stat().st_ino
            sock = socket.socket()
        assert inside != own and Path("/proc/thread-self/ns/net").stat().st_ino == own
        with IPRoute(netns=ns) as ipr:
            ipr.addr("add", index=ipr.link_lookup(ifname="lo")[0], address="203.0.113.7", prefixlen=32)
        sock.bind(("203.0.113.7", 0))  # only that netns has the address: the socket lives there
        sock.close()
        with pytest.raises(NetplaneError, match="does not exist"), in_netns(f"{run_id}-missing"):
            pass
    finally:
        netns.remove(ns)


def test_client_host_reaches_container_ip_across_the_overlay(local_mesh: Callable[..., Mesh], state: Path) -> None:
    mesh = local_mesh(2)
    ns, ip = _container(mesh, state, "local-1", "web")
    with echo_server(ns, ip, PORT):
        ping = rtt(mesh.host("local-2").netns, ip, 5)
        assert not ping.lost
        with in_netns(mesh.host("local-2").netns):
            conn = socket.create_connection((ip, PORT), timeout=5)
        with conn:
            conn.sendall(b"hello\n")
            assert conn.recv(64) == b"hello\n"
            assert conn.getsockname()[0] == mesh.host("local-2").overlay_ip
        # The controller is a member too: the pipeline reaches hosts' agents from its netns.
        assert not rtt(mesh.controller.netns, mesh.host("local-1").overlay_ip, 3).lost
    assert Mesh.load(state).homes == {ip: "local-1"}


def test_attach_and_detach_are_idempotent(local_mesh: Callable[..., Mesh], state: Path, run_id: str) -> None:
    mesh = local_mesh(1)
    host = mesh.host("local-1").netns
    ns, ip = f"{run_id}-local-1-c", "100.64.9.9"
    attach.attach(ns, ip, host_netns=host)
    attach.attach(ns, ip, host_netns=host)
    with IPRoute(netns=ns) as ipr:
        eth0 = ipr.link_lookup(ifname="eth0")[0]
        assert [a.get("IFA_ADDRESS") for a in ipr.get_addr(index=eth0, family=socket.AF_INET)] == [ip]
        assert ipr.get_links(eth0)[0].get("IFLA_MTU") == 1420
        default = ipr.get_routes(family=2, dst_len=0, table=254)
        assert len(default) == 1 and default[0].get("RTA_OIF") == eth0
    with IPRoute(netns=host) as ipr:
        assert host_routes(ipr, ip) == [ipr.link_lookup(ifname=attach.host_ifname(ns))[0]]
    attach.set_route(ns, ip, False, host_netns=host)
    attach.set_route(ns, ip, False, host_netns=host)
    with IPRoute(netns=host) as ipr:
        assert host_routes(ipr, ip) == []
    attach.detach(ns, host_netns=host)
    attach.detach(ns, host_netns=host)
    assert not netns.exists(ns)
    with IPRoute(netns=host) as ipr:
        assert not ipr.link_lookup(ifname=attach.host_ifname(ns))


def _move_link(ns: str, source: str, target: str) -> None:
    """Re-home the container's host-side veth: on one machine, this is what restoring on the target does."""
    with IPRoute(netns=source) as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname=attach.host_ifname(ns))[0], net_ns_fd=target)


def test_cutover_during_ping_and_tcp_stream(local_mesh: Callable[..., Mesh], state: Path) -> None:
    """A client on local-3 pings the container and streams to it while its /32 moves local-1 -> local-2.

    The container's netns (and the server in it) stays put; its link moves from local-1 to local-2,
    as if CRIU had restored it there. Pings can be lost only while the link is between hosts and the
    routes are switching: none sent before the move or after the cutover. (How long the switch takes
    depends on how busy the machine is: netlink calls and one `wg set` per member; `took` bounds it.)
    """
    mesh = local_mesh(3)
    src, tgt, client = (mesh.host(h).netns for h in ("local-1", "local-2", "local-3"))
    ns, ip = _container(mesh, state, "local-1", "web")
    interval = 0.1
    with echo_server(ns, ip, PORT), stream(client, ip, PORT, 0.02) as tcp:
        pinger = Pinger(client, ip, interval).start()
        try:
            tcp.stop.wait(1.0)
            before = len(tcp.echoed)
            t_move = time.perf_counter()  # the Pinger's clock
            _move_link(ns, src, tgt)
            attach.attach(ns, ip, host_netns=tgt, route=False)  # proxy ARP on the new host end
            attach.set_route(ns, ip, True, host_netns=tgt)
            started = time.perf_counter()  # what the migration's cutover stage does, from here on
            routes.publish(mesh, ip, "local-2", routes.here)
            took = time.perf_counter() - started
            t_switched = time.perf_counter()
            tcp.stop.wait(1.5)
        finally:
            pinger.stop()
        assert tcp.error is None, tcp.error
        assert len(tcp.echoed) > before + 20  # the same connection kept going after the move
        assert [n for n, _ in tcp.echoed] == list(range(len(tcp.echoed)))
    print(f"cutover {took * 1000:.1f} ms, lost pings {pinger.lost}, max TCP echo gap {tcp.max_gap() * 1000:.0f} ms")
    # A ping sent just before the move may still be in flight to local-1 when its link goes.
    outside = [n for n in pinger.lost if not t_move - interval <= pinger.sent[n] <= t_switched]
    assert outside == [], f"lost pings {pinger.lost}, of which {outside} outside the switch"
    assert len(pinger.lost) <= 1 + (t_switched - t_move) / interval, f"lost pings {pinger.lost}"
    assert len(pinger.sent) >= 20
    assert took < 1.0
    assert Mesh.load(state).homes[ip] == "local-2"
    for member in mesh.members:  # every member's WireGuard now routes the /32 to local-2
        dump = wg.wg(member.netns, "show", member.interface, "allowed-ips")
        owners = [line.split("\t")[0] for line in dump.splitlines() if f"{ip}/32" in line]
        assert owners == ([] if member.name == "local-2" else [mesh.host("local-2").public_key])
    with IPRoute(netns=src) as ipr:
        assert host_routes(ipr, ip) == []


def test_withdraw_removes_the_route_everywhere(local_mesh: Callable[..., Mesh], state: Path) -> None:
    mesh = local_mesh(2)
    _, ip = _container(mesh, state, "local-1", "web")
    routes.withdraw(mesh, ip, routes.here)
    routes.withdraw(mesh, ip, routes.here)
    assert Mesh.load(state).homes == {}
    for member in mesh.members:
        assert f"{ip}/32" not in wg.wg(member.netns, "show", member.interface, "allowed-ips")
    with pytest.raises(NetplaneError, match="outside"):
        routes.publish(mesh, "10.1.2.3", "local-1", routes.here)
