"""Hosts from clouds joining and leaving the mesh: what `skyferry provision` and `decommission` do, and
what a cloud-exit plan's provisioning step calls.

A new host gets no key from the controller: its user-data holds a one-time join token, and the host
joins through the enrolment service this process serves while it waits (controller/enrol.py). It is a
member once it has joined and its agent answers over the overlay. docs/providers.md explains the choices.
"""

import logging
import re
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from skyferry.netplane import controller, routes
from skyferry.netplane.errors import NetplaneError
from skyferry.netplane.mesh import Mesh
from skyferry.pipeline.controller import agentctl, certs, dist, enrol, revoke, tokens
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.hostapi import pki
from skyferry.providers import inventory
from skyferry.providers.cloudinit import HostBootstrap, render_user_data
from skyferry.providers.registry import NAMES, get_provider

DEFAULT_PLAN = "skyferry"
DEFAULT_PLANS = {"vm": "vm"}  # VM hosts are vm-1, vm-2, …
TERRAFORM = "terraform"  # the provider a token from `inventory tfvars` names, until the import says which cloud
log = logging.getLogger(__name__)


def _cloud(provider: str, state: Path, region: str | None, endpoint_url: str | None) -> Any:
    if provider not in NAMES:
        raise SkyferryError(f"unknown provider {provider!r}", hint=f"use one of: {', '.join(NAMES)}")
    if provider == "aws":
        return get_provider("aws", region=region, endpoint_url=endpoint_url, key_dir=state / "keys")
    if provider == "vm":  # QEMU on this machine, on the local mesh's underlay
        return get_provider("vm", state=state)
    return get_provider("gcp", region=region, endpoint_url=endpoint_url, cache_dir=state / "cache")


class Bootstrapper:
    """Renders each new host's user-data around a fresh one-time token; remembers the tokens so a failed
    run can revoke those not used."""

    def __init__(self, state: Path, mesh: Mesh, provider: str, ttl: float = tokens.DEFAULT_TTL) -> None:
        self.state, self.provider, self.ttl = state, provider, ttl
        self.url = enrol.url(mesh)
        self.pin = pki.pin(pki.ensure_ca(state / "ca", mesh.name).read_bytes())
        self.wheel = dist.build(state).wheel.name
        self.tokens: dict[str, str] = {}  # host name -> token

    def __call__(self, name: str) -> str:
        self.tokens[name] = tokens.issue(self.state, name, self.provider, self.ttl)
        return render_user_data(HostBootstrap(name, self.url, self.pin, self.tokens[name], self.wheel))

    def revoke(self) -> None:
        for name in self.tokens:
            tokens.revoke(self.state, name)


def provision(
    state: Path,
    provider: str,
    count: int,
    plan: str | None = None,
    size: str | None = None,
    region: str | None = None,
    image: str | None = None,
    endpoint_url: str | None = None,
    timeout: float = 600,
    join_timeout: float = 1200,
) -> dict[str, Any]:
    """Make sure `plan` has `count` hosts on `provider`, joined into the mesh. Idempotent: a second run
    creates only what is missing. A failed run removes what it created and revokes its tokens.
    `join_timeout` 0 returns once the cloud has the hosts; they join later (`skyferry mesh serve`)."""
    if provider == "local":
        hosts = get_provider("local", state=state).provision(plan or "", count)
        return {"plan": plan, "provider": provider, "hosts": [h.to_dict() for h in hosts]}
    plan = plan or DEFAULT_PLANS.get(provider, DEFAULT_PLAN)
    mesh = Mesh.load(state)  # a clear NetplaneError when there is none
    cloud = _cloud(provider, state, region, endpoint_url)
    boot = Bootstrapper(state, mesh, provider, ttl=max(join_timeout, tokens.DEFAULT_TTL) + timeout)
    try:
        # Bad input fails here, before anything is served; a host that boots before the service is up
        # retries (scripts/host-install.py).
        hosts = cloud.provision(plan, count, size=size, image=image, user_data=boot)
    except BaseException:
        boot.revoke()  # the cloud removed what this call made: nobody will use these tokens
        raise
    # From here the hosts exist and keep their tokens (valid for the ttl), so a re-run that serves joins
    # again admits hosts that were late.
    with enrol.serving(state) if join_timeout else nullcontext() as enrolment:
        hosts = cloud.wait_ready(hosts, timeout=timeout)
        waiting = {h.name for h in hosts} - set(Mesh.load(state).hosts)  # this run's, or an earlier one's
        if enrolment:
            enrolment.wait(waiting, join_timeout)
    if join_timeout:
        joined = Mesh.load(state)
        for name in waiting:
            agentctl.wait_agent(state, joined, joined.host(name), timeout=join_timeout)
        if waiting:  # a host that joined while another's agent was still starting: tell everyone again
            routes.apply(joined, agentctl.Pusher(state, joined))
    members = Mesh.load(state).hosts
    result = [
        {**h.to_dict(), "overlay_ip": members[h.name].overlay_ip if h.name in members else None,
         "joined": h.name in members}
        for h in hosts
    ]  # fmt: skip
    return {"plan": plan, "provider": provider, "hosts": result}


