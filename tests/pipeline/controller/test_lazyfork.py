"""A tree that forks all the time rules out the lazy modes before anything freezes; and a lost lazy phase
leaves the registry naming the source. The decisions, without hosts (the end-to-end tests are in
test_migrate.py)."""

from pathlib import Path

import pytest
from skyferry.pipeline import logfmt
from skyferry.pipeline.controller import migration
from skyferry.pipeline.controller.journal import Journal
from skyferry.pipeline.controller.registry import Registry
from skyferry.pipeline.controller.stages import Context, rule_out
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.hostapi.spec import ContainerSpec

ALL = ["stop-copy", "precopy", "postcopy", "hybrid"]
FORKS = {"pid": 4242, "comm": "pipeline", "what": "forks 48 times a second, counting its children",
         "hint": "... use --mode precopy or stop-copy", "modes": ["hybrid", "postcopy"]}  # fmt: skip


@pytest.mark.parametrize("mode", ["hybrid", "postcopy"])
def test_a_lazy_mode_asked_for_by_name_is_refused_with_a_hint(mode: str) -> None:
    with pytest.raises(SkyferryError, match=f"'web' cannot move by {mode}: pipeline \\(pid 4242\\) forks 48") as e:
        rule_out("web", mode, ALL, [FORKS])
    assert "--mode precopy or stop-copy" in (e.value.hint or "")


@pytest.mark.parametrize("mode", ["auto", "precopy", "stop-copy", "estimate"])
def test_the_other_modes_go_on_without_the_lazy_ones_and_say_why(mode: str) -> None:
    can, why = rule_out("web", mode, ALL, [FORKS])
    assert can == ["stop-copy", "precopy"]
    assert why == "postcopy and hybrid ruled out: pipeline (pid 4242) forks 48 times a second, counting its children"


def test_nothing_is_ruled_out_without_such_a_finding() -> None:
    assert rule_out("web", "hybrid", ALL, []) == (ALL, None)
    assert rule_out("web", "auto", ["stop-copy", "precopy"], [FORKS]) == (["stop-copy", "precopy"], None)


def test_auto_s_report_says_why_it_did_not_finish_lazily() -> None:
    check = {"ruled_out": "postcopy and hybrid ruled out: pipeline (pid 4242) forks 48 times a second"}
    precopy = {"finish": "precopy", "finish_reason": "the mode asked for"}
    assert migration._mode_reason("auto", precopy, check) == f"precopy, the one finish left: {check['ruled_out']}"
    assert migration._mode_reason("auto", precopy, {}) == "the mode asked for"


class Undone:
    """A stage whose undo succeeds (the agents' side of it is covered end to end in test_migrate.py)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def run(self, ctx: Context) -> None:
        pass

    def undo(self, ctx: Context) -> None:
        pass


def test_a_rollback_after_the_point_of_no_return_leaves_the_registry_on_the_source(tmp_path: Path) -> None:
    """A lost lazy phase rolls back from past the restore, where the registry moved to the target; so does
    `migrations rollback` finishing such a rollback that stopped half way. Rolled back, it names the source."""
    spec = ContainerSpec(name="web", args=["sleep", "1"], ip="10.77.0.9")
    registry, journal = Registry(tmp_path), Journal(tmp_path)
    registry.add(spec, "local-1")
    mig = journal.begin("web", "local-1", "local-2", "postcopy")
    stages = [Undone(n) for n in ("check", "prepare", "checkpoint", "cutover", "transfer", "restore", "lazy")]
    for stage in stages:
        journal.transition(mig.id, stage.name, "done" if stage.name != "lazy" else "failed")
    registry.move("web", "local-2")  # the runner, at the point of no return
    ctx = Context(mig.id, registry.get("web"), "local-1", "local-2", None, tmp_path, None, None, None)  # type: ignore[arg-type]
    with logfmt.bound(migration=mig.id):  # as rollback() runs it: its stage tags end with the block
        migration._undo(ctx, journal, stages, lambda _: None, cause="lazy failed: lost")  # type: ignore[arg-type]
    assert journal.get(mig.id).state == "rolled-back"
    assert Registry(tmp_path).get("web").host == "local-1"
