"""Public ingress after the overlay cutover, against moto's real HTTP server (the providers' patched one):
a Route53 record and an Elastic IP follow the container; `gateway` changes nothing outside the overlay.
Then, on real local hosts: the record follows a migrated container, and with ports the host's agent
DNATs its public (underlay) address to the container's /32, so a client on the "internet" (the mesh's
switch netns) reaches the container through the address the record names, before and after a move."""

import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from kit.keys import new_wireguard_key
from kit.moto_server import PatchedMotoServer
from kit.runbook import cli, counter, local_mesh, remove_all
from skyferry.netplane.ipam import Ipam
from skyferry.netplane.mesh import Mesh, MeshHost
from skyferry.netplane.netns import in_netns
from skyferry.pipeline.agent import dnat
from skyferry.pipeline.controller import agentctl
from skyferry.pipeline.controller.registry import Entry, Registry
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.hostapi.publish import PublicPort
from skyferry.pipeline.hostapi.spec import ContainerSpec
from skyferry.pipeline.runbooks import evacuate, exitplan, ingress
from skyferry.pipeline.scenarios import demo as scenario
from skyferry.providers import inventory
from skyferry.providers.aws import AwsProvider
from skyferry.providers.base import Host
from skyferry.providers.naming import PLAN_TAG

pytestmark = pytest.mark.integration
IMAGE = "ami-785db401"  # an AMI moto ships


@pytest.fixture(scope="module")
def moto() -> Iterator[str]:
    server = PatchedMotoServer()
    server.start()
    env = {
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
        "AWS_EC2_METADATA_DISABLED": "true", "SKYFERRY_AWS_ENDPOINT_URL": server.url,
    }  # fmt: skip
    old = {k: os.environ.get(k) for k in [*env, "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION"]}
    os.environ.update(env)
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION"):
        os.environ.pop(k, None)
    try:
        yield server.url
    finally:
        server.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def zone(url: str, name: str) -> str:
    r53 = boto3.client("route53", endpoint_url=url)
    made = r53.create_hosted_zone(Name=name, CallerReference=os.urandom(6).hex())
    return made["HostedZone"]["Id"].rsplit("/", 1)[-1]


def a_record(url: str, zone_id: str, name: str) -> list[str]:
    sets = boto3.client("route53", endpoint_url=url).list_resource_record_sets(HostedZoneId=zone_id)
    return [r["Value"] for s in sets["ResourceRecordSets"] if s["Name"] == name and s["Type"] == "A"
            for r in s["ResourceRecords"]]  # fmt: skip


def test_route53_record_follows_and_reapplying_is_harmless(moto: str) -> None:
    zone_id = zone(moto, f"r{os.urandom(2).hex()}.example.com")
    name = f"app.{boto3.client('route53', endpoint_url=moto).get_hosted_zone(Id=zone_id)['HostedZone']['Name']}"
    spec = ingress.parse(f"route53:{zone_id}:{name}", "app")
    aws = AwsProvider(endpoint_url=moto)
    first = ingress.apply(spec, "100.64.0.9", ingress.Target("cloud-b-1", "203.0.113.10"), aws)
    assert first["value"] == "203.0.113.10" and a_record(moto, zone_id, name) == ["203.0.113.10"]
    ingress.apply(spec, "100.64.0.9", ingress.Target("cloud-b-1", "203.0.113.10"), aws)
    ingress.apply(spec, "100.64.0.9", ingress.Target("cloud-b-2", "203.0.113.20"), aws)
    assert a_record(moto, zone_id, name) == ["203.0.113.20"]


def test_elastic_ip_moves_to_the_target_instance(moto: str) -> None:
    ec2 = boto3.client("ec2", endpoint_url=moto)
    first, second = (i["InstanceId"] for i in ec2.run_instances(ImageId=IMAGE, MinCount=2, MaxCount=2)["Instances"])
    alloc = ec2.allocate_address(Domain="vpc")["AllocationId"]
    ec2.associate_address(AllocationId=alloc, InstanceId=first)
    spec = ingress.parse(f"eip:{alloc}", "app")
    moved = ingress.apply(spec, "100.64.0.9", ingress.Target("cloud-b-1", None, second), AwsProvider(endpoint_url=moto))
    assert moved["instance"] == second
    assert ec2.describe_addresses(AllocationIds=[alloc])["Addresses"][0]["InstanceId"] == second
    ingress.apply(spec, "100.64.0.9", ingress.Target("cloud-b-1", None, second), AwsProvider(endpoint_url=moto))
    assert ec2.describe_addresses(AllocationIds=[alloc])["Addresses"][0]["InstanceId"] == second
    ec2.terminate_instances(InstanceIds=[first, second])


