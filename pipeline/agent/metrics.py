"""The agent's Prometheus metrics (GET /v1/metrics; docs/observability.md): the one owner of every metric
object. Other agent code records through the functions here, never through a metric directly.

A migration is recorded by each agent it passes through, as its `side` (source or target) sees it: the
steps it ran and how long each took (`step`), the bytes it sent or received per stream (`counted`,
`Counted`), and how it ended here (`finish`): "done" at the source's confirm and the target's cleanup,
"rolled-back" at the source's rollback and the target's abort, counted once per migration and side. The
migration's mode and the stage whose failure rolled it back are the controller's, sent with each step.
The freeze is the source's: the controller's measured freeze (checkpoint started .. restore done, as
`migrations show` reports it) at confirm; after a rollback, how long the container stayed frozen here.

Host state (containers, their memory, images on tmpfs, running migrations, lazy pages outstanding) is
read at each scrape (`HostCollector`), so it is never stale and leaves no series behind.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import BinaryIO

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from skyferry.pipeline import logfmt
from skyferry.pipeline.agent import capacity
from skyferry.pipeline.agent.host import Host
from skyferry.pipeline.memory.policy import PAGE, RoundStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
SOURCE, TARGET = "source", "target"
DONE, ROLLED_BACK = "done", "rolled-back"
# Freezes run from tens of milliseconds to the 30 s bound; whole migrations to many minutes.
FREEZE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0)
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
REMEMBERED = 4096  # finished migrations kept to count each once (a rollback undoes several stages)

disable_created_metrics()  # no `_created` series: they double what a scrape holds and no panel uses them
REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)  # the agent's own CPU, memory and open files
MIGRATIONS = Counter(
    "skyferry_migrations", "Migrations this agent took part in, by how they ended here; failed_stage is the "
    "stage whose failure rolled the migration back (none when done)",
    ["side", "mode", "outcome", "failed_stage"], registry=REGISTRY,
)  # fmt: skip
FREEZE = Histogram(
    "skyferry_migration_freeze_seconds", "How long the container was frozen (source only): checkpoint started "
    "until the target's restore was done; after a rollback, until it was thawed here",
    ["mode", "outcome"], buckets=FREEZE_BUCKETS, registry=REGISTRY,
)  # fmt: skip
TOTAL = Histogram(
    "skyferry_migration_seconds", "A migration on this side: its first step here until it ended here",
    ["side", "mode", "outcome"], buckets=DURATION_BUCKETS, registry=REGISTRY,
)  # fmt: skip
STAGE = Histogram(
    "skyferry_migration_stage_seconds", "Each migration step this agent ran, failed ones included",
    ["side", "stage", "result"], buckets=DURATION_BUCKETS, registry=REGISTRY,
)  # fmt: skip
BYTES = Counter(
    "skyferry_migration_bytes", "Bytes of migration streams: sent (source) or received (target); lazy-pages: "
    "pages a target fetched from the source after a lazy restore",
    ["side", "stream"], registry=REGISTRY,
)  # fmt: skip
ROUNDS = Counter(
    "skyferry_precopy_rounds", "Pre-copy memory rounds sent while the container ran", ["method"], registry=REGISTRY
)
DIRTY_RATE = Gauge(
    "skyferry_precopy_dirty_rate_bytes", "Memory the container dirtied per second, as the last pre-copy round "
    "measured it (pages changed since the round before), while the migration runs",
    ["container"], registry=REGISTRY,
)  # fmt: skip
THROTTLE = Gauge(
    "skyferry_autoconverge_throttle_percent", "CPU taken from a container so that its pre-copy converges, "
    "while the throttle holds", ["container"], registry=REGISTRY,
)  # fmt: skip
PAGE_WAIT = Histogram(
    "skyferry_lazy_page_wait_seconds", "After a lazy restore: how long a fault waited for a page from the "
    "source's page server (pages already here are not counted)",
    buckets=LATENCY_BUCKETS, registry=REGISTRY,
)  # fmt: skip
log = logging.getLogger("skyferry.agent.metrics")
# How migrations can end, each counted from 0 at the agent's start: a series that appeared only with its
# first migration would hide that one from increase() and rate(), which see only changes (the dashboard's
# counts over a range and its freeze quantiles).
FINISHES = ("precopy", "hybrid", "postcopy", "stop-copy")  # a done migration's mode (auto's rounds pick one)
FAILED_STAGES = ("prepare", "precopy", "checkpoint", "transfer", "restore", "cutover", "lazy")  # rollback causes


def _zeros() -> None:
    for side in (SOURCE, TARGET):
        for mode in FINISHES:
            MIGRATIONS.labels(side, mode, DONE, "none")
        for mode, stage in itertools.product(("auto", *FINISHES), FAILED_STAGES):
            MIGRATIONS.labels(side, mode, ROLLED_BACK, stage)
        MIGRATIONS.labels(side, "estimate", ROLLED_BACK, "unknown")  # how `migrate --estimate` ends
    for mode in FINISHES:
        FREEZE.labels(mode, DONE)


_zeros()


class _Track:
    """One migration as this agent sees it, until it ends here."""

    def __init__(self, side: str) -> None:
        self.side = side
        self.mode = "unknown"
        self.started = time.monotonic()
        self.frozen: float | None = None  # source: when the checkpoint began (monotonic)


_lock = threading.Lock()
_tracks: dict[tuple[str, str], _Track] = {}
_finished: collections.OrderedDict[tuple[str, str], None] = collections.OrderedDict()


def _track(side: str, mig: str, mode: str | None) -> _Track:
    with _lock:
        track = _tracks.setdefault((side, mig), _Track(side))
        if mode:
            track.mode = mode
        return track


@contextmanager
def step(side: str, mig: str, name: str, op: str, mode: str | None) -> Iterator[None]:
    """Time one step of migration `mig` on this side, with every line logged inside it carrying the
    migration, container and stage."""
    track = _track(side, mig, mode)
    if op == "checkpoint" and track.frozen is None:
        track.frozen = time.monotonic()
    t0 = time.monotonic()
    with logfmt.bound(migration=mig, container=name, stage=op):
        log.info("%s %s started (%s)", side, op, track.mode)
        try:
            yield
        except BaseException as exc:
            seconds = time.monotonic() - t0
            STAGE.labels(side, op, "failed").observe(seconds)
            log.warning("%s %s failed after %.3f s: %s", side, op, seconds, exc)
            raise
        seconds = time.monotonic() - t0
        STAGE.labels(side, op, "done").observe(seconds)
        log.info("%s %s done in %.3f s", side, op, seconds)


def finish(
    side: str, mig: str, container: str, outcome: str, failed_stage: str | None = None, freeze_s: float | None = None
) -> None:
    """Migration `mig` of `container` ended on this side: count it once, with its whole duration here and
    (source) its freeze: `freeze_s` as the controller measured it, else (a rollback) how long it stayed
    frozen here."""
    key = (side, mig)
    with _lock:
        if key in _finished:
            return  # a rollback undoes several stages: each calls rollback or abort
        _finished[key] = None
        if len(_finished) > REMEMBERED:
            _finished.popitem(last=False)
        track = _tracks.pop(key, None) or _Track(side)
    forget_container(container)
    now = time.monotonic()
    MIGRATIONS.labels(side, track.mode, outcome, failed_stage or ("none" if outcome == DONE else "unknown")).inc()
    TOTAL.labels(side, track.mode, outcome).observe(now - track.started)
    if side == SOURCE:
        if freeze_s is None and track.frozen is not None and outcome == ROLLED_BACK:
            freeze_s = now - track.frozen
        if freeze_s is not None:
            FREEZE.labels(track.mode, outcome).observe(freeze_s)
    log.info("%s of migration %s ended: %s%s", side, mig, outcome, f" (at {failed_stage})" if failed_stage else "")


def forget_container(name: str) -> None:
    """The container's migration ended here: drop its per-container series (the throttle included)."""
    for gauge in (DIRTY_RATE, THROTTLE):
        with contextlib.suppress(KeyError):
            gauge.remove(name)


