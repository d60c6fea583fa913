"""inventory.join/leave on a live local mesh: the controller's WireGuard learns and forgets cloud peers."""

import os
from pathlib import Path

import pytest
from kit.keys import new_wireguard_key
from skyferry.netplane import wg
from skyferry.netplane.ipam import Ipam
from skyferry.netplane.mesh import Mesh
from skyferry.providers import inventory
from skyferry.providers.base import Host
from skyferry.providers.errors import ProviderError
from skyferry.providers.local import LocalProvider

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: local hosts are network namespaces"),
]


def _member(name: str, ip: str) -> inventory.Member:
    host = Host(name=name, provider="aws", plan="p", id=f"i-{name}", address=ip, state="running")
    return inventory.Member(host, new_wireguard_key()[1])


def test_join_and_leave_a_live_mesh(state: Path, run_id: str) -> None:
    local = LocalProvider(state)
    try:
        local.up(1, run_id)
        ctl = Mesh.load(state).controller
        member = _member("p-0", "198.51.100.20")
        assert inventory.join(state, [member]) == ["p-0"]
        assert inventory.join(state, [member]) == []  # idempotent
        mesh = Mesh.load(state)
        joined = mesh.hosts["p-0"]
        assert joined.netns is None and joined.endpoint == "198.51.100.20:51820"
        assert Ipam(state).owner_of(joined.overlay_ip) == "host:p-0"
        dump = wg.wg(ctl.netns, "show", ctl.interface, "allowed-ips")
        assert f"{member.public_key}\t{joined.overlay_ip}/32" in dump

        with pytest.raises(ProviderError, match="already a local host"):
            inventory.join(state, [_member("local-1", "198.51.100.21")])

        assert inventory.leave(state, ["p-0"]) == ["p-0"]
        assert member.public_key not in wg.wg(ctl.netns, "show", ctl.interface, "peers")
        assert "p-0" not in Mesh.load(state).hosts and Ipam(state).owner_of(joined.overlay_ip) is None
        assert inventory.leave(state, ["p-0"]) == []
    finally:
        inventory.leave(state, ["p-0"])
        local.down()
