"""AwsProvider against moto's real HTTP server: libcloud for EC2, boto3 for Elastic IPs and Route53."""

import boto3
import pytest
from kit.moto_server import PatchedMotoServer
from skyferry.providers.aws import AwsProvider
from skyferry.providers.base import WIREGUARD_PORT
from skyferry.providers.errors import ProviderError
from skyferry.providers.naming import PLAN_TAG

pytestmark = pytest.mark.integration
IMAGE = "ami-785db401"  # an Ubuntu AMI moto ships; real runs find Debian 12 by itself


def ec2(url: str):
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
    for inst in instances:  # IMDSv2 only, and one hop: containers on the host cannot reach it
        meta = inst["MetadataOptions"]
        assert (meta["HttpTokens"], meta["HttpPutResponseHopLimit"]) == ("required", 1), meta
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
    assert not client.describe_security_groups(Filters=[{"Name": "group-name", "Values": [f"skyferry-{plan}"]}])[
        "SecurityGroups"
    ]
    assert aws.destroy(plan) == []


def test_elastic_ip_moves_between_instances(aws_env: str, plan: str) -> None:
    aws = AwsProvider(endpoint_url=aws_env)
    try:
        a, b = aws.wait_ready(aws.provision(plan, 2, size="t3.micro", image=IMAGE), timeout=30)
        client = ec2(aws_env)
        alloc = client.allocate_address(Domain="vpc")
        try:
            aws.ex_move_elastic_ip(alloc["AllocationId"], a.id)
            assert _eip_instance(client, alloc["AllocationId"]) == a.id
            aws.ex_move_elastic_ip(alloc["AllocationId"], b.id)  # the cutover: taken from a, given to b
            assert _eip_instance(client, alloc["AllocationId"]) == b.id
        finally:
            client.disassociate_address(PublicIp=alloc["PublicIp"])
            client.release_address(AllocationId=alloc["AllocationId"])
    finally:
        aws.destroy(plan)


def _eip_instance(client, allocation_id: str) -> str:
    return client.describe_addresses(AllocationIds=[allocation_id])["Addresses"][0].get("InstanceId")


def test_route53_upsert_reaches_insync(aws_env: str, run_id: str) -> None:
    aws = AwsProvider(endpoint_url=aws_env)
    r53 = boto3.client("route53", endpoint_url=aws_env, region_name="us-east-1")
    zone = r53.create_hosted_zone(Name=f"{run_id}.example.test", CallerReference=run_id)["HostedZone"]["Id"]
    try:
        name = f"app.{run_id}.example.test"
        change = aws.ex_upsert_record(zone, name, ["198.51.100.7"])
        assert r53.get_change(Id=change)["ChangeInfo"]["Status"] == "INSYNC"
        aws.ex_upsert_record(zone, name, ["198.51.100.8"])  # UPSERT again: replaces, no error
        sets = r53.list_resource_record_sets(HostedZoneId=zone)["ResourceRecordSets"]
        record = next(s for s in sets if s["Name"] == name + "." and s["Type"] == "A")
        assert record["ResourceRecords"] == [{"Value": "198.51.100.8"}]
    finally:
        for s in r53.list_resource_record_sets(HostedZoneId=zone)["ResourceRecordSets"]:
            if s["Type"] == "A":
                r53.change_resource_record_sets(
                    HostedZoneId=zone, ChangeBatch={"Changes": [{"Action": "DELETE", "ResourceRecordSet": s}]}
                )
        r53.delete_hosted_zone(Id=zone)


def _leftovers(url: str, plan: str) -> list[str]:
    """Everything tagged or named for `plan` that is still alive."""
    client = ec2(url)
    flt = [{"Name": f"tag:{PLAN_TAG}", "Values": [plan]}]
    alive = [
        i["InstanceId"]
        for r in client.describe_instances(Filters=flt)["Reservations"]
        for i in r["Instances"]
        if i["State"]["Name"] not in ("terminated", "shutting-down")
    ]
    name = [{"Name": "group-name", "Values": [f"skyferry-{plan}"]}]
    groups = [g["GroupId"] for g in client.describe_security_groups(Filters=name)["SecurityGroups"]]
    keys = [k["KeyName"] for k in client.describe_key_pairs()["KeyPairs"] if k["KeyName"] == f"skyferry-{plan}"]
    return alive + groups + keys