def counted(side: str, stream: str, chunks: Iterable[bytes]) -> Iterator[bytes]:
    """`chunks`, counted into the stream's bytes as they pass."""
    bytes_ = BYTES.labels(side, stream)
    for chunk in chunks:
        bytes_.inc(len(chunk))
        yield chunk


class Counted:
    """A stream body (`read`) whose bytes are counted as they are read."""

    def __init__(self, side: str, stream: str, body: BinaryIO) -> None:
        self.body, self.bytes = body, BYTES.labels(side, stream)

    def read(self, size: int = -1) -> bytes:
        data = self.body.read(size)
        self.bytes.inc(len(data))
        return data


def precopy_round(container: str, method: str, history: list[RoundStats]) -> None:
    """A pre-copy round went out: count it, and from the second on, the dirty rate it measured."""
    ROUNDS.labels(method).inc()
    if len(history) >= 2:
        last, prev = history[-1], history[-2]
        DIRTY_RATE.labels(container).set(last.pages_changed * PAGE / max(last.started - prev.started, 1e-6))


def throttle(container: str, percent: float) -> None:
    """The auto-converge throttle on `container` (0 when released: the series goes)."""
    if percent > 0:
        THROTTLE.labels(container).set(percent)
    else:
        with contextlib.suppress(KeyError):
            THROTTLE.remove(container)


