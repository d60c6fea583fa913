"""Where a freeze went, from stage details written by hand (a real migration's: test_migrate)."""

import pytest
from skyferry.pipeline.controller import freezeparts

DETAIL = {
    "checkpoint": {"seconds": 0.2, "pause_s": 0.03, "dump_s": 0.15},
    "cutover": {"seconds": 0.03},
    "transfer": {"seconds": 0.09},
    "restore": {"seconds": 0.1, "restore_s": 0.08, "unlock_s": 0.001},
}


def test_the_parts_add_up_to_the_freeze_in_the_order_they_happen() -> None:
    parts = freezeparts.parts(DETAIL, 0.45)
    assert parts is not None and list(parts) == list(freezeparts.PARTS)
    assert parts["checkpoint_call"] == pytest.approx(20.0) and parts["restore_call"] == pytest.approx(19.0)
    assert parts["between_stages"] == pytest.approx(30.0) and sum(parts.values()) == pytest.approx(450.0)


def test_no_parts_before_the_restore_is_done() -> None:
    assert freezeparts.parts({k: v for k, v in DETAIL.items() if k != "restore"}, 0.45) is None
    assert freezeparts.parts(DETAIL, None) is None


def test_a_restore_carried_by_the_transfer_is_taken_out_of_the_transfer() -> None:
    """The transfer's call held the target's restore (with_transfer): its engine time and unlock count as
    the restore, the rest of that call as the transfer, and the restore has no call of its own."""
    carried = {**DETAIL, "transfer": {"seconds": 0.18}, "restore": {"seconds": 0.081, "restore_s": 0.08,
               "unlock_s": 0.001, "with_transfer": True}}  # fmt: skip
    parts = freezeparts.parts(carried, 0.45)
    assert parts is not None and parts["transfer"] == pytest.approx(99.0) and parts["restore_call"] == 0.0
    assert parts["restore"] == pytest.approx(80.0) and parts["between_stages"] == pytest.approx(40.0)
    assert sum(parts.values()) == pytest.approx(450.0)
