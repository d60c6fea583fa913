"""Public ingress after the overlay cutover, per container, from its `ingress` label.

A public IP cannot cross clouds; the overlay /32 can. So what outside clients use is moved separately:

  ingress=gateway                      clients come in through a stable overlay gateway: nothing moves
  ingress=route53:ZONE_ID:NAME         UPSERT NAME's A record to the target host's public address
  ingress=eip:ALLOCATION_ID            re-associate the Elastic IP with the target host's instance

All three are idempotent, so a re-run (or `evacuate` run again) simply re-applies them.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from skyferry.netplane.errors import NetplaneError
from skyferry.netplane.mesh import Mesh
from skyferry.pipeline.controller.registry import Entry
from skyferry.pipeline.errors import SkyferryError
from skyferry.providers import inventory
from skyferry.providers.errors import ProviderError
from skyferry.providers.registry import get_provider

LABEL = "ingress"
KINDS = ("gateway", "route53", "eip")


@dataclass(frozen=True)
class Ingress:
    kind: str
    zone: str | None = None
    record: str | None = None
    allocation: str | None = None


def parse(value: str, container: str = "?") -> Ingress:
    kind, _, rest = value.partition(":")
    if kind == "gateway" and not rest:
        return Ingress("gateway")
    if kind == "route53":
        zone, _, record = rest.partition(":")
        if zone and record:
            return Ingress("route53", zone=zone, record=record)
    if kind == "eip" and rest.startswith("eipalloc-"):
        return Ingress("eip", allocation=rest)
    raise SkyferryError(
        f"container {container!r} has label ingress={value!r}, which is not a known ingress",
        hint="ingress=gateway | ingress=route53:ZONE_ID:NAME | ingress=eip:eipalloc-…",
    )


@dataclass(frozen=True)
class Target:
    """Where the container now runs, as public ingress needs it."""

    host: str
    address: str | None  # what a DNS record should point at
    instance_id: str | None = None  # what an Elastic IP should be associated with


def apply(spec: Ingress, ip: str, target: Target, aws: Any = None) -> dict[str, Any]:
    """Point `spec` at `target`. `aws` is an AwsProvider (made from the environment when None)."""
    if spec.kind == "gateway":
        return {"kind": "gateway", "ip": ip, "summary": f"gateway -> {ip} (overlay, unchanged)"}
    if aws is None:
        aws = get_provider("aws")  # its ex_ methods: Route 53 and Elastic IPs are AWS's own
    if spec.kind == "route53":
        if not target.address:
            raise SkyferryError(f"{target.host} has no public address to point {spec.record} at")
        change = aws.ex_upsert_record(spec.zone, spec.record, [target.address])
        return {"kind": "route53", "record": spec.record, "value": target.address, "change": change,
                "summary": f"{spec.record} -> {target.address}"}  # fmt: skip
    instance = target.instance_id or _instance_of(aws, target.host)
    association = aws.ex_move_elastic_ip(spec.allocation, instance)
    return {"kind": "eip", "allocation": spec.allocation, "instance": instance, "association": association,
            "summary": f"{spec.allocation} -> {instance}"}  # fmt: skip


def _instance_of(aws: Any, host: str) -> str:
    for h in aws.list():
        if h.name == host and h.state != "terminated":
            return h.id
    raise SkyferryError(
        f"{host} is not an instance the AWS provider knows, so an Elastic IP cannot follow the container there",
        hint="use ingress=route53:… or ingress=gateway for containers that may leave AWS",
    )


def after_cutover(state: Path, entry: Entry, target: str) -> dict[str, Any] | None:
    """Apply the container's ingress label, if it has one; errors are returned, not raised, because the
    container itself has moved: the result says what to re-run."""
    value = entry.spec.labels.get(LABEL)
    if not value:
        return None
    try:
        spec = parse(value, entry.name)
        host = Mesh.load(state).host(target)
        made = inventory.recorded(state).get(target)  # a Terraform host: its instance id, without a lookup
        instance = made.host.id if made and made.host.provider == "aws" else None
        return apply(spec, entry.ip, Target(target, host.endpoint_address, instance))
    except (SkyferryError, NetplaneError, ProviderError) as exc:
        return {"kind": value.partition(":")[0], "error": str(exc), "summary": "FAILED",
                "hint": getattr(exc, "hint", None) or "run the same command again: ingress is re-applied"}  # fmt: skip
