"""The agent's request bodies, one pydantic model each: what a caller may send, and nothing else.

The agent validates every body (and a stream's query) before it acts on it, and answers a malformed one
with 400 and a JSON {"error", "hint"}; unknown fields are refused too, so a typo never becomes a default.
Container names are checked here once for all routes (spec.SPEC_NAME): they name netns, bundles and
image directories, so `../` or a slash never reaches a path. ContainerSpec validates itself (spec.py).
"""

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StringConstraints
from skyferry.pipeline.hostapi.layout import AGENT_PORT, FREEZE_TIMEOUT
from skyferry.pipeline.hostapi.spec import SPEC_NAME, ContainerSpec

ContainerName = Annotated[str, StringConstraints(pattern=f"^{SPEC_NAME.pattern}$")]
HostName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9-]{0,62}$")]  # enrolment.HOST_NAME
IPv4 = Annotated[str, StringConstraints(pattern=r"^\d{1,3}(\.\d{1,3}){3}$")]
PageServer = Annotated[str, StringConstraints(pattern=r"^\d{1,3}(\.\d{1,3}){3}:\d{1,5}$")]  # a source's page tunnel
Base64 = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9+/]*={0,2}$", max_length=1 << 20)]
Method = Literal["content", "soft-dirty"]  # criu/version.py: PRECOPY_CONTENT, PRECOPY_SOFT_DIRTY
FreezeTimeout = Annotated[float, Field(gt=0, lt=86400)]  # seconds a container may stay frozen (freeze.py)
Mode = Literal["precopy", "hybrid", "postcopy", "stop-copy"]  # compat.ALL_MODES
Finish = Literal["precopy", "hybrid"]  # how a freeze after pre-copy rounds may end
# A step names its migration's mode: auto until its rounds chose the finish, estimate for --estimate.
StepMode = Literal["auto", "estimate", "precopy", "hybrid", "postcopy", "stop-copy"]  # controller/migration.py
StageName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z-]{0,31}$")]
TransferId = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{16}$")]  # one transfer's final streams
FinalStream = Literal["precopy-final", "lazy-final", "fs-round"]


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CpuinfoCheck(Body):
    image: Base64


class Route(Body):
    present: StrictBool


class Ingress(Body):
    ports: Annotated[list[Annotated[str, StringConstraints(max_length=32)]], Field(max_length=256)]


class Target(Body):
    """Where the source reaches the target's agent."""

    address: IPv4
    port: Annotated[int, Field(ge=1, le=65535)] = AGENT_PORT


class Policy(Body):
    """memory/policy.py's ConvergencePolicy, as the controller may set it; unset fields keep its defaults."""

    max_delta_bytes: Annotated[int, Field(ge=0)] | None = None
    max_rounds: Annotated[int, Field(ge=1, le=100)] | None = None
    max_seconds: Annotated[float, Field(gt=0, le=86400)] | None = None
    growth: Annotated[float, Field(ge=0)] | None = None
    bandwidth: Annotated[float, Field(gt=0)] | None = None
    dirty_ratio: Annotated[float, Field(gt=0)] | None = None
    max_freeze_ms: Annotated[float, Field(gt=0, le=86_400_000)] | None = None  # --max-freeze
    finishes: Annotated[list[Finish], Field(min_length=1, max_length=2)] | None = None  # auto: precopy, hybrid
    fixed_ms: dict[Mode, Annotated[float, Field(ge=0, le=86_400_000)]] | None = None  # learned per host pair
    min_rounds: Annotated[int, Field(ge=1, le=100)] | None = None
    throttle: StrictBool | None = None  # auto-converge (runtimes/throttle.py)


class Step(Body):
    """POST /v1/migrations/ID/OP: every step names the container it acts on. The controller's steps also
    name the migration's mode and, while it rolls back, the stage whose failure started that: the
    agent's metrics count migrations by both (pipeline/agent/metrics.py)."""

    name: ContainerName
    mode: StepMode | None = None
    failed_stage: StageName | None = None