def lazy_pages(fetched: int) -> None:
    """A lazy phase ended here, after fetching `fetched` pages from the source."""
    BYTES.labels(TARGET, "lazy-pages").inc(fetched * PAGE)


def page_wait(seconds: float) -> None:
    PAGE_WAIT.observe(seconds)


class HostCollector(Collector):
    """What the host holds, read at each scrape."""

    def __init__(self, host: Host, outstanding: Callable[[], dict[str, int]]) -> None:
        self.host, self.outstanding = host, outstanding

    def collect(self) -> Iterator[Metric]:
        host = self.host
        info = GaugeMetricFamily("skyferry_agent_info", "This agent's host and mesh", labels=["host", "mesh"])
        info.add_metric([host.cfg.name, host.cfg.mesh], 1)
        yield info
        running = GaugeMetricFamily("skyferry_migrations_running", "Migrations in progress here", labels=["side"])
        running.add_metric([SOURCE], len(host.sources))
        running.add_metric([TARGET], len(host.targets))
        yield running
        memory = capacity.memory_by_container(host)
        containers = GaugeMetricFamily("skyferry_containers", "Containers on this host")
        containers.add_metric([], len(memory))
        yield containers
        used = GaugeMetricFamily(
            "skyferry_container_memory_bytes", "Resident memory of each container (cgroup, without page cache)",
            labels=["container"],
        )  # fmt: skip
        for name, size in sorted(memory.items()):
            used.add_metric([name], size)
        yield used
        tmpfs = GaugeMetricFamily("skyferry_images_tmpfs_bytes", "Checkpoint images and page stores held on tmpfs")
        tmpfs.add_metric([], _du(host))
        yield tmpfs
        outstanding = GaugeMetricFamily(
            "skyferry_lazy_pages_outstanding", "After a lazy restore: pages the target still has to fetch",
            labels=["container"],
        )  # fmt: skip
        for name, left in sorted(self.outstanding().items()):
            outstanding.add_metric([name], left)
        yield outstanding


def _du(host: Host) -> int:
    root = host.images_root
    total = 0
    for path in root.rglob("*") if root.is_dir() else ():
        try:
            if path.is_file() and not path.is_symlink():
                total += path.stat().st_blocks * 512  # what tmpfs holds, sparse page stores included
        except OSError:
            continue  # removed while we walked
    return total


def watch(host: Host, outstanding: Callable[[], dict[str, int]]) -> None:
    """Scrapes also read `host`'s state, and the pages each lazily restored container still lacks (once
    per agent process)."""
    REGISTRY.register(HostCollector(host, outstanding))


def exposition() -> bytes:
    return generate_latest(REGISTRY)
