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