def test_elastic_ip_follows_to_a_terraform_host_by_its_recorded_id(moto: str, tmp_path: Path) -> None:
    """A host Terraform made carries no tags AwsProvider.list knows, in whatever region; `inventory import`
    recorded its instance id, which is what the Elastic IP follows after a cutover."""
    ec2 = boto3.client("ec2", endpoint_url=moto)
    instance = ec2.run_instances(ImageId=IMAGE, MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]
    alloc = ec2.allocate_address(Domain="vpc")["AllocationId"]
    state, key = tmp_path / "state", new_wireguard_key()[1]
    ctl = MeshHost("controller", Ipam(state).allocate("host:controller"), "203.0.113.1:51820", key, "wg0", None,
                   str(state), "controller")  # fmt: skip
    mesh = Mesh(name="ing" + os.urandom(2).hex(), cidr=Ipam(state).cidr, controller=ctl)
    mesh.hosts["tf-0"] = MeshHost("tf-0", Ipam(state).allocate("host:tf-0"), "198.51.100.7:51820",
                                  new_wireguard_key()[1], "skyferry", None, "/var/lib/skyferry/host",
                                  "aws")  # fmt: skip
    mesh.save(state)
    entry = Entry(
        "web", "tf-0", "100.64.0.9", ContainerSpec("web", ["true"], "100.64.0.9", labels={"ingress": f"eip:{alloc}"})
    )
    unknown = ingress.after_cutover(state, entry, "tf-0")  # the control: without a record, no instance
    assert unknown is not None and "not an instance the AWS provider knows" in unknown["error"]
    host = Host("tf-0", "aws", "tf", instance, "198.51.100.7", region="us-east-1")
    assert inventory.record(state, [inventory.Record(host)]) == ["tf-0"]
    moved = ingress.after_cutover(state, entry, "tf-0")
    assert moved is not None and moved.get("instance") == instance, moved
    assert ec2.describe_addresses(AllocationIds=[alloc])["Addresses"][0]["InstanceId"] == instance
    ec2.terminate_instances(InstanceIds=[instance])


def test_gateway_and_bad_labels() -> None:
    done = ingress.apply(ingress.parse("gateway"), "100.64.0.9", ingress.Target("h", None))
    assert done["kind"] == "gateway" and done["ip"] == "100.64.0.9"
    bad_ports = ("eip:eipalloc-1:http", "eip:eipalloc-1:80,80", "route53:Z:n.example.com:0", "eip:eipalloc-1:80/sctp")
    for bad in ("route53:ZONE", "eip:abc", "dns:x", "gateway:x", *bad_ports):
        with pytest.raises(SkyferryError, match=f"label ingress='{bad}'"):
            ingress.parse(bad, "web")


def test_labels_may_name_ports_and_the_old_grammar_still_parses() -> None:
    assert ingress.parse("eip:eipalloc-1") == ingress.Ingress("eip", allocation="eipalloc-1")
    assert ingress.parse("route53:Z1:app.example.com") == ingress.Ingress(
        "route53", zone="Z1", record="app.example.com"
    )
    spec = ingress.parse("eip:eipalloc-1:443=8443,80,53/udp")
    assert spec.allocation == "eipalloc-1"
    assert spec.ports == (PublicPort("tcp", 80, 80), PublicPort("tcp", 443, 8443), PublicPort("udp", 53, 53))
    assert [str(p) for p in spec.ports] == ["80/tcp", "443=8443/tcp", "53/udp"]
    assert ingress.parse("route53:Z1:app.example.com:80").ports == (PublicPort("tcp", 80, 80),)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    with local_mesh(tmp_path_factory.mktemp("state"), 2) as m:
        yield m


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_a_migrated_container_takes_its_record_along(moto: str, mesh: Mesh, tmp_path: Path) -> None:
    zone_id = zone(moto, f"r{os.urandom(2).hex()}.example.org")
    record = f"web.{boto3.client('route53', endpoint_url=moto).get_hosted_zone(Id=zone_id)['HostedZone']['Name']}"
    state = mesh.state
    assert state is not None
    try:
        counter(state, "local-1", "web", tmp_path, labels={"ingress": f"route53:{zone_id}:{record}"})
        result = evacuate.move(state, "web", "local-2")
        assert result["state"] == "done", result
        address = mesh.hosts["local-2"].endpoint_address
        assert result["ingress"]["summary"] == f"{record} -> {address}"
        assert a_record(moto, zone_id, record) == [address]
    finally:
        remove_all(state)


