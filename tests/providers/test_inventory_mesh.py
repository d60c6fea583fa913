"""`inventory import` on a live local mesh: records for hosts that have not joined, a joined member's row
following its record (and every member's WireGuard its new endpoint), and leaving."""

import json
import os
from pathlib import Path

import pytest
from kit.keys import new_wireguard_key
from kit.mesh import mesh_in
from skyferry.netplane import routes, wg
from skyferry.netplane.ipam import Ipam
from skyferry.netplane.mesh import MACHINE_INTERFACE, MACHINE_STATE_ROOT, Mesh, MeshHost
from skyferry.pipeline.controller import agentctl
from skyferry.pipeline.controller.provision import import_terraform
from skyferry.providers import inventory
from skyferry.providers.errors import ProviderError

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: local hosts are network namespaces"),
]


def _outputs(tmp_path: Path, hosts: dict[str, str], port: int = 51820) -> Path:
    """A `terraform output -json` document naming `hosts` (name -> public address)."""
    path = tmp_path / "terraform-output.json"
    value = [
        {"name": n, "provider": "aws", "plan": "p", "id": f"i-{n}", "public_ip": ip, "private_ip": "10.0.0.9",
         "region": "eu-central-1", "size": "t3.small", "wireguard_port": port}
        for n, ip in hosts.items()
    ]  # fmt: skip
    path.write_text(json.dumps({inventory.OUTPUT: {"value": value, "type": [], "sensitive": False}}))
    return path


def test_import_records_waiting_hosts_and_follows_joined_ones(state: Path, tmp_path: Path) -> None:
    with mesh_in(state, count=1, prefix="i") as mesh:
        # p-1 never joined: a record, no member, no address.
        out = import_terraform(state, _outputs(tmp_path, {"p-1": "198.51.100.21"}))
        assert (out["joined"], out["waiting"], out["hosts"][0]["join"]) == ([], ["p-1"], "no-token")
        assert "p-1" not in Mesh.load(state).hosts and Ipam(state).lookup("host:p-1") is None
        assert inventory.recorded(state)["p-1"].host.id == "i-p-1"

        # p-0 joined (as the enrolment service records a member) from 198.51.100.20; every member knows it.
        key = new_wireguard_key()[1]
        joined = MeshHost("p-0", Ipam(state).allocate("host:p-0"), "198.51.100.20:51820", key, MACHINE_INTERFACE,
                          None, MACHINE_STATE_ROOT, "terraform")  # fmt: skip
        mesh = Mesh.load(state)
        mesh.hosts["p-0"] = joined
        mesh.save(state)
        routes.apply(mesh, agentctl.Pusher(state, mesh), only={"p-0"})

        # Terraform says p-0's public address is now .30 (a new Elastic IP): its row and every peer follow.
        source = _outputs(tmp_path, {"p-0": "198.51.100.30", "p-1": "198.51.100.21"})
        out = import_terraform(state, source)
        assert out["joined"] == ["p-0"] and [h["changed"] for h in out["hosts"]] == [True, False]
        assert out["hosts"][0]["endpoint_was"] == "198.51.100.20:51820"  # said, in case it joined from elsewhere
        member = Mesh.load(state).hosts["p-0"]
        assert (member.endpoint, member.provider, member.public_key) == ("198.51.100.30:51820", "aws", key)
        for m in (mesh.controller, mesh.hosts["local-1"]):
            assert f"{key}\t198.51.100.30:51820" in wg.wg(m.netns, "show", m.interface, "endpoints"), m.name
        again = import_terraform(state, source)
        assert [h["changed"] for h in again["hosts"]] == [False, False]
        assert Mesh.load(state).hosts["p-0"] == member

        # Names and ports the mesh cannot take are refused, naming the host and field.
        with pytest.raises(ProviderError, match="host 'local-1' is already a local host"):
            import_terraform(state, _outputs(tmp_path, {"local-1": "198.51.100.22"}))
        with pytest.raises(ProviderError, match="host 'p-0': wireguard_port 51821 is not mesh"):
            import_terraform(state, _outputs(tmp_path, {"p-0": "198.51.100.30"}, port=51821))

        assert inventory.leave(state, ["p-0"]) == ["p-0"]
        rest = Mesh.load(state)  # what decommission does next: every member drops the peer
        routes.remove_peer(rest, member, agentctl.Pusher(state, rest))
        for m in (rest.controller, rest.hosts["local-1"]):
            assert key not in wg.wg(m.netns, "show", m.interface, "peers"), m.name
        assert inventory.forget(state, ["p-0", "p-1", "p-9"]) == ["p-0", "p-1"]
        assert inventory.recorded(state) == {} and inventory.leave(state, ["p-0"]) == []
