"""A container's spec on disk: read whole while another is written."""

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

from skyferry.pipeline.hostapi.spec import ContainerSpec

SPEC = ContainerSpec(name="c", args=["sleep", "1"], ip="100.64.1.2", env={f"K{i}": "v" * 200 for i in range(500)})


def torn(path: Path, write: Callable[[Path], None], seconds: float = 1.0) -> bool:
    """Whether a reader, reading `path` over and over while `write` rewrites it, ever found it incomplete."""
    write(path)
    stop = threading.Event()

    def rewrite() -> None:
        while not stop.is_set():
            write(path)

    writer = threading.Thread(target=rewrite)
    writer.start()
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                assert ContainerSpec.load(path) == SPEC
            except ValueError:
                return True
    finally:
        stop.set()
        writer.join()
    return False


def test_a_spec_is_never_read_half_written(tmp_path: Path) -> None:
    """An agent lists its containers (a migration's check) while it writes other bundles' spec.json (an
    evacuation's prepares). Written in place, a reader found an empty file and the check failed with `bad
    request: Expecting value` (`make bench`, 2026-12-05). Positive control: written in place, it tears."""
    assert torn(tmp_path / "plain.json", lambda path: path.write_text(json.dumps(SPEC.to_dict())))
    assert not torn(tmp_path / "saved.json", SPEC.save)
