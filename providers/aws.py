"""AWS: libcloud's EC2 driver for nodes, key pairs and security groups; boto3 for what libcloud does badly
(Elastic IP moves and Route53 record changes, the public-ingress cutover).

Everything a plan owns carries the tag skyferry-plan=<plan> (instances) or the name skyferry-<plan>
(security group, key pair), so a second run finds it instead of making twins.
"""

from __future__ import annotations  # the method named `list` shadows the builtin in annotations

import contextlib
import difflib
import os
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import boto3
import botocore.exceptions
from libcloud.common.types import InvalidCredsError
from libcloud.compute.base import Node, NodeImage, NodeSize
from libcloud.compute.drivers.ec2 import VALID_EC2_REGIONS, EC2NodeDriver
from libcloud.compute.types import NodeState

from .base import WIREGUARD_PORT, Host
from .errors import ProviderError
from .naming import HOST_TAG, PLAN_TAG, UserData, check_plan, missing_names, user_data_for
from .retry import is_transient, transient, until

DEFAULT_REGION = "us-east-1"
DEFAULT_SIZE = "t3.medium"
USER_DATA_LIMIT = 16384  # bytes, before base64
# Debian's own account publishes debian-12-amd64-<date>-<build> in every region.
DEBIAN_OWNER, DEBIAN_IMAGE = "136693071363", "debian-12-amd64-*"
_ALIVE = ["pending", "running", "stopping", "stopped"]
_QUOTA = ("InstanceLimitExceeded", "VcpuLimitExceeded", "InsufficientInstanceCapacity", "ResourceLimitExceeded")
_CRED_HINT = "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE for a profile in ~/.aws"


def _resource_name(plan: str) -> str:
    return f"skyferry-{plan}"


def translate(exc: Exception, what: str) -> ProviderError:
    """An EC2 failure as one line an operator can act on. Credentials never appear in the message."""
    if isinstance(exc, ProviderError):
        return exc
    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, InvalidCredsError) or "AuthFailure" in text or "UnauthorizedOperation" in text:
        return ProviderError(f"AWS rejected the credentials while {what}: {text}", hint=_CRED_HINT)
    if any(code in text for code in _QUOTA):
        return ProviderError(
            f"AWS quota reached while {what}: {text}",
            hint="ask AWS for a limit increase, or use a smaller --count or --size; nothing was left behind",
        )
    if "InvalidAMIID" in text:
        return ProviderError(f"AWS image not found while {what}: {text}", hint="pass --image ami-… of this region")
    return ProviderError(f"AWS request failed while {what}: {text}")