def decommission(
    state: Path, plan: str, provider: str | None = None, region: str | None = None, endpoint_url: str | None = None
) -> dict[str, Any]:
    """Remove everything `plan` made and take its hosts out of the mesh; safe to run twice. For hosts
    Terraform made, run `terraform destroy` first: this then finds nothing left in the cloud and only
    takes them out of the mesh and forgets their records."""
    mine = re.compile(rf"{re.escape(plan)}-\d+")
    records = inventory.recorded(state, plan)
    provider = provider or _provider_of(state, plan, mine, records)
    if region is None and len({r.host.region for r in records.values() if r.host.provider == provider}) == 1:
        region = next(r.host.region for r in records.values() if r.host.provider == provider)
    if provider == "local":
        if Mesh.exists(state) and (mesh := Mesh.load(state)).name == plan:
            certs.revoke_subjects(state, list(mesh.hosts))  # the CA stays: the plan's certificates must not
        removed = get_provider("local", state=state).destroy(plan)
        left: list[str] = []
    else:
        cloud = _cloud(provider, state, region, endpoint_url)
        names = [h.name for h in cloud.list(plan)]
        removed = cloud.destroy(plan)
        mesh = Mesh.load(state) if Mesh.exists(state) else None
        strays = [n for n, m in (mesh.hosts.items() if mesh else []) if mine.fullmatch(n) and m.provider == provider]
        gone = sorted(set(names) | set(strays) | {n for n, r in records.items() if r.host.provider == provider})
        members = [mesh.hosts[n] for n in gone if mesh and n in mesh.hosts]
        left = inventory.leave(state, gone)
        if members:  # every remaining member drops their peers: the controller here, hosts through agents
            rest = Mesh.load(state)
            revoke.hosts(state, rest, [m.name for m in members])  # their certificates stop working everywhere
            for member in members:
                try:
                    routes.remove_peer(rest, member, agentctl.Pusher(state, rest))
                except NetplaneError as exc:  # the rows are right; `skyferry mesh sync` repairs the members
                    log.warning("not every member dropped %s: %s", member.name, exc)
        inventory.forget(state, gone)
        for name in set(gone) | {n for n in tokens.issued(state) if mine.fullmatch(n)}:  # the plan is gone
            tokens.revoke(state, name)
    return {"plan": plan, "provider": provider, "removed": removed, "left_mesh": left}


