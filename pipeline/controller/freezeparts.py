"""Where one freeze went, from the details its stages journalled (docs/migration.md, "Where the freeze goes").

The freeze runs from the checkpoint's start to the restore's end as the controller journals them. The
agents time their own work inside it (the source: pausing and locking, then CRIU's dump; the target: the
engine's restore, then opening the netns and replaying the held segments); what a stage's call took
beyond that is its round trip and the agent's other steps, and what lies between the stages is the
controller's own (journal commits).
"""

from typing import Any

FREEZE_STAGES = ("checkpoint", "cutover", "transfer", "restore")
PARTS = ("pause_and_lock", "dump", "checkpoint_call", "cutover", "transfer", "restore", "unlock_and_replay",
         "restore_call", "between_stages")  # in the order they happen  # fmt: skip


def parts(detail: dict[str, dict[str, Any]], freeze_s: float | None) -> dict[str, float] | None:
    """Milliseconds per part of the freeze, in the order they happen; None before the restore is done."""
    if freeze_s is None or any("seconds" not in detail.get(stage, {}) for stage in FREEZE_STAGES):
        return None
    ckpt, restore = detail["checkpoint"], detail["restore"]
    pause, dump, settled = ckpt.get("pause_s", 0.0), ckpt.get("dump_s", 0.0), ckpt.get("settle_s", 0.0)
    engine, unlock = restore.get("restore_s", 0.0), restore.get("unlock_s", 0.0)
    out = {
        "pause_and_lock": pause,
        "dump": dump,
        "checkpoint_call": ckpt["seconds"] - settled - pause - dump,
        "cutover": detail["cutover"]["seconds"],
        # A restore carried by the transfer ran inside the transfer's call (its "seconds" is its own work).
        "transfer": detail["transfer"]["seconds"] - (restore["seconds"] if restore.get("with_transfer") else 0.0),
        "restore": engine,
        "unlock_and_replay": unlock,
        "restore_call": restore["seconds"] - engine - unlock,
        "between_stages": freeze_s
        - sum(detail[stage]["seconds"] for stage in FREEZE_STAGES)
        + settled  # inside the checkpoint's call, before the freeze
        + (restore["seconds"] if restore.get("with_transfer") else 0.0),
    }
    return {k: round(max(v, 0.0) * 1000, 1) for k, v in out.items()}