class Confirm(Step):
    freeze_s: Annotated[float, Field(ge=0)] | None = None  # the controller's measured freeze, for the metrics


class Prepare(Step):
    spec: ContainerSpec
    peer: HostName  # the source host: the only one whose streams this migration takes


class Connect(Step):
    target: Target


class Precopy(Step):
    target: Target
    policy: Policy = Policy()
    method: Literal["auto", "content"] = "auto"  # the source picks soft-dirty itself where it can
    freeze_timeout: FreezeTimeout = FREEZE_TIMEOUT  # bounds each CRIU pre-dump's freeze
    completion_timeout: Annotated[float, Field(gt=0, le=86400)] | None = None  # rounds' bound, seconds per GiB
    forks: StrictBool = False  # auto: the rounds take the lazy finishes away from a tree forking too fast
    streams: Annotated[int, Field(ge=1, le=64)] | None = None  # first rounds at once on this host (agent/bulk.py)


class Checkpoint(Step):
    lazy: StrictBool = False
    freeze_timeout: FreezeTimeout = FREEZE_TIMEOUT
    target: Target | None = None  # the agent the source's watchdog fences (abort) before it thaws
    peer: HostName | None = None  # lazy: the target host, the only one whose certificate may fetch the pages


class RestoreOrder(Body):
    """How the target restores (TargetSession.restore): asked by the controller, or by the source at the
    end of its transfer (docs/migration.md, "The restore rides on the transfer")."""

    lazy: StrictBool = False  # through the page tunnel the transfer named (post-copy, hybrid)
    freeze_deadline: Annotated[float, Field(gt=0)] | None = None  # the source's, wall clock: no restore after it


class Transfer(Step):
    target: Target
    restore: RestoreOrder | None = None  # the target restores as soon as the last byte lands


class PrecopyReset(Step):
    method: Method = "content"


class Landed(Body):
    """The final streams a restore waits for: sent, their answers not yet back (TargetSession.finals)."""

    transfer: TransferId
    streams: Annotated[list[FinalStream], Field(min_length=1, max_length=2)]


class Hold(Step):
    packets: Annotated[list[Base64], Field(max_length=100_000)]
    restore: RestoreOrder | None = None  # the source's last request of a transfer that ends with the restore
    after: Landed | None = None  # restore once these streams have landed


class Restore(Step, RestoreOrder):
    pass


class CloneCheck(Step):
    cmd: Annotated[str, StringConstraints(max_length=4096)] | None = None
    live: StrictBool = False
    timeout: Annotated[float, Field(gt=0, le=600)] | None = None


class CloneDiscard(Step):
    clone: ContainerName | None = None


# Each operation's body (server.SOURCE_OPS, TARGET_OPS, clone.OPS).
STEPS: dict[str, type[Step]] = {
    "prepare": Prepare, "precopy-reset": PrecopyReset, "hold": Hold, "restore": Restore, "abort": Step,
    "lazy": Step, "cleanup": Step, "connect": Connect, "precopy": Precopy,
    "checkpoint": Checkpoint, "transfer": Transfer, "rollback": Step,
    "confirm": Confirm, "clone-prepare": Prepare, "clone-checkpoint": Step, "clone-transfer": Transfer,
    "clone-restore": Step, "clone-check": CloneCheck, "clone-discard": CloneDiscard,
}  # fmt: skip


class PreflightQuery(Body):
    """GET /v1/containers/NAME/preflight[?forks=later]"""

    forks: Literal["now", "later"] = "now"  # later: only mark where auto mode's rounds count forks from


class StreamQuery(Body):
    """PUT /v1/migrations/ID/STREAM?name=N[&page_server=A:P]"""

    name: ContainerName
    page_server: PageServer | None = None
    transfer: TransferId | None = None  # a final stream: a restore may be waiting for it (Hold.after)
