"""The freeze bound: no container stays frozen for a migration with nobody working on it.

From the moment the source pauses a container (`checkpoint`), a CRIU pre-dump freezes it for a round
(`pre-dump`), or a test cutover pauses it for its clone's dump (`clone-checkpoint`), the source agent
keeps a record on its state dir, `<state_root>/freezes/<mig>.json`:
the container, since when, the deadline, and the target's agent. A `Watchdog` thread, started with the
agent (so also by an agent that restarts after a crash), ends each freeze that is past its deadline
(`SourceSession`'s `expire` in pipeline/agent/source.py says how). A record goes when the migration
ends here (rollback, confirm); an expired one stays, marked, so that every later step of that migration
is refused and the controller, now or when it resumes, rolls back.

Deadlines are wall-clock times (`time.time()`): they must survive the agent, and the target's restore is
bounded by the same deadline.
"""

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

from pydantic import BaseModel
from skyferry.pipeline.errors import SkyferryError

log = logging.getLogger("skyferry.agent.freeze")
TICK = 0.5  # seconds between the watchdog's looks at the records
# Only after a `checkpoint` may the target hold a copy: that freeze ends with a fence, and the migration
# is refused from then on. The others only pause the container for a dump of their own. "serving": a lazy
# checkpoint's copy went live on the target while this one still serves its pages (`source.expire`).
Phase = Literal["checkpoint", "pre-dump", "clone-checkpoint", "serving"]


class Freeze(BaseModel):
    mig: str
    name: str
    phase: Phase
    since: float
    deadline: float
    bound: float
    target: str | None = None  # the target's agent, "address:port", fenced before a thaw
    expired: str | None = None  # why the watchdog thawed the container, once it has
    lazy: bool = False  # a lazy checkpoint: the frozen container serves the target's missing pages


class Freezes:
    """This host's freeze records, and the migrations the watchdog is ending right now."""

    def __init__(self, state_root: Path) -> None:
        self.dir = state_root / "freezes"
        # Migration -> the process groups killed: their steps stop at once (uploads check it per chunk).
        self.expiring: dict[str, list[int]] = {}
        # The migrations whose freeze expired, kept in memory so that `check`, which steps call inside the
        # freeze, reads no file there; filled from disk once, for the records an agent before us marked.
        self._expired = {r.mig for r in self.all() if r.expired}
        self._frozen: set[str] = set()  # armed here and not serving nor expired: read per chunk of a bulk round

    def arm(
        self, mig: str, name: str, phase: Phase, bound: float, target: str | None = None, lazy: bool = False
    ) -> Freeze:
        """Start the clock for `mig` (before the freeze starts). A repeated checkpoint keeps the first
        record: the bound counts from the pause on."""
        self.check(mig)
        current = self.get(mig)
        if current is not None and current.phase in (phase, "serving"):
            return current
        now = time.time()
        record = Freeze(mig=mig, name=name, phase=phase, since=now, deadline=now + bound, bound=bound, target=target,
                        lazy=lazy)  # fmt: skip
        self._write(record)
        self._frozen.add(mig)
        return record

    def frozen(self) -> bool:
        """Whether a container is frozen for a migration here, its clients waiting: from the pause until
        its copy runs on the target (`restored`), a lazy one's served pages aside; or about to be
        (`settling`)."""
        return bool(self._frozen)

    @contextlib.contextmanager
    def settling(self, mig: str) -> Iterator[None]:
        """The moments before `mig`'s pause count as frozen (agent/settle.py lets its replies land)."""
        self._frozen.add(mig)
        try:
            yield
        finally:
            self._frozen.discard(mig)

    def restored(self, mig: str) -> None:
        """The target's copy runs: the record stays (the freeze is bounded until confirm), the wait is over."""
        self._frozen.discard(mig)

    def serve(self, record: Freeze, bound: float) -> None:
        """The target's copy is live and may still fetch pages from this frozen one: watch it `bound` s more."""
        self._write(record.model_copy(update={"phase": "serving", "deadline": time.time() + bound, "bound": bound}))
        self.expiring.pop(record.mig, None)
        self._frozen.discard(record.mig)

    def get(self, mig: str) -> Freeze | None:
        try:
            return Freeze.model_validate_json((self.dir / f"{mig}.json").read_text())
        except FileNotFoundError:
            return None

    def all(self) -> list[Freeze]:
        return [r for r in (self.get(p.stem) for p in sorted(self.dir.glob("*.json"))) if r is not None]

    def forget(self, mig: str) -> None:
        (self.dir / f"{mig}.json").unlink(missing_ok=True)
        self.expiring.pop(mig, None)
        self._expired.discard(mig)
        self._frozen.discard(mig)

    def mark_expired(self, record: Freeze, why: str) -> None:
        self._write(record.model_copy(update={"expired": why}))
        self._expired.add(record.mig)
        self._frozen.discard(record.mig)
        self.expiring.pop(record.mig, None)

    def check(self, mig: str, cause: Exception | None = None) -> None:
        """Refuse a step of a migration whose freeze hit its bound: it rolls back. `cause`: what the step
        itself raised (a killed runc, a stream cut short), named in the refusal, whose tool log it keeps.
        Reads no file unless it refuses (then the freeze is over): steps call it inside the freeze."""
        if mig in self.expiring or mig in self._expired:
            raise self.error(mig, self.get(mig), cause) from cause

    def error(self, mig: str, record: Freeze | None, cause: Exception | None = None) -> SkyferryError:
        bound = f" ({record.bound:g} s)" if record else ""
        what = record.expired if record and record.expired else "the watchdog is ending the freeze"
        killed = self.expiring.get(mig)
        stuck = f"; killed the stuck runc/CRIU (process group {', '.join(map(str, killed))})" if killed else ""
        step = f" (the step itself: {cause})" if cause else ""
        return SkyferryError(
            f"migration {mig}: the freeze bound{bound} was hit: {what}{stuck}{step}",
            hint="the source thawed the container; the migration rolls back. A longer bound: skyferry migrate "
            "--freeze-timeout SECONDS; what hung is in the CRIU log (skyferry migrations show ID)",
            log=getattr(cause, "log", None),
        )

    def _write(self, record: Freeze) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".{record.mig}.tmp"
        tmp.write_text(record.model_dump_json())
        tmp.replace(self.dir / f"{record.mig}.json")  # a crash leaves the old record or the new, never half


class Watchdog:
    """A daemon thread that has `expire(record)` called for every live freeze past its deadline, each in
    a thread of its own (one may wait for its container's lock, or for an unreachable target, without
    holding up the others); an `expire` that cannot finish yet leaves the record live and is tried again."""

    def __init__(self, freezes: Freezes, expire: Callable[[Freeze], None]) -> None:
        self.freezes, self.expire = freezes, expire
        self._busy: set[str] = set()
        self._guard = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="freeze-watchdog", daemon=True)

    def start(self) -> "Watchdog":
        self._thread.start()
        return self

    def _loop(self) -> None:
        while True:
            for record in self.freezes.all():
                if record.expired is None and time.time() >= record.deadline:
                    with self._guard:
                        if record.mig in self._busy:
                            continue
                        self._busy.add(record.mig)
                    threading.Thread(target=self._end, args=(record,), name=f"freeze-{record.mig}", daemon=True).start()
            time.sleep(TICK)

    def _end(self, record: Freeze) -> None:
        try:
            self.expire(record)
        except Exception:  # the watchdog outlives any one failure; it tries again at the next tick
            log.exception("ending the freeze of %s (migration %s) failed; retrying", record.name, record.mig)
        finally:
            with self._guard:
                self._busy.discard(record.mig)
