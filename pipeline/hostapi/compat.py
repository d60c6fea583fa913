"""Which kernel features a migration needs on each side, by mode: the agents report them in `/v1/facts`
(`features`), the check stage compares them before anything freezes (docs/migration.md, "check").

Names are CRIU's (`criu check --feature NAME`), except `tcp_repair`, which `skyferry doctor` probes itself
(setsockopt(TCP_REPAIR) in a scratch netns): CRIU has no feature name for it.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

ALL_MODES = ("stop-copy", "precopy", "hybrid", "postcopy")
LAZY_MODES = ("hybrid", "postcopy")  # the target restores with a lazy-pages daemon (userfaultfd)
NO_ROUNDS = ("stop-copy", "postcopy")  # no pre-copy rounds: the memory moves inside the freeze or after it

# What a side needs, whatever the other one has: feature -> the modes that need it.
SOURCE_NEEDS: dict[str, tuple[str, ...]] = {"tcp_repair": ALL_MODES}  # every dump takes established TCP
TARGET_NEEDS: dict[str, tuple[str, ...]] = {"tcp_repair": ALL_MODES, "uffd-noncoop": LAZY_MODES}
# A dump records a time namespace when the source kernel has one and the container uses it; a target
# without time namespaces then fails the restore. So where the source has it, the target must too.
FOLLOW_SOURCE = ("timens",)
# Reported, never compared: soft-dirty decides which pre-copy the source runs (CRIU's iterative pre-dump
# or content-based rounds, docs/precopy.md); the target never needs it.
INFO = ("mem_dirty_track",)
CRIU_FEATURES = ("uffd-noncoop", "timens", "mem_dirty_track")  # probed with `criu check --feature`
HINTS = {
    "tcp_repair": "established TCP connections move in repair mode: run the agent as root on a kernel "
    "with CONFIG_CHECKPOINT_RESTORE=y (`skyferry doctor` there)",
    "uffd-noncoop": "use --mode precopy (needs no userfaultfd), or a target whose kernel has "
    "CONFIG_USERFAULTFD=y and whose agent is not confined by a seccomp profile that blocks userfaultfd",
    "timens": "pick a target with time namespaces (Linux >= 5.6)",
}


@dataclass(frozen=True)
class Missing:
    """A feature one side lacks (False) or could not check (None) that this migration needs there."""

    host: str
    feature: str
    why: str  # what needs it
    known: bool  # False: CRIU could not answer on that host

    def __str__(self) -> str:
        return f"{self.host} {'lacks' if self.known else 'could not check'} {self.feature} ({self.why})"


def missing(src: Mapping[str, Any], dst: Mapping[str, Any], mode: str) -> list[Missing]:
    """The features this pair lacks for `mode`, from both agents' facts. Pure, so the check stage and its
    tests agree on one rule."""
    have_src: Mapping[str, bool | None] = src.get("features", {})
    have_dst: Mapping[str, bool | None] = dst.get("features", {})
    found: list[Missing] = []
    for side, have, needs in ((src, have_src, SOURCE_NEEDS), (dst, have_dst, TARGET_NEEDS)):
        for feature, modes in needs.items():
            if mode in modes and not have.get(feature):
                role = "source" if side is src else "target"
                found.append(
                    Missing(side["host"], feature, f"the {role} of a {mode} migration", have.get(feature) is not None)
                )
    for feature in FOLLOW_SOURCE:
        if have_src.get(feature) and not have_dst.get(feature):
            found.append(Missing(dst["host"], feature, f"{src['host']} has it and its dumps may record it",
                                 have_dst.get(feature) is not None))  # fmt: skip
    return found


def hint(found: list[Missing]) -> str:
    return "; ".join(dict.fromkeys(HINTS.get(m.feature, "pick another target") for m in found))