def test_quota_error_cleans_up(aws_env: str, moto_server: PatchedMotoServer, plan: str) -> None:
    aws = AwsProvider(endpoint_url=aws_env)
    rendered: list[str] = []

    def user_data(name: str) -> str:
        rendered.append(name)
        if len(rendered) == 2:  # moto has no quotas: the server answers this RunInstances as EC2 would
            moto_server.quirks.fail_next(
                "RunInstances", 400, "InstanceLimitExceeded", "Your quota allows for 0 more running instance(s)."
            )
        return f"#cloud-config\nhostname: {name}\n"

    with pytest.raises(ProviderError, match=r"AWS quota reached.*InstanceLimitExceeded") as exc:
        aws.provision(plan, 3, size="t3.micro", image=IMAGE, user_data=user_data)
    assert "nothing was left behind" in (exc.value.hint or "")
    assert rendered == [f"{plan}-0", f"{plan}-1"]  # one instance was made before the error
    assert _leftovers(aws_env, plan) == []


def test_unknown_region(aws_env: str) -> None:
    with pytest.raises(ProviderError, match="unknown AWS region 'us-nowhere-9'"):
        AwsProvider(region="us-nowhere-9", endpoint_url=aws_env)


def test_unknown_size(aws_env: str, plan: str) -> None:
    with pytest.raises(ProviderError, match=r"unknown AWS instance size 't3.mediun'") as exc:
        AwsProvider(endpoint_url=aws_env).provision(plan, 1, size="t3.mediun", image=IMAGE)
    assert "t3.medium" in (exc.value.hint or "")
    assert _leftovers(aws_env, plan) == []


def test_unknown_image(aws_env: str, plan: str) -> None:
    with pytest.raises(ProviderError, match=r"AWS image not found.*InvalidAMIID"):
        AwsProvider(endpoint_url=aws_env).provision(plan, 1, size="t3.micro", image="ami-00000000")
    assert _leftovers(aws_env, plan) == []


def test_missing_credentials(aws_env: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(ProviderError, match="no AWS credentials found") as exc:
        AwsProvider(endpoint_url=aws_env)
    assert "AWS_ACCESS_KEY_ID" in (exc.value.hint or "")


def test_rejected_credentials_are_not_echoed(aws_env: str, moto_server: PatchedMotoServer, plan: str) -> None:
    aws = AwsProvider(endpoint_url=aws_env)
    moto_server.quirks.fail_next(
        "DescribeInstances", 401, "AuthFailure", "AWS was not able to validate the provided access credentials"
    )
    with pytest.raises(ProviderError, match="AWS rejected the credentials") as exc:
        aws.list(plan)
    assert "testing" not in str(exc.value) + str(exc.value.hint)  # the key id and secret are both "testing"


def test_throttling_is_retried(aws_env: str, moto_server: PatchedMotoServer, plan: str) -> None:
    aws = AwsProvider(endpoint_url=aws_env)
    before = moto_server.quirks.actions.count("DescribeInstances")
    moto_server.quirks.fail_next("DescribeInstances", 503, "RequestLimitExceeded", "Request limit exceeded.", times=2)
    assert aws.list(plan) == []
    assert moto_server.quirks.actions.count("DescribeInstances") - before == 3  # two throttled, one answered


def test_oversized_user_data_is_refused_before_anything_is_left(aws_env: str, plan: str) -> None:
    with pytest.raises(ProviderError, match="EC2 takes 16384"):
        AwsProvider(endpoint_url=aws_env).provision(plan, 1, size="t3.micro", image=IMAGE, user_data="#" * 20000)
    assert _leftovers(aws_env, plan) == []


def test_credentials_from_a_profile(aws_env: str, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    creds = tmp_path / "credentials"
    creds.write_text("[skyferry-test]\naws_access_key_id = testing\naws_secret_access_key = testing\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_PROFILE", "skyferry-test")
    assert AwsProvider(endpoint_url=aws_env).list("nothing") == []
    monkeypatch.setenv("AWS_PROFILE", "nope")
    with pytest.raises(ProviderError, match="AWS profile not found"):
        AwsProvider(endpoint_url=aws_env)
