"""The final streams of a transfer as they land on the target, for the restore that waits for them.

The source asks for the restore as soon as it has sent the last byte of its final streams, on a lane of
its own, without waiting for their answers (docs/migration.md, "The restore rides on the transfer"). The
target may then hold that request before those streams have landed, or before one has even arrived: the
restore waits here, outside the container's lock (the streams need it), until each has been applied; one
that failed, or never came, means no restore, and the answer says the target was never asked.
"""

import contextlib
import threading
import time
from collections.abc import Iterator

from skyferry.pipeline.errors import NotRestored

ARRIVE_S = 5.0  # a stream sent before the restore was asked reaches the target well within this


class Finals:
    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._running: set[tuple[str, str]] = set()
        self._ended: dict[tuple[str, str], str | None] = {}  # (transfer, stream) -> its error, None if applied

    @contextlib.contextmanager
    def landing(self, transfer: str | None, stream: str) -> Iterator[None]:
        """Around one stream, from before it waits for the container's lock until it was applied."""
        if transfer is None:  # not a final stream: nothing waits for it
            yield
            return
        key = (transfer, stream)
        with self._changed:
            self._running.add(key)
        error: str | None = "it ended early"
        try:
            yield
            error = None
        except Exception as exc:
            error = str(exc)
            raise
        finally:
            with self._changed:
                self._running.discard(key)
                self._ended[key] = error
                self._changed.notify_all()

    def wait(self, transfer: str, streams: list[str], deadline: float | None) -> float:
        """Return once every stream of `transfer` in `streams` was applied (the seconds waited), or raise
        NotRestored: one failed, one never arrived, or the freeze's `deadline` (wall clock) passed."""
        t0 = time.monotonic()
        with self._changed:
            while True:
                failed = [(s, self._ended[(transfer, s)]) for s in streams if self._ended.get((transfer, s))]
                if failed:
                    stream, error = failed[0]
                    raise NotRestored(f"the final stream {stream} failed ({error}): nothing was restored")
                pending = [s for s in streams if (transfer, s) not in self._ended]
                if not pending:
                    return time.monotonic() - t0
                absent = [s for s in pending if (transfer, s) not in self._running]
                if absent and time.monotonic() - t0 > ARRIVE_S:
                    raise NotRestored(f"the final stream {absent[0]} never arrived: nothing was restored")
                if deadline is not None and time.time() >= deadline:
                    raise NotRestored(f"the freeze bound passed before {pending[0]} landed: nothing was restored")
                self._changed.wait(0.05)
