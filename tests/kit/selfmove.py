"""A container moved to itself through an engine adapter (pipeline/runtimes), step by step: what a
migration does on both hosts up to the restore, which the test then drives (and fails, or cuts short)."""

from collections.abc import Callable
from pathlib import Path

from skyferry.pipeline.runtimes.protocol import Runtime


def up_to_restore(
    host: Runtime, engine: str, name: str, netns: str, mig: Path, damage: Callable[[Path], None] | None = None
) -> None:
    """Pause and checkpoint container `name` into `mig`/images, `damage` them if asked (called with that
    directory), remove the container, and prepare it again from its spec with its payload (`engine`'s
    archive name) back in place. What is left is `host.restore(name, mig / "images", mig / "work")`."""
    spec = host.spec(name)
    host.pause(name)
    host.checkpoint(name, mig / "images", mig / "work")
    payload = {p.name: p.read_bytes() for p in host.payload(name)[engine].iterdir()}
    if damage is not None:
        damage(mig / "images")
    host.remove(name)
    host.prepare(spec, netns)
    for file, data in payload.items():
        (host.payload(name)[engine] / file).write_bytes(data)