@pytest.mark.slow  # two runs each wait out a connect timeout to an agent that never comes
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_an_exit_to_aws_provisions_and_joins_once(moto: str, mesh: Mesh, tmp_path: Path) -> None:
    """The exit plan provisions its cloud target through `skyferry provision` (moto's EC2) and waits for it to
    join the mesh; moto's instances never boot, so the run stops there, clearly, and a re-run provisions
    nothing new (it waits for the same host again: its token stays valid)."""
    state = mesh.state
    assert state is not None
    name = f"exit-{os.urandom(2).hex()}"
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"""
name: {name}
source: {{hosts: [local-1]}}
target: {{provider: aws, region: us-east-1, size: t3.micro, image: {IMAGE}, count: 1, agent_timeout: 1}}
waves: [{{name: w, containers: [cx]}}]
""")
    ec2 = boto3.client("ec2", endpoint_url=moto)

    def instances() -> list[str]:
        found = ec2.describe_instances(
            Filters=[
                {"Name": f"tag:{PLAN_TAG}", "Values": [name]},
                {"Name": "instance-state-name", "Values": ["pending", "running"]},
            ]
        )
        return [i["InstanceId"] for r in found["Reservations"] for i in r["Instances"]]  # fmt: skip

    try:
        counter(state, "local-1", "cx", tmp_path)
        first = cli("exit", "--plan", str(plan), "--json")
        assert first.returncode == 2, first.stdout + first.stderr
        assert f"hosts did not join within 1 s: {name}-0" in json.loads(first.stdout)["error"]
        assert f"{name}-0" not in Mesh.load(state).hosts  # a member only once it joins, with its own key
        made = instances()
        assert len(made) == 1
        assert (exitplan.Steps(state, name).get("provision") or {}).get("status") != "done"

        again = cli("exit", "--plan", str(plan), "--json")
        assert again.returncode == 2 and "did not join" in json.loads(again.stdout)["error"]
        assert instances() == made, "provisioned once"
        assert Registry(state).get("cx").host == "local-1", "nothing moved towards a host without an agent"
    finally:
        cli("decommission", "--plan", name, "--provider", "aws", "--json")
        remove_all(state)
    assert f"{name}-0" not in Mesh.load(state).hosts and instances() == []


def fetch(mesh: Mesh, host: str, port: int, path: str = "/who") -> str:
    """GET `path` from `host`'s public address, from the mesh's switch netns (the internet here)."""
    assert mesh.local is not None
    with in_netns(mesh.local.switch_netns):
        sock = socket.create_connection((mesh.hosts[host].endpoint_address, port), timeout=5)
    with sock:
        sock.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
        answer = b"".join(iter(lambda: sock.recv(65536), b""))
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200"), head
    return body.decode()


def refused(mesh: Mesh, host: str, port: int) -> bool:
    try:
        fetch(mesh, host, port)
    except ConnectionRefusedError:
        return True
    return False


