"""IPAM and the mesh description: pure file logic, no kernel objects."""

import ipaddress
import sqlite3
import threading
from contextlib import closing
from pathlib import Path

import pytest
from skyferry.netplane import store
from skyferry.netplane.errors import NetplaneError
from skyferry.netplane.ipam import Ipam
from skyferry.netplane.mesh import Mesh, MeshHost, Wan
from skyferry.netplane.wan import WanSpec


def test_ipam_allocates_unique_persistent_addresses(tmp_path: Path) -> None:
    ipam = Ipam(tmp_path, "10.77.0.0/24")
    a, b = ipam.allocate("host:a"), ipam.allocate("container:b")
    assert a != b and {a, b} <= {str(ip) for ip in ipaddress.ip_network("10.77.0.0/24").hosts()}
    assert ipam.allocate("host:a") == a  # same owner, same address
    reopened = Ipam(tmp_path)  # persisted, CIDR included
    assert reopened.cidr == "10.77.0.0/24"
    assert reopened.owner_of(b) == "container:b" and reopened.lookup("host:a") == a
    with closing(sqlite3.connect(tmp_path / store.FILE)) as conn:  # in the file, not only in this process
        assert conn.execute("SELECT owner FROM ipam_allocations WHERE ip=?", (a,)).fetchone() == ("host:a",)


def test_ipam_never_reuses_a_held_address_and_reports_full(tmp_path: Path) -> None:
    ipam = Ipam(tmp_path, "10.77.0.0/29")  # 6 usable
    held = [ipam.allocate(f"c{i}") for i in range(6)]
    assert len(set(held)) == 6
    with pytest.raises(NetplaneError, match="full"):
        ipam.allocate("one-too-many")
    ipam.release(held[2])
    assert ipam.owner_of(held[2]) is None
    assert ipam.allocate("late") == held[2]  # the only free one
    assert set(ipam.allocations()) == set(held)


def test_ipam_moves_on_after_release(tmp_path: Path) -> None:
    ipam = Ipam(tmp_path, "10.77.0.0/24")
    first = ipam.allocate("x")
    ipam.release(first)
    assert ipam.allocate("y") != first  # a just-released address is not handed out again at once


def test_ipam_has_no_collisions_under_concurrency(tmp_path: Path) -> None:
    results: list[str] = []

    def worker(n: int) -> None:
        ipam = Ipam(tmp_path, "10.77.0.0/24")
        results.extend(ipam.allocate(f"w{n}-{i}") for i in range(10))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 80 and len(set(results)) == 80


@pytest.mark.parametrize("cidr", ["not-a-cidr", "10.0.0.1/24", "fd00::/64"])
def test_ipam_rejects_bad_cidr(tmp_path: Path, cidr: str) -> None:
    with pytest.raises(NetplaneError, match="CIDR"):
        Ipam(tmp_path, cidr)


def test_ipam_refuses_to_change_cidr_while_addresses_are_held(tmp_path: Path) -> None:
    Ipam(tmp_path, "10.77.0.0/24").allocate("x")
    with pytest.raises(NetplaneError, match=r"already uses 10\.77\.0\.0/24"):
        Ipam(tmp_path, "10.78.0.0/24")


def _member(name: str, ip: str, port: str) -> MeshHost:
    return MeshHost(name, ip, f"198.18.0.{port}:51820", f"key-{name}", f"m-{name}", f"m-{name}", f"/s/{name}", "local")


def test_mesh_round_trips_through_the_store_and_derives_peers(tmp_path: Path) -> None:
    mesh = Mesh(
        name="m1",
        cidr="100.64.0.0/16",
        controller=_member("controller", "100.64.0.1", "2"),
        hosts={"local-1": _member("local-1", "100.64.0.2", "11"), "local-2": _member("local-2", "100.64.0.3", "12")},
        homes={"100.64.0.9": "local-2"},
        wan=Wan(rate="1gbit", rtt="30ms", relay_address="198.18.0.1", relay_ports={"local-1,local-2": 40000}),
    )
    mesh.save(tmp_path)
    loaded = Mesh.load(tmp_path)
    assert loaded == mesh and loaded.controller.pid is None
    peers = {p.name: (endpoint, allowed) for p, endpoint, allowed in loaded.peers(loaded.host("local-1"))}
    assert peers == {
        "controller": ("198.18.0.2:51820", ["100.64.0.1/32"]),
        "local-2": ("198.18.0.1:40000", ["100.64.0.3/32", "100.64.0.9/32"]),  # via the relay
    }
    assert loaded.peers(loaded.controller)[0][1] == "198.18.0.11:51820"  # control traffic goes direct


def test_mesh_load_and_host_errors_are_actionable(tmp_path: Path) -> None:
    with pytest.raises(NetplaneError) as exc:
        Mesh.load(tmp_path)
    assert exc.value.hint == "run skyferry hosts up --local"
    Mesh(
        "m1",
        "100.64.0.0/16",
        _member("controller", "100.64.0.1", "2"),
        {"local-1": _member("local-1", "100.64.0.2", "11")},
    ).save(tmp_path)
    with pytest.raises(NetplaneError, match="unknown host 'local-9'") as exc:
        Mesh.load(tmp_path).host("local-9")
    assert exc.value.hint == "known hosts: local-1, controller"


def test_wan_spec_parses_and_rejects() -> None:
    spec = WanSpec.parse("rate=1gbit,rtt=30ms")
    assert (spec.rate, spec.rtt) == (10**9, pytest.approx(0.03))
    assert WanSpec.parse("rtt=5ms").rate is None
    assert WanSpec.parse("rate=200mbit").rate == 200 * 10**6
    for bad in ("rate=fast", "speed=1gbit", "rtt=30", "rate=1gbit,rate=2gbit", ""):
        with pytest.raises(NetplaneError):
            WanSpec.parse(bad)
