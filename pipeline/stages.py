"""The stages of a migration. Each is a small object: `run` does its step, `undo` reverses it.

Both are idempotent, so the runner may repeat a stage that was interrupted, and a rollback may undo a
stage that only half ran. Undo order is the reverse of run order, which is what keeps the container
running exactly once: the target's copy is killed before the frozen source is thawed.
"""

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from skyferry.netplane import routes
from skyferry.netplane.mesh import Mesh
from skyferry.pipeline.agent import AGENT_PORT
from skyferry.pipeline.client import AgentClient
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.registry import Entry


@dataclass
class Context:
    mig_id: str
    entry: Entry
    source: str
    target: str
    mesh: Mesh
    state: Path
    src: AgentClient
    dst: AgentClient
    mode: str = "stop-copy"
    notes: dict[str, Any] = field(default_factory=dict)

    def mig_call(self, agent: AgentClient, op: str, **body: Any) -> Any:
        return agent.call("POST", f"/v1/migrations/{self.mig_id}/{op}", {"name": self.entry.name, **body})


class Stage(Protocol):
    name: str

    def run(self, ctx: Context) -> dict[str, Any] | None: ...

    def undo(self, ctx: Context) -> None: ...


class Check:
    """Both hosts can do this migration: CRIU on both, the target at least as new, CPU flags a superset."""

    name = "check"

    def run(self, ctx: Context) -> dict[str, Any]:
        src, dst = ctx.src.call("GET", "/v1/facts"), ctx.dst.call("GET", "/v1/facts")
        info = ctx.src.call("GET", f"/v1/containers/{ctx.entry.name}")
        if info["state"] != "running":
            raise SkyferryError(
                f"container {ctx.entry.name!r} is {info['state']} on {ctx.source}, not running",
                hint="only running containers migrate live",
            )
        for facts in (src, dst):
            if not facts.get("criu"):
                raise SkyferryError(f"{facts['host']} has no CRIU", hint="run scripts/bootstrap-host.sh there")
        if _version(dst["criu"]) < _version(src["criu"]):
            raise SkyferryError(
                f"target CRIU {dst['criu']} is older than source CRIU {src['criu']}",
                hint="images from a newer CRIU may not restore; upgrade the target",
            )
        if src["arch"] != dst["arch"]:
            raise SkyferryError(f"architectures differ: {src['arch']} -> {dst['arch']}")
        missing = sorted(set(src["cpu_flags"]) - set(dst["cpu_flags"]))
        if missing:
            raise SkyferryError(
                f"target CPU lacks flags the source has: {', '.join(missing[:12])}",
                hint="a restored process may use instructions the target cannot run; pick another target",
            )
        for t in ctx.dst.call("GET", "/v1/containers"):
            if t["name"] == ctx.entry.name:
                raise SkyferryError(f"{ctx.target} already has a container named {ctx.entry.name!r}")
        return {"criu": [src["criu"], dst["criu"]], "kernel": [src["kernel"], dst["kernel"]]}

    def undo(self, ctx: Context) -> None:
        pass


class Prepare:
    """The target gets the same netns and IP (no route yet) and an empty bundle."""

    name = "prepare"

    def run(self, ctx: Context) -> None:
        ctx.mig_call(ctx.dst, "prepare", spec=ctx.entry.spec.to_dict())

    def undo(self, ctx: Context) -> None:
        ctx.mig_call(ctx.dst, "abort-target")


class PreCopy:
    """Memory rounds while the container runs; the freeze then only moves what changed since."""

    name = "precopy"
    # A final delta this small costs ~10 ms at 1 Gbit/s: not worth another round.
    policy = {"max_delta_bytes": 1 << 20}

    def run(self, ctx: Context) -> dict[str, Any]:
        target = ctx.mesh.host(ctx.target)
        return ctx.mig_call(
            ctx.src, "precopy", target={"address": target.overlay_ip, "port": AGENT_PORT}, policy=self.policy
        )

    def undo(self, ctx: Context) -> None:
        pass  # the target's store goes with Prepare's undo; the source's engine with Checkpoint's


