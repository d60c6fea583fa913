"""Public ingress after the overlay cutover, per container, from its `ingress` label.

A public IP cannot cross clouds; the overlay /32 can. So what outside clients use is moved separately:

  ingress=gateway                      clients come in through a stable overlay gateway: nothing moves
  ingress=route53:ZONE_ID:NAME[:PORTS] UPSERT NAME's A record to the target host's public address
  ingress=eip:ALLOCATION_ID[:PORTS]    re-associate the Elastic IP with the target host's instance

With PORTS (`80,443`, `80=8080`, `53/udp`: pipeline/hostapi/publish.py), the address also delivers: the
target host's agent DNATs those ports of the host's addresses to the container's /32 (agent/dnat.py)
before the address moves, and the source's agent drops its DNAT after. Without PORTS, only the address
moves (what the label meant before ports existed). Every step is idempotent, so a re-run (or `evacuate`
run again) simply re-applies them.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from skyferry.netplane.errors import NetplaneError
from skyferry.netplane.mesh import Mesh
from skyferry.pipeline.controller import agentctl
from skyferry.pipeline.controller.registry import Entry, Registry
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.hostapi import publish
from skyferry.pipeline.hostapi.publish import PublicPort
from skyferry.providers import inventory
from skyferry.providers.errors import ProviderError
from skyferry.providers.registry import get_provider

LABEL = "ingress"
KINDS = ("gateway", "route53", "eip")


RERUN = "run the same command again: ingress is re-applied"
GRAMMAR = "ingress=gateway | ingress=route53:ZONE_ID:NAME[:PORTS] | ingress=eip:eipalloc-…[:PORTS]"


@dataclass(frozen=True)
class Ingress:
    kind: str
    zone: str | None = None
    record: str | None = None
    allocation: str | None = None
    ports: tuple[PublicPort, ...] = ()  # DNATed on the host that holds the container


def parse(value: str, container: str = "?") -> Ingress:
    kind, _, rest = value.partition(":")
    try:
        if kind == "gateway" and not rest:
            return Ingress("gateway")
        if kind == "route53":
            zone, _, rest = rest.partition(":")
            record, _, ports = rest.partition(":")
            if zone and record:
                return Ingress("route53", zone=zone, record=record, ports=_ports(ports))
        if kind == "eip":
            allocation, _, ports = rest.partition(":")
            if allocation.startswith("eipalloc-"):
                return Ingress("eip", allocation=allocation, ports=_ports(ports))
    except SkyferryError as exc:
        raise SkyferryError(f"container {container!r} has label ingress={value!r}: {exc}", hint=exc.hint) from None
    raise SkyferryError(
        f"container {container!r} has label ingress={value!r}, which is not a known ingress", hint=GRAMMAR
    )


def _ports(text: str) -> tuple[PublicPort, ...]:
    return tuple(publish.parse_list(text)) if text else ()


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


def deliver(state: Path, mesh: Mesh, name: str, host: str, ports: tuple[PublicPort, ...]) -> list[dict[str, Any]]:
    """Have `host`'s agent DNAT exactly `ports` of its addresses to container `name` there."""
    agent = agentctl.client(state, mesh, host)
    return agent.call("POST", f"/v1/containers/{name}/ingress", {"ports": [str(p) for p in ports]})["published"]


def withdraw(state: Path, mesh: Mesh, name: str, host: str) -> list[dict[str, Any]]:
    """Have `host`'s agent drop whatever it publishes for container `name` (idempotent)."""
    return agentctl.client(state, mesh, host).call("DELETE", f"/v1/containers/{name}/ingress")["removed"]


def _instance_of(aws: Any, host: str) -> str:
    for h in aws.list():
        if h.name == host and h.state != "terminated":
            return h.id
    raise SkyferryError(
        f"{host} is not an instance the AWS provider knows, so an Elastic IP cannot follow the container there",
        hint="use ingress=route53:… or ingress=gateway for containers that may leave AWS",
    )


def at_start(state: Path, name: str) -> dict[str, Any] | None:
    """Point a container's ingress at the host it was just started on (`skyferry run`)."""
    entry = Registry(state).get(name)
    result = after_cutover(state, entry, entry.host)
    if result and result.get("hint") == RERUN:  # `run` cannot be re-run on a container that exists
        result["hint"] = f"the container runs without it: fix the cause, then `skyferry rm {name}` and run it again"
    return result


def after_cutover(state: Path, entry: Entry, target: str, source: str | None = None) -> dict[str, Any] | None:
    """Apply the container's ingress label, if it has one: with ports, the target's DNAT first (so the
    address delivers the moment it arrives), then the address, then the source's DNAT goes. Errors are
    returned, not raised, because the container itself has moved: the result says what to re-run."""
    value = entry.spec.labels.get(LABEL)
    if not value:
        return None
    try:
        spec = parse(value, entry.name)
        mesh = Mesh.load(state)
        host = mesh.host(target)
        published = deliver(state, mesh, entry.name, target, spec.ports) if spec.ports else None
        made = inventory.recorded(state).get(target)  # a Terraform host: its instance id, without a lookup
        instance = made.host.id if made and made.host.provider == "aws" else None
        done = apply(spec, entry.ip, Target(target, host.endpoint_address, instance))
        if published is None:
            return done
        removed = withdraw(state, mesh, entry.name, source) if source and source != target else []
        ports = ", ".join(f"{p['public']}/{p['proto']}" for p in published)
        return {**done, "published": published, "unpublished": {"host": source, "ports": removed},
                "summary": f"{done['summary']}; {ports} on {target} -> {entry.ip}"}  # fmt: skip
    except (SkyferryError, NetplaneError, ProviderError) as exc:
        return {"kind": value.partition(":")[0], "error": str(exc), "summary": "FAILED",
                "hint": getattr(exc, "hint", None) or RERUN}  # fmt: skip