def teardown(state: Path) -> list[str]:
    """What `hosts down` does: agents, then VMs (even without a mesh: a crash may have left only their
    rows), then the local mesh, or the controller's own interface of a `mesh init` mesh."""
    mesh = Mesh.load(state) if Mesh.exists(state) else None
    if mesh and mesh.local is None:
        machines = sorted(n for n, m in mesh.hosts.items() if m.provider != "vm")
        if machines:
            raise SkyferryError(
                f"mesh {mesh.name} still has hosts made elsewhere: {', '.join(machines)}",
                hint="skyferry decommission --plan PLAN for cloud hosts first",
            )
    if mesh:
        # The CA outlives the mesh (the next `hosts up` uses it again): its hosts' certificates must not.
        certs.revoke_subjects(state, list(mesh.hosts))
        agentctl.stop_agents(mesh, state)
    vms = get_provider("vm", state=state)
    removed = [item for plan in vms.plans() for item in vms.destroy(plan)]
    if mesh and mesh.local is None:
        return removed + controller.down(state)
    return removed + get_provider("local", state=state).down()


def _provider_of(state: Path, plan: str, mine: re.Pattern[str], records: dict[str, inventory.Record]) -> str:
    """The one provider `plan`'s hosts are on: per host, what its import recorded, else its mesh row,
    else its token (hosts made but not joined yet)."""
    mesh = Mesh.load(state) if Mesh.exists(state) else None
    known = {n: p for n, p in tokens.issued(state).items() if mine.fullmatch(n)}
    known |= {n: m.provider for n, m in (mesh.hosts.items() if mesh else []) if mine.fullmatch(n)}
    known |= {n: r.host.provider for n, r in records.items()}
    found = set(known.values())
    if len(found) > 1:  # a host of a Terraform plan that was not imported yet is on the others' cloud
        found.discard(TERRAFORM)
    if found == {TERRAFORM}:
        raise SkyferryError(
            f"plan {plan!r} was made by Terraform and not imported yet, so its cloud is unknown",
            hint="run skyferry inventory import --terraform DIR first, or pass --provider",
        )
    if len(found) != 1:
        raise SkyferryError(f"cannot tell which provider plan {plan!r} is on", hint="pass --provider")
    return found.pop()


def import_terraform(state: Path, source: Path) -> dict[str, Any]:
    """`skyferry inventory import`: record what Terraform made and say which of those hosts have joined.

    A joined host's mesh row follows its record (provider, endpoint), its peers are told, and its unused
    tokens are revoked; a host not joined yet stays a record only, `waiting` while it holds a valid token,
    `no-token` otherwise."""
    records = inventory.parse_outputs(inventory.read_outputs(source), origin=str(source))
    changed = set(inventory.record(state, records))
    updated = inventory.adopt(state, records)
    mesh = Mesh.load(state)
    moved = {n for n, old in updated.items() if old.endpoint != mesh.hosts[n].endpoint}
    if moved:
        try:
            routes.apply(mesh, agentctl.Pusher(state, mesh), only=moved)
        except NetplaneError as exc:  # the rows are right; `skyferry mesh sync` repairs the members
            log.warning("not every member learnt the new endpoints of %s: %s", ", ".join(sorted(moved)), exc)
    for name in set(mesh.hosts) & {r.host.name for r in records}:
        tokens.revoke(state, name)  # a joined host's spare token (a later tfvars) would let a holder re-join
    valid = tokens.pending(state)
    rows = []
    for r in records:
        member = mesh.hosts.get(r.host.name)
        join = "joined" if member else "waiting" if r.host.name in valid else "no-token"
        h = r.host
        rows.append({
            "name": h.name, "provider": h.provider, "plan": h.plan, "id": h.id, "address": h.address,
            "private_address": h.private_address, "region": h.region, "size": h.size, "wireguard_port": r.port,
            "join": join, "overlay_ip": member.overlay_ip if member else None,
            "endpoint": member.endpoint if member else None, "token_expires": valid.get(h.name) if not member else None,
            "changed": h.name in changed or h.name in updated,
            "endpoint_was": updated[h.name].endpoint if h.name in moved else None,
        })  # fmt: skip
    return {
        "mesh": mesh.name, "hosts": rows,
        "joined": [r["name"] for r in rows if r["join"] == "joined"],
        "waiting": [r["name"] for r in rows if r["join"] != "joined"],
    }  # fmt: skip
