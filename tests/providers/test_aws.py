"""AwsProvider against moto's real HTTP server: libcloud for EC2, boto3 for Elastic IPs and Route53."""

import boto3
import pytest
from moto_server import PatchedMotoServer

from skyferry.providers.aws import AwsProvider
from skyferry.providers.base import WIREGUARD_PORT
from skyferry.providers.errors import ProviderError
from skyferry.providers.naming import PLAN_TAG

pytestmark = pytest.mark.integration
IMAGE = "ami-785db401"  # an Ubuntu AMI moto ships; real runs find Debian 12 by itself


def ec2(url: str):  # noqa: ANN201  boto3 clients have no static type
    return boto3.client("ec2", endpoint_url=url, region_name="us-east-1")


def test_full_ec2_cycle(aws_env: str, plan: str, tmp_path) -> None:
    aws = AwsProvider(endpoint_url=aws_env, key_dir=tmp_path / "keys")
    hosts = aws.provision(plan, 2, size="t3.micro", image=IMAGE, user_data=lambda n: f"#cloud-config\nhostname: {n}\n")
    assert sorted(h.name for h in hosts) == [f"{plan}-0", f"{plan}-1"]
    assert all(h.tags[PLAN_TAG] == plan and h.provider == "aws" for h in hosts)
    ready = aws.wait_ready(hosts, timeout=30)
    assert all(h.state == "running" and h.address for h in ready)

    client = ec2(aws_env)
    described = client.describe_instances(Filters=[{"Name": f"tag:{PLAN_TAG}", "Values": [plan]}])
    instances = [i for r in described["Reservations"] for i in r["Instances"]]
    assert len(instances) == 2
    attr = client.describe_instance_attribute(InstanceId=instances[0]["InstanceId"], Attribute="userData")
    assert attr["UserData"]["Value"]  # base64 of the per-host document
    assert {k["KeyName"] for k in client.describe_key_pairs()["KeyPairs"]} >= {f"skyferry-{plan}"}
    assert (tmp_path / "keys" / f"skyferry-{plan}.pem").read_text().startswith("-----BEGIN")
    group = client.describe_security_groups(Filters=[{"Name": "group-name", "Values": [f"skyferry-{plan}"]}])
    perms = group["SecurityGroups"][0]["IpPermissions"]
    assert {(p["IpProtocol"], p["FromPort"], p["ToPort"]) for p in perms} == {("udp", WIREGUARD_PORT, WIREGUARD_PORT)}

    # Idempotent: a second run finds both, and opening the port again is not an error.
    again = aws.provision(plan, 2, size="t3.micro", image=IMAGE)
    assert {h.id for h in again} == {h.id for h in hosts}
    aws.open_wireguard_port(plan)

    removed = aws.destroy(plan)
    assert {h.id for h in hosts} <= set(removed)
    assert aws.list(plan) == []
    assert not client.describe_security_groups(
        Filters=[{"Name": "group-name", "Values": [f"skyferry-{plan}"]}]
    )["SecurityGroups"]
    assert aws.destroy(plan) == []
