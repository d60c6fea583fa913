"""Each response patch in moto_server.py is still needed with moto 5.2.5: without it libcloud breaks.

When a moto upgrade fixes one of these, its test here fails: drop that patch and this test.
"""

from collections.abc import Iterator

import boto3
import moto
import pytest
from kit.moto_server import MOTO_VERSION, PATCHES, PatchedMotoServer
from libcloud.compute.drivers.ec2 import EC2NodeDriver

pytestmark = pytest.mark.integration


def test_moto_is_the_pinned_version() -> None:
    assert moto.__version__ == MOTO_VERSION


@pytest.fixture
def without(request: pytest.FixtureRequest, aws_env: str) -> Iterator[tuple[EC2NodeDriver, EC2NodeDriver, str]]:
    """(driver through all patches, driver through all but one, boto3 endpoint). Both servers share moto's
    in-process state, so what one creates the other sees."""
    server = PatchedMotoServer(PATCHES - {request.param})
    server.start()
    try:
        drivers = []
        for url in (aws_env, server.url):
            host, port = url.removeprefix("http://").split(":")
            drivers.append(
                EC2NodeDriver(
                    "testing", "testing", region="us-east-1", host=host, port=int(port), secure=False,
                    signature_version="4",
                )
            )  # fmt: skip
        yield drivers[0], drivers[1], aws_env
    finally:
        server.stop()


def _instance(url: str, run_id: str) -> str:
    ec2 = boto3.client("ec2", endpoint_url=url, region_name="us-east-1")
    resp = ec2.run_instances(
        ImageId="ami-785db401", MinCount=1, MaxCount=1,
        TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": "patchtest", "Value": run_id}]}],
    )  # fmt: skip
    return resp["Instances"][0]["InstanceId"]


@pytest.mark.parametrize("without", ["namespace"], indirect=True)
def test_namespace_patch_needed(without: tuple[EC2NodeDriver, EC2NodeDriver, str], run_id: str) -> None:
    patched, unpatched, url = without
    iid = _instance(url, run_id)
    flt = {"tag:patchtest": run_id}
    assert [n.id for n in patched.list_nodes(ex_filters=flt)] == [iid]
    assert unpatched.list_nodes(ex_filters=flt) == []  # moto's namespace lacks the '/': silently empty


@pytest.mark.parametrize("without", ["tag_index"], indirect=True)
def test_tag_index_patch_needed(without: tuple[EC2NodeDriver, EC2NodeDriver, str], run_id: str) -> None:
    patched, unpatched, url = without
    node = patched.list_nodes(ex_node_ids=[_instance(url, run_id)])[0]
    assert patched.ex_create_tags(node, {"a": "1"}) is True
    with pytest.raises(Exception, match=r"MissingParameter.*resourceIdSet"):
        unpatched.ex_create_tags(node, {"b": "2"})  # ResourceId.0, Tag.0.Key: moto counts from 1


@pytest.mark.parametrize("without", ["return_true"], indirect=True)
def test_return_true_patch_needed(without: tuple[EC2NodeDriver, EC2NodeDriver, str], run_id: str) -> None:
    patched, unpatched, url = without
    node = patched.list_nodes(ex_node_ids=[_instance(url, run_id)])[0]
    assert patched.ex_create_tags(node, {"c": "3"}) is True
    assert unpatched.ex_create_tags(node, {"d": "4"}) is False  # tagged, but libcloud reads failure
    assert patched.list_nodes(ex_node_ids=[node.id])[0].extra["tags"]["d"] == "4"


@pytest.mark.parametrize("without", ["error_namespace"], indirect=True)
def test_error_namespace_patch_needed(without: tuple[EC2NodeDriver, EC2NodeDriver, str]) -> None:
    patched, unpatched, _ = without
    with pytest.raises(Exception, match=r"InvalidGroup.NotFound") as exc:
        patched.ex_get_security_groups(group_ids=["sg-00000000000000000"])
    assert "does not exist" in str(exc.value)
    with pytest.raises(Exception) as exc:
        unpatched.ex_get_security_groups(group_ids=["sg-00000000000000000"])
    assert str(exc.value) == ""  # the operator would see an empty message