def wait_listening(mesh: Mesh, host: str, ip: str, port: int, timeout: float = 30.0) -> None:
    """http.server binds only after socket.getfqdn() gave up on DNS (about 5 s in a netns without it)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with in_netns(mesh.hosts[host].netns or ""):
                socket.create_connection((ip, port), timeout=2).close()
            return
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def web_rootfs(tmp_path: Path, token: str) -> Path:
    rootfs = tmp_path / "web-rootfs"
    (rootfs / "srv").mkdir(parents=True)
    (rootfs / "srv" / "who").write_text(token)
    return rootfs


def run_web(name: str, label: str, rootfs: Path, host: str = "local-1") -> subprocess.CompletedProcess[str]:
    server = [scenario.PYTHON, "-m", "http.server", "8080", "--bind", "0.0.0.0", "--directory", "/srv"]
    return cli("run", "--host", host, "--name", name, "--rootfs", str(rootfs), "--label", f"ingress={label}",
               "--host-programs", "--json", "--", *server)  # fmt: skip


def published(state: Path, mesh: Mesh, host: str) -> list[dict]:
    return agentctl.client(state, mesh, host).call("GET", "/v1/ingress")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_a_public_port_delivers_to_the_container_and_follows_it(moto: str, mesh: Mesh, tmp_path: Path) -> None:
    zone_id = zone(moto, f"r{os.urandom(2).hex()}.example.net")
    record = f"www.{boto3.client('route53', endpoint_url=moto).get_hosted_zone(Id=zone_id)['HostedZone']['Name']}"
    state = mesh.state
    assert state is not None
    token = f"web-{os.urandom(4).hex()}"
    try:
        started = run_web("www", f"route53:{zone_id}:{record}:80=8080", web_rootfs(tmp_path, token))
        assert started.returncode == 0, started.stdout + started.stderr
        info = json.loads(started.stdout)
        assert info["ingress"]["published"] == [
            {"proto": "tcp", "public": 80, "ip": info["ip"], "container": 8080, "name": "www"}
        ]
        assert a_record(moto, zone_id, record) == [mesh.hosts["local-1"].endpoint_address]
        wait_listening(mesh, "local-1", info["ip"], 8080)
        assert fetch(mesh, "local-1", 80) == token  # the address the record names delivers to the container
        assert refused(mesh, "local-2", 80)  # control: a host that publishes nothing delivers nothing

        moved = cli("evacuate", "--host", "local-1", "--to", "local-2", "--json")
        assert moved.returncode == 0, moved.stdout + moved.stderr
        row = json.loads(moved.stdout)["results"][0]
        assert row["state"] == "done" and row["ingress"]["unpublished"]["host"] == "local-1", row
        assert a_record(moto, zone_id, record) == [mesh.hosts["local-2"].endpoint_address]
        assert fetch(mesh, "local-2", 80) == token
        assert refused(mesh, "local-1", 80) and published(state, mesh, "local-1") == []
        assert [p["name"] for p in published(state, mesh, "local-2")] == ["www"]

        back = cli("migrate", "www", "--to", "local-1", "--json")  # `migrate` takes the label along too
        assert back.returncode == 0, back.stdout + back.stderr
        assert json.loads(back.stdout)["ingress"]["unpublished"]["host"] == "local-2"
        assert a_record(moto, zone_id, record) == [mesh.hosts["local-1"].endpoint_address]
        assert fetch(mesh, "local-1", 80) == token
        assert refused(mesh, "local-2", 80) and published(state, mesh, "local-2") == []
    finally:
        remove_all(state)
    assert published(state, mesh, "local-2") == [], "a removed container takes its public ports along"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_conflicting_public_ports_are_refused(mesh: Mesh, tmp_path: Path) -> None:
    state = mesh.state
    assert state is not None
    agent = agentctl.client(state, mesh, "local-2")
    try:
        for name in ("one", "two"):
            counter(state, "local-2", name, tmp_path)
        assert agent.call("POST", "/v1/containers/one/ingress", {"ports": ["9080=9000"]})["published"]
        # idempotent, and a second call with other ports replaces the first set
        agent.call("POST", "/v1/containers/one/ingress", {"ports": ["9080=9000"]})
        with pytest.raises(SkyferryError, match="port 9080/tcp on local-2 is already published for container 'one'"):
            agent.call("POST", "/v1/containers/two/ingress", {"ports": ["9080=9000"]})
        host_ns = mesh.hosts["local-2"].netns
        assert host_ns is not None
        with in_netns(host_ns):
            listener = socket.create_server(("0.0.0.0", 9081))
        with listener, pytest.raises(SkyferryError, match="port 9081/tcp on local-2 belongs to a process of the host"):
            agent.call("POST", "/v1/containers/two/ingress", {"ports": ["9081=9000"]})
        assert agent.call("POST", "/v1/containers/two/ingress", {"ports": ["9082=9000"]})["published"]  # control
        assert [(p["name"], p["public"]) for p in published(state, mesh, "local-2")] == [("one", 9080), ("two", 9082)]
        agent.call("POST", "/v1/containers/one/ingress", {"ports": ["9083=9000"]})
        assert [(p["name"], p["public"]) for p in published(state, mesh, "local-2")] == [("two", 9082), ("one", 9083)]
    finally:
        remove_all(state)
    assert published(state, mesh, "local-2") == []


def test_without_nft_the_error_says_how_to_fix_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(SkyferryError, match="the `nft` tool is missing") as missing:
        dnat.publish("h", "web", "100.64.0.9", [PublicPort("tcp", 80, 80)], "100.64.0.2")
    assert "make host" in (missing.value.hint or "")
    assert dnat.unpublish("web") == []  # removing needs nothing: with no nft nothing was published


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_run_refuses_a_bad_ingress_label_before_starting(mesh: Mesh, tmp_path: Path) -> None:
    state = mesh.state
    assert state is not None
    bad = run_web("bad", "eip:eipalloc-1:http", web_rootfs(tmp_path, "x"))
    assert bad.returncode == 2, bad.stdout + bad.stderr
    refusal = json.loads(bad.stdout)
    assert "label ingress='eip:eipalloc-1:http'" in refusal["error"] and "PORT" in refusal["hint"]
    assert "bad" not in {c["name"] for c in agentctl.client(state, mesh, "local-1").call("GET", "/v1/containers")}