class AwsProvider:
    """Hosts on EC2. `endpoint_url` (or SKYFERRY_AWS_ENDPOINT_URL) points every client at a local API."""

    name = "aws"

    def __init__(
        self,
        region: str | None = None,
        endpoint_url: str | None = None,
        profile: str | None = None,
        key_dir: Path | None = None,
    ) -> None:
        self.region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or DEFAULT_REGION
        self.endpoint_url = endpoint_url or os.environ.get("SKYFERRY_AWS_ENDPOINT_URL") or None
        self.key_dir = key_dir
        if self.region not in VALID_EC2_REGIONS:
            raise ProviderError(
                f"unknown AWS region {self.region!r}", hint="use a region such as us-east-1 or eu-central-1"
            )
        try:
            self._session = boto3.Session(profile_name=profile, region_name=self.region)
        except botocore.exceptions.ProfileNotFound as exc:
            raise ProviderError(f"AWS profile not found: {exc}", hint=_CRED_HINT) from None
        creds = self._session.get_credentials()
        if creds is None:
            raise ProviderError("no AWS credentials found", hint=_CRED_HINT)
        frozen = creds.get_frozen_credentials()
        kwargs: dict[str, Any] = {"region": self.region, "signature_version": "4", "token": frozen.token}
        if self.endpoint_url:
            url = urlsplit(self.endpoint_url)
            kwargs.update(host=url.hostname, port=url.port, secure=url.scheme == "https")
        self.driver = EC2NodeDriver(frozen.access_key, frozen.secret_key, **kwargs)

    # --- the Provider protocol -------------------------------------------------------------------------

    def provision(
        self,
        plan: str,
        count: int,
        size: str | None = None,
        region: str | None = None,
        image: str | None = None,
        user_data: UserData = None,
    ) -> list[Host]:
        check_plan(plan)
        if region and region != self.region:
            raise ProviderError(f"this AWS provider is bound to {self.region}, not {region}", hint="pass --region once")
        size = size or DEFAULT_SIZE
        node_size = self._size(size)
        alive = self.list(plan)
        names = missing_names(plan, [h.name for h in alive], count)
        if not names:
            return alive
        made: dict[str, Any] = {"nodes": [], "group": None, "key": None}
        try:
            node_image = self._image(image)
            subnet = self._default_subnet()
            group_id = self._ensure_group(plan, subnet.extra["vpc_id"], made)
            self._authorize_wireguard(group_id, WIREGUARD_PORT)
            key_name = self._ensure_key_pair(plan, made)
            token = uuid.uuid4().hex[:16]  # one per call: a retried RunInstances returns the same node
            for name in names:
                document = user_data_for(user_data, name)
                if document and len(document.encode()) > USER_DATA_LIMIT:
                    raise ProviderError(
                        f"user-data for {name} is {len(document.encode())} bytes; EC2 takes {USER_DATA_LIMIT}",
                        hint="the mesh has too many peers to list in user-data",
                    )
                node = transient(self.driver.create_node)(
                    name=name,
                    size=node_size,
                    image=node_image,
                    ex_keyname=key_name,
                    ex_userdata=document,
                    ex_metadata={PLAN_TAG: plan, HOST_TAG: name},
                    ex_security_group_ids=[group_id],
                    ex_subnet=subnet,  # EC2 wants a subnet whenever security groups are given by id
                    ex_clienttoken=f"{token}-{name}",
                )
                made["nodes"].append(node)
                self._require_imdsv2(node.id)
        except Exception as exc:
            self._undo(made)
            raise translate(exc, f"provisioning plan {plan!r}") from None
        return self.list(plan)

    def list(self, plan: str | None = None) -> list[Host]:
        filters: dict[str, Any] = {"instance-state-name": _ALIVE}
        filters["tag:" + PLAN_TAG] = plan if plan else "*"
        try:
            nodes = transient(self.driver.list_nodes)(ex_filters=filters)
        except Exception as exc:
            raise translate(exc, "listing instances") from None
        return sorted((self._host(n) for n in nodes), key=lambda h: h.name)

    def wait_ready(self, hosts: list[Host], timeout: float = 600.0) -> list[Host]:
        """Wait until every host is running and has a public address (its WireGuard endpoint)."""
        wanted = {h.id for h in hosts}
        deadline = time.monotonic() + timeout
        while True:
            plans = {h.plan for h in hosts}
            now = [h for p in plans for h in self.list(p) if h.id in wanted]
            if len(now) == len(wanted) and all(h.state == "running" and h.address for h in now):
                return now
            if time.monotonic() > deadline:
                late = sorted(h.name for h in now if h.state != "running" or not h.address)
                raise ProviderError(f"AWS hosts not ready after {timeout:.0f}s: {', '.join(late) or 'missing'}")
            time.sleep(2)

    def destroy(self, plan: str) -> list[str]:
        check_plan(plan)
        removed: list[str] = []
        try:
            hosts = self.list(plan)
            for h in hosts:
                transient(self.driver.destroy_node)(Node(h.id, h.name, None, [], [], self.driver))
                removed.append(h.id)
            until(lambda: self._gone(hosts), 300, lambda e: isinstance(e, _StillThere))
            group = self._group(plan)
            if group:
                # Terminated instances keep their network interfaces for a while: DependencyViolation.
                until(
                    lambda: self.driver.ex_delete_security_group_by_id(group),
                    300,
                    lambda e: "DependencyViolation" in str(e) or is_transient(e),
                )
                removed.append(group)
            if self._key_pair_exists(plan):
                self.driver.delete_key_pair(self.driver.get_key_pair(_resource_name(plan)))
                removed.append(_resource_name(plan))
                if self.key_dir:
                    (self.key_dir / f"{_resource_name(plan)}.pem").unlink(missing_ok=True)
        except Exception as exc:
            raise translate(exc, f"destroying plan {plan!r}") from None
        return removed

    def open_wireguard_port(self, plan: str, port: int = WIREGUARD_PORT) -> None:
        check_plan(plan)
        try:
            group_id = self._ensure_group(plan, self._default_subnet().extra["vpc_id"], {})
            self._authorize_wireguard(group_id, port)
        except Exception as exc:
            raise translate(exc, f"opening UDP {port} for plan {plan!r}") from None

    def _require_imdsv2(self, instance_id: str) -> None:
        """IMDSv2 only, hop limit 1: a container (one hop further) cannot read the instance's metadata,
        and nothing can without a session token. libcloud's RunInstances has no MetadataOptions."""
        transient(self.boto("ec2").modify_instance_metadata_options)(
            InstanceId=instance_id, HttpTokens="required", HttpPutResponseHopLimit=1, HttpEndpoint="enabled"
        )

    # --- boto3: public-ingress cutover -------------------------------------------------------------------

    def boto(self, service: str) -> Any:
        return self._session.client(service, endpoint_url=self.endpoint_url)

    def ex_move_elastic_ip(self, allocation_id: str, instance_id: str) -> str:
        """Point an Elastic IP at `instance_id`, taking it from wherever it is; returns the association id."""
        try:
            resp = transient(self.boto("ec2").associate_address)(
                AllocationId=allocation_id, InstanceId=instance_id, AllowReassociation=True
            )
        except botocore.exceptions.ClientError as exc:
            raise translate(exc, f"moving Elastic IP {allocation_id}") from None
        return resp["AssociationId"]

    def ex_upsert_record(
        self, zone_id: str, name: str, values: list[str], rtype: str = "A", ttl: int = 60, timeout: float = 300
    ) -> str:
        """UPSERT a record set and wait until Route53 reports the change INSYNC; returns the change id."""
        r53 = self.boto("route53")
        try:
            change = transient(r53.change_resource_record_sets)(
                HostedZoneId=zone_id,
                ChangeBatch={
                    "Comment": "skyferry cutover",
                    "Changes": [
                        {
                            "Action": "UPSERT",
                            "ResourceRecordSet": {
                                "Name": name,
                                "Type": rtype,
                                "TTL": ttl,
                                "ResourceRecords": [{"Value": v} for v in values],
                            },
                        }
                    ],
                },
            )["ChangeInfo"]["Id"]
            r53.get_waiter("resource_record_sets_changed").wait(
                Id=change, WaiterConfig={"Delay": 2, "MaxAttempts": max(1, int(timeout // 2))}
            )
        except (botocore.exceptions.ClientError, botocore.exceptions.WaiterError) as exc:
            raise translate(exc, f"updating DNS record {name}") from None
        return change

    # --- helpers -----------------------------------------------------------------------------------------

    def _host(self, node: Node) -> Host:
        tags = node.extra.get("tags", {})
        state = {NodeState.RUNNING: "running", NodeState.TERMINATED: "terminated"}.get(node.state, "pending")
        return Host(
            name=tags.get(HOST_TAG) or tags.get("Name") or node.id,
            provider=self.name,
            plan=tags.get(PLAN_TAG, ""),
            id=node.id,
            address=(node.public_ips or [None])[0],
            private_address=(node.private_ips or [None])[0],
            state=state,
            region=self.region,
            size=node.extra.get("instance_type"),
            tags=dict(tags),
        )

    def _size(self, size: str) -> NodeSize:
        sizes = {s.id: s for s in self.driver.list_sizes()}  # libcloud's own per-region table, no API call
        if size not in sizes:
            close = difflib.get_close_matches(size, sizes, n=3)
            raise ProviderError(
                f"unknown AWS instance size {size!r} in {self.region}",
                hint=f"did you mean {', '.join(close)}?" if close else "use an EC2 type such as t3.medium",
            )
        return sizes[size]

    def _image(self, image: str | None) -> NodeImage:
        if image:
            return transient(self.driver.get_image)(image)
        found = self.driver.list_images(ex_owner=DEBIAN_OWNER, ex_filters={"name": DEBIAN_IMAGE})
        if not found:
            raise ProviderError(f"no Debian 12 image found in {self.region}", hint="pass --image ami-…")
        return max(found, key=lambda i: i.name)

    def _default_subnet(self) -> Any:
        subnets = transient(self.driver.ex_list_subnets)(filters={"default-for-az": "true"})
        if not subnets:
            raise ProviderError(
                f"no default VPC subnet in {self.region}", hint="create a default VPC: aws ec2 create-default-vpc"
            )
        return sorted(subnets, key=lambda s: s.extra.get("zone", ""))[0]

    def _group(self, plan: str) -> str | None:
        groups = self.driver.ex_get_security_groups(filters={"group-name": _resource_name(plan)})
        return groups[0].id if groups else None

    def _ensure_group(self, plan: str, vpc_id: str, made: dict[str, Any]) -> str:
        existing = self._group(plan)
        if existing:
            return existing
        group_id = self.driver.ex_create_security_group(
            _resource_name(plan), f"skyferry plan {plan}: WireGuard", vpc_id=vpc_id
        )["group_id"]
        made["group"] = group_id
        transient(self.driver.ex_create_tags)(_Ref(group_id), {PLAN_TAG: plan})
        return group_id

    def _authorize_wireguard(self, group_id: str, port: int) -> None:
        try:
            self.driver.ex_authorize_security_group_ingress(group_id, port, port, ["0.0.0.0/0"], protocol="udp")
        except Exception as exc:
            if "InvalidPermission.Duplicate" not in str(exc):
                raise

    def _key_pair_exists(self, plan: str) -> bool:
        return any(k.name == _resource_name(plan) for k in self.driver.list_key_pairs())

    def _ensure_key_pair(self, plan: str, made: dict[str, Any]) -> str:
        name = _resource_name(plan)
        if self._key_pair_exists(plan):
            return name
        pair = self.driver.create_key_pair(name)
        made["key"] = name
        if self.key_dir and pair.private_key:
            self.key_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            path = self.key_dir / f"{name}.pem"
            path.touch(mode=0o600)
            path.write_text(pair.private_key)
        return name

    def _gone(self, hosts: list[Host]) -> None:
        ids = {h.id for h in hosts}
        if ids and any(h.id in ids for p in {h.plan for h in hosts} for h in self.list(p)):
            raise _StillThere()

    def _undo(self, made: dict[str, Any]) -> None:
        """Remove what a failed provision created, newest first; best effort, the first error wins."""
        for node in made["nodes"]:
            with contextlib.suppress(Exception):
                transient(self.driver.destroy_node)(node)
        with contextlib.suppress(Exception):
            hosts = [self._host(n) for n in made["nodes"]]
            until(lambda: self._gone(hosts), 120, lambda e: isinstance(e, _StillThere))
        if made["group"]:
            with contextlib.suppress(Exception):
                until(
                    lambda: self.driver.ex_delete_security_group_by_id(made["group"]),
                    120,
                    lambda e: "DependencyViolation" in str(e) or is_transient(e),
                )
        if made["key"]:
            with contextlib.suppress(Exception):
                self.driver.delete_key_pair(self.driver.get_key_pair(made["key"]))
            if self.key_dir:
                (self.key_dir / f"{made['key']}.pem").unlink(missing_ok=True)


class _Ref:
    """What libcloud's ex_create_tags needs of a resource: its id."""

    def __init__(self, id: str) -> None:
        self.id = id


class _StillThere(Exception):
    pass
