"""One migration's story on one time axis: each stage, each pre-copy round, each undo step, where it ran,
and the freeze. Built from the journal alone, so it also tells the story of a migration that failed or
whose controller died."""

from dataclasses import asdict, dataclass
from typing import Any

from skyferry.pipeline.controller.journal import Journal
from skyferry.pipeline.controller.stages import FREEZE_FROM, FREEZE_TO, settled_s

# Where each stage does its work: the source's agent, the target's, both, or the data between them.
WHERE = {
    "check": "source, target",
    "prepare": "target",
    "precopy": "source -> target",
    "checkpoint": "source",
    "transfer": "source -> target",
    "restore": "target",
    "cutover": "every member",
    "confirm": "source",
    "cleanup": "target",
}
ENDS = {"done": "done", "failed": "failed", "undone": "undone", "undo-skipped": "undo skipped"}


@dataclass
class Span:
    label: str
    where: str
    start_ms: float
    end_ms: float
    status: str  # done | failed | undone | … | running (no end recorded)
    kind: str = "stage"  # stage | round | undo | freeze

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def spans(journal: Journal, mig_id: str) -> list[Span]:
    """Every span in start order, milliseconds from the migration's start."""
    mig, transitions = journal.get(mig_id), journal.transitions(mig_id)
    t0, out, open_at = mig.started, [], {}
    for t in transitions:
        stage, status, at = t["stage"], t["status"], (t["at"] - t0) * 1000
        key = (stage, "undo" if status in ("undoing", "undone", "undo-skipped", "undo-refused") else "stage")
        if status in ("started", "undoing"):
            open_at[key] = at
            continue
        start = open_at.pop(key, at)
        label = f"undo {stage}" if key[1] == "undo" else stage
        out.append(Span(label, WHERE.get(stage, ""), start, at, ENDS.get(status, status), key[1]))
        if stage == "precopy" and status == "done":
            out += _rounds(start, (t["detail"] or {}).get("rounds", []))
    now = (max((t["at"] for t in transitions), default=t0) - t0) * 1000
    out += [Span(s, WHERE.get(s, ""), at, now, "running", k) for (s, k), at in open_at.items()]
    freeze = _freeze(out, settled_s(transitions) * 1000)
    return sorted(out + ([freeze] if freeze else []), key=lambda s: (s.start_ms, s.kind != "stage"))


def _rounds(start: float, rounds: list[dict[str, Any]]) -> list[Span]:
    """Pre-copy rounds run back to back from the stage's start; each is as long as the agent measured."""
    out, at = [], start
    for r in rounds:
        end = at + float(r.get("duration") or 0) * 1000
        label = f"round {r.get('seq', len(out) + 1)}: {size(int(r.get('bytes_out') or 0))}"
        out.append(Span(label, "source -> target", at, end, "done", "round"))
        at = end
    return out


def _freeze(stages: list[Span], settled_ms: float = 0.0) -> Span | None:
    """From the checkpoint's pause (its start, after `settled_ms` letting replies land) to the restore's
    end; to the last undo while a failed one thaws."""
    start = next((s.start_ms for s in stages if s.label == FREEZE_FROM and s.kind == "stage"), None)
    if start is None:
        return None
    start += settled_ms
    restored = next((s for s in stages if s.label == FREEZE_TO and s.kind == "stage" and s.status == "done"), None)
    thawed = next((s for s in stages if s.label == f"undo {FREEZE_FROM}"), None)
    if restored:
        return Span("freeze", "source", start, restored.end_ms, "done", "freeze")
    end = thawed.end_ms if thawed else max(s.end_ms for s in stages)
    return Span("freeze", "source", start, end, "thawed on the source" if thawed else "running", "freeze")


def size(value: float | None) -> str:
    """Bytes as people read them: 1.44 MB, 10.82 kB (a small last round is not "0.00 MB")."""
    if value is None:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{int(value)} B"
