"""Auto-converge: slow a container's CPU through its cgroup while pre-copy rounds cannot keep up.

QEMU's auto-converge is the model: the first step denies the guest 20 % of its CPU, each further step
10 % more, up to 99 % (cpu-throttle-initial, -increment; QEMU's own maximum). A container has no vCPUs
to put to sleep, so a step writes the CPU bandwidth limit of its cgroup instead: `cpu.max` on cgroup
v2, `cpu.cfs_quota_us` on v1 (this machine's hosts run the hybrid layout, whose cpu controller is v1).
"20 %" is of what the container itself used while the rounds ran (its cgroup's usage since the first
round began, measured once, at the first step), so the first step slows even a one-thread workload
on a large host; without a limit of its own, a container could otherwise use every CPU of the host
and a step of "20 % of all of them" would not touch it.

The original limit (quota and period) is written to `<state_root>/throttles/<mig>.json` before the first step, and
`Throttles.lift` writes it back byte for byte. The throttle lives only while the source agent runs the
rounds: they lift it as they end or fail (docs/reliability.md, "The throttle is always lifted"), and an
agent that starts lifts every record an earlier one left.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from skyferry.pipeline.errors import SkyferryError

log = logging.getLogger("skyferry.runtimes.throttle")
CGROUP = Path("/sys/fs/cgroup")
START, STEP, CAP = 0.20, 0.10, 0.99  # QEMU's cpu-throttle-initial, cpu-throttle-increment, maximum
MIN_QUOTA_US = 1000  # the kernel refuses a CFS quota below 1 ms
MAX_PERIOD_US = 1_000_000  # and a period above 1 s


@dataclass(frozen=True)
class CpuFiles:
    """The files of one cgroup that limit and count its CPU."""

    limit: Path  # cpu.max ("QUOTA PERIOD" or "max PERIOD") or, on v1, cpu.cfs_quota_us (-1: none)
    period: Path | None  # v1 only: cpu.cfs_period_us (read, never written)
    usage: Path  # cpu.stat (usage_usec) or, on v1, cpuacct.usage (ns)

    @classmethod
    def of(cls, cgroup: str) -> CpuFiles:
        """The files of `cgroup` (a path below the hierarchy's root, as /proc/PID/cgroup names it)."""
        rel = cgroup.strip("/")
        if "cpu" in _read(CGROUP / "cgroup.controllers").split():  # pure cgroup v2
            found = cls(CGROUP / rel / "cpu.max", None, CGROUP / rel / "cpu.stat")
        else:
            cpu = CGROUP / "cpu" / rel
            found = cls(cpu / "cpu.cfs_quota_us", cpu / "cpu.cfs_period_us", CGROUP / "cpuacct" / rel / "cpuacct.usage")
        if not found.limit.exists() or not found.usage.exists():
            raise SkyferryError(
                f"cgroup {cgroup} has no CPU limit to throttle ({found.limit})",
                hint="auto-converge needs the cpu controller on the container's cgroup (cgroup v2: enabled in "
                "the parent's cgroup.subtree_control)",
            )
        return found

    def usage_s(self) -> float:
        """CPU seconds the cgroup has used."""
        if self.period is not None:
            return int(_read(self.usage)) / 1e9
        for line in _read(self.usage).splitlines():
            key, _, value = line.partition(" ")
            if key == "usage_usec":
                return int(value) / 1e6
        raise SkyferryError(f"{self.usage} has no usage_usec")

    def period_us(self) -> int:
        if self.period is not None:
            return int(_read(self.period))
        return int(_read(self.limit).split()[1])

    def quota_us(self) -> int | None:
        """The limit in force, per period; None for none."""
        text = _read(self.limit).split()[0]
        return None if text in ("max", "-1") else int(text)

    def originals(self) -> dict[str, str]:
        """The files a step writes, as they are now, in the order that writes them back safely (v1: the
        quota back to none before the period returns)."""
        return {str(p): _read(p) for p in (self.limit, self.period) if p is not None}

    def set(self, quota_us: int, period_us: int) -> None:
        if self.period is None:
            _write(self.limit, f"{quota_us} {period_us}")
            return
        _write(self.period, str(period_us))
        _write(self.limit, str(quota_us))


def of_pid(pid: int) -> str:
    """The cgroup of process `pid` that holds its CPU limit: the v1 `cpu` hierarchy's line of
    /proc/PID/cgroup, or the v2 line (`0::`) on a pure v2 host. Works for any engine and either cgroup
    driver (cgroupfs or systemd), since it asks the kernel and not the engine."""
    v2 = "cpu" in _read(CGROUP / "cgroup.controllers").split()
    for line in _read(Path(f"/proc/{pid}/cgroup")).splitlines():
        hid, controllers, path = line.split(":", 2)
        if (v2 and hid == "0") or (not v2 and "cpu" in controllers.split(",")):
            return path
    raise SkyferryError(f"process {pid} has no cpu cgroup")


class Record(BaseModel):
    mig: str
    name: str
    original: dict[str, str]  # file -> its content before the first step, written back by `lift`


@dataclass
class Throttle:
    """One migration's throttle of one container. `step` tightens it; lifting is `Throttles.lift`'s."""

    store: Throttles
    mig: str
    name: str
    files: CpuFiles
    cpus: float  # the most CPUs the container may use (its own limit, else the host's)
    since: float = field(default_factory=time.monotonic)
    used0: float = 0.0
    level: float = 0.0  # the share of its CPU the container is denied now
    base: float = 0.0  # the CPUs it used before the first step: what the level is a share of
    period0: int = 0  # the cgroup's own CFS period
    limit: tuple[int, int] | None = None  # the quota and period the last step set

    @contextlib.contextmanager
    def relaxed(self) -> Iterator[None]:
        """The container's own limit while the block runs (a freeze: the freezer cannot stop a task the
        throttle keeps off the CPU in time), the throttle again after it."""
        record, limit = self.store.get(self.mig), self.limit
        if limit is None or record is None:
            yield
            return
        for path, text in record.original.items():
            _write(Path(path), text.strip())
        yield  # a failed block leaves the limit lifted: the rounds end, and their end lifts the record
        self.store.reapply(self.mig, lambda: self.files.set(*limit))

    @classmethod
    def start(cls, store: Throttles, mig: str, name: str, cgroup: str) -> Throttle:
        """Begin measuring the container's CPU (before round 1); nothing is written yet."""
        files = CpuFiles.of(cgroup)
        quota = files.quota_us()
        cpus = quota / files.period_us() if quota is not None else float(os.cpu_count() or 1)
        return cls(store, mig, name, files, cpus, used0=files.usage_s())

    @property
    def capped(self) -> bool:
        return self.level >= CAP

    def step(self) -> dict[str, Any]:
        """The next step (20 %, then +10 % per step, at most 99 %): what it set."""
        if self.level == 0.0:
            elapsed = max(time.monotonic() - self.since, 1e-3)
            self.base = min(max((self.files.usage_s() - self.used0) / elapsed, 0.01), self.cpus)
            self.period0 = self.files.period_us()
            self.store.save(Record(mig=self.mig, name=self.name, original=self.files.originals()))
        self.level = START if self.level == 0.0 else min(round(self.level + STEP, 2), CAP)
        cpus = (1 - self.level) * self.base
        # A light workload's share of the usual 100 ms period can fall below the kernel's 1 ms floor: then a
        # longer period (as QEMU's 99 % sleeps a vCPU ~1 s per 10 ms it runs), at most 1 s.
        period = min(max(self.period0, math.ceil(MIN_QUOTA_US / cpus)), MAX_PERIOD_US)
        quota = max(int(cpus * period), MIN_QUOTA_US)
        self.files.set(quota, period)
        self.limit = (quota, period)
        return {"percent": round(self.level * 100), "quota_us": quota, "period_us": period,
                "base_cpus": round(self.base, 3)}  # fmt: skip


class Throttles:
    """This host's throttle records: the original CPU limits to write back."""

    def __init__(self, state_root: Path) -> None:
        self.dir = state_root / "throttles"
        self._guard = threading.Lock()

    def save(self, record: Record) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".{record.mig}.tmp"
        tmp.write_text(record.model_dump_json())
        tmp.replace(self.dir / f"{record.mig}.json")  # a crash leaves the old record or the new, never half

    def get(self, mig: str) -> Record | None:
        try:
            return Record.model_validate_json((self.dir / f"{mig}.json").read_text())
        except FileNotFoundError:
            return None

    def all(self) -> list[Record]:
        return [r for r in (self.get(p.stem) for p in sorted(self.dir.glob("*.json"))) if r is not None]

    def reapply(self, mig: str, write: Callable[[], None]) -> None:
        """`write` the throttle again, unless it was lifted meanwhile (by the freeze watchdog's thaw)."""
        with self._guard:
            if self.get(mig) is not None:
                write()

    def lift(self, mig: str) -> bool:
        """Write the original limit back and forget the record (idempotent); whether one was lifted. A
        cgroup that is gone (the container removed) has nothing left to lift."""
        with self._guard:
            record = self.get(mig)
            if record is None:
                return False
            for path, text in record.original.items():
                with contextlib.suppress(FileNotFoundError):
                    _write(Path(path), text.strip())
            (self.dir / f"{mig}.json").unlink(missing_ok=True)
        log.info("lifted the CPU throttle of %s (migration %s)", record.name, mig)
        return True

    def lift_all(self) -> list[str]:
        """At agent start: every record is an earlier agent's, whose migration lost its rounds with it."""
        return [r.name for r in self.all() if self.lift(r.mig)]


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def _write(path: Path, text: str) -> None:
    with open(path, "w") as f:  # one write(2): the kernel parses a cgroup file per write
        f.write(text)