class Checkpoint:
    """Freeze, lock the network, dump. The source stays frozen, not killed, until confirm."""

    name = "checkpoint"

    def run(self, ctx: Context) -> dict[str, Any]:
        return ctx.mig_call(ctx.src, "checkpoint")

    def undo(self, ctx: Context) -> None:
        ctx.mig_call(ctx.src, "rollback-source")


class Transfer:
    """Images and rootfs go agent to agent across the overlay; digests must match on both ends."""

    name = "transfer"

    def run(self, ctx: Context) -> dict[str, Any]:
        target = ctx.mesh.host(ctx.target)
        return ctx.mig_call(ctx.src, "send", target={"address": target.overlay_ip, "port": AGENT_PORT})

    def undo(self, ctx: Context) -> None:
        pass  # the target's received files go with Prepare's undo


class Restore:
    name = "restore"

    def run(self, ctx: Context) -> dict[str, Any]:
        return ctx.mig_call(ctx.dst, "restore")

    def undo(self, ctx: Context) -> None:
        # Kill the target's copy before anything thaws the source: never two copies.
        ctx.mig_call(ctx.dst, "abort-target")


class Cutover:
    """Route the /32 to the target: target route, every peer's allowed-ips, then drop the source route."""

    name = "cutover"

    def run(self, ctx: Context) -> dict[str, Any]:
        name, ip = ctx.entry.name, ctx.entry.ip
        ctx.dst.call("POST", f"/v1/containers/{name}/route", {"present": True})
        routes.publish(ctx.mesh, ip, ctx.target)
        ctx.src.call("POST", f"/v1/containers/{name}/route", {"present": False})
        return {"ip": ip}

    def undo(self, ctx: Context) -> None:
        name, ip = ctx.entry.name, ctx.entry.ip
        ctx.src.call("POST", f"/v1/containers/{name}/route", {"present": True})
        routes.publish(ctx.mesh, ip, ctx.source)
        # The peers no longer send there, and Restore's undo removes the netns anyway.
        with contextlib.suppress(SkyferryError):
            ctx.dst.call("POST", f"/v1/containers/{name}/route", {"present": False})


class GoLive:
    """The point of no return: the target's copy may talk. Once it has, the frozen source is stale."""

    name = "go-live"

    def run(self, ctx: Context) -> None:
        ctx.mig_call(ctx.dst, "go-live")

    def undo(self, ctx: Context) -> None:
        raise SkyferryError(
            "the target copy is live; thawing the older source copy would lose what it acknowledged",
            hint=f"finish it (skyferry migrations resume), then: skyferry migrate {ctx.entry.name} --to {ctx.source}",
        )


class Confirm:
    """End the frozen source copy and free what it held."""

    name = "confirm"

    def run(self, ctx: Context) -> None:
        ctx.mig_call(ctx.src, "confirm-source")

    def undo(self, ctx: Context) -> None:
        raise SkyferryError("the source copy is already gone; a confirmed migration cannot be undone")


class Cleanup:
    name = "cleanup"

    def run(self, ctx: Context) -> None:
        ctx.mig_call(ctx.dst, "finish-target")

    def undo(self, ctx: Context) -> None:
        pass


STOP_COPY: list[Stage] = [
    Check(), Prepare(), Checkpoint(), Transfer(), Restore(), Cutover(), GoLive(), Confirm(), Cleanup(),
]  # fmt: skip
PRECOPY: list[Stage] = [
    Check(), Prepare(), PreCopy(), Checkpoint(), Transfer(), Restore(), Cutover(), GoLive(), Confirm(), Cleanup(),
]  # fmt: skip
POINT_OF_NO_RETURN = "go-live"
FREEZE_FROM, FREEZE_TO = "checkpoint", "go-live"


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split(".") if x.isdigit())
