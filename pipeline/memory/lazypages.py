"""The target's side of a lazy restore: CRIU's lazy-pages daemon, pointed at the page-server proxy
(pipeline/memory/lazyproxy.py) that serves it from the pre-copy store and the source, and run under a
guard (pipeline/memory/lazyguard.py) that stops the restored copy if the daemon dies before every page
has arrived."""

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.memory.lazyproxy import LazyProxy
from skyferry.pipeline.memory.pages import HashTable
from skyferry.pipeline.memory.pagetunnel import Dialled
from skyferry.pipeline.memory.store import TargetStore

START_TIMEOUT_S = 10.0
log = logging.getLogger("skyferry.lazypages")


class Pager:
    """A proxy for `store` (clean pages from it, the rest from the source, over the TLS link `dial` opens or
    opened) and a guarded lazy-pages daemon for the images in `images`, listening in `work` for
    `restore --lazy-pages`."""

    def __init__(
        self, store: TargetStore, clean: dict[int, HashTable], images: Path, dial: Callable[[], Dialled], work: Path,
        guard: subprocess.Popen[bytes] | None = None,
    ):  # fmt: skip
        self.work = work
        self.link: Dialled | None = None
        self.proxy = LazyProxy(store, clean, images, self._upstream(dial))
        try:
            # The daemon first: it reaches the proxy only once the restore hands it a task, so its start
            # overlaps the link's (the rest of an early dial, or a whole one).
            self.daemon = start_daemon(guard or spawn_guard(work), images, work, self.proxy.address)
        except BaseException:
            self.proxy.close()
            raise
        try:
            self.proxy.start()
        except BaseException:
            self.stop()
            raise
        self.held = 0  # uffds the guard holds (0 until `guard`)

    def _upstream(self, dial: Callable[[], Dialled]) -> Callable[[], socket.socket]:
        def upstream() -> socket.socket:
            self.link = dial()
            return self.link.sock

        return upstream

    def _unlink(self) -> None:
        link, self.link = self.link, None
        if link is not None:
            link.close()

    def alive(self) -> bool:
        return self.daemon.poll() is None

    def guard(self, kill: list[str]) -> int:
        """The restore is done: have the guard take the restored tasks' uffds and run `kill` (which stops
        the container) if the daemon dies before every page has arrived. How many uffds it holds."""
        assert self.daemon.stdin is not None and self.daemon.stdout is not None
        try:
            self.daemon.stdin.write(json.dumps({"kill": kill}).encode() + b"\n")
            self.daemon.stdin.flush()
            answer = json.loads(self.daemon.stdout.readline())
            self.held = int(answer["held"])
        except (OSError, ValueError, KeyError) as exc:
            # Gone already: fine if every page had arrived (a short lazy phase can end before the restore
            # returns); otherwise nobody has stopped the copy, and the caller must.
            try:
                rc: int | None = self.daemon.wait(timeout=5)
            except subprocess.TimeoutExpired:
                rc = None
            if rc != 0:
                raise SkyferryError(f"the lazy-pages guard did not answer: {exc}", hint=f"see {self.work}") from None
            return 0
        if answer.get("error"):
            log.warning("the lazy-pages guard holds %d uffds: %s", self.held, answer["error"])
        return self.held

    def finish(self, timeout: float) -> tuple[int | None, dict[str, Any]]:
        """Wait until the daemon has every page (its exit status, None on timeout: then the guard stops the
        daemon and the container); then the proxy's stats."""
        t0 = time.monotonic()
        try:
            rc: int | None = self.daemon.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
        waited = round(time.monotonic() - t0, 3)
        return rc, {"lazy_s": waited, "uffds_guarded": self.held, **self.stop()}

    def stop(self) -> dict[str, Any]:
        """Stop the daemon if it still runs (its guard then stops the container, which cannot go on without
        it) and close the proxy; returns the proxy's stats."""
        end_guard(self.daemon)  # its SIGTERM: kill the daemon, then the copy
        stats = self.proxy.close()
        self._unlink()
        return stats


def spawn_guard(work: Path) -> subprocess.Popen[bytes]:
    """The guard (pipeline/memory/lazyguard.py) of a daemon to come, started ahead: it waits for
    `start_daemon` to name the daemon. Its log is `work`/lazy-guard.log."""
    work.mkdir(parents=True, exist_ok=True)
    with open(work / "lazy-guard.log", "ab") as log:
        return subprocess.Popen([sys.executable, "-m", "skyferry.pipeline.memory.lazyguard"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=log, start_new_session=True)  # fmt: skip


def start_daemon(guard: subprocess.Popen[bytes], images: Path, work: Path, page_server: str) -> subprocess.Popen[bytes]:
    """Have `guard` (`spawn_guard`) start `criu lazy-pages` for the images in `images`; returns the guard
    once the daemon listens in `work` for the restore (`restore --lazy-pages` with the same work
    directory). The guard exits with the daemon's status once every page has arrived."""
    assert guard.stdin is not None
    address, port = page_server.rsplit(":", 1)
    socket_path = work / "lazy-pages.socket"
    socket_path.unlink(missing_ok=True)
    argv = ["criu", "lazy-pages", "--page-server", "--address", address, "--port", port,
            "-D", str(images), "-W", str(work), "-o", "lazy-pages.log", "-v4"]  # fmt: skip
    with contextlib.suppress(OSError):  # a guard that died is seen below
        guard.stdin.write(json.dumps({"run": argv}).encode() + b"\n")
        guard.stdin.flush()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not socket_path.exists():
        if guard.poll() is not None or time.monotonic() > deadline:
            end_guard(guard)
            raise SkyferryError("CRIU's lazy-pages daemon did not start", hint=f"see {work / 'lazy-pages.log'}")
        time.sleep(0.002)
    return guard


def end_guard(guard: subprocess.Popen[bytes]) -> None:
    """Stop a guard (and so its daemon, if it has one) and reap it."""
    if guard.poll() is None:
        guard.terminate()
    guard.wait()
    _close(guard.stdin, guard.stdout)


def _close(*pipes: IO[bytes] | None) -> None:
    for pipe in pipes:
        if pipe is not None:
            pipe.close()


def stop_strays(under: Path) -> list[int]:
    """Kill lazy-pages daemons whose images lie under `under` (a host's image tmpfs): an agent that died
    leaves them behind, since they run in their own session. Run when an agent starts, before it serves
    anything, so none of them is its own; matched by the image directory on their command line. (Their
    proxy died with the agent; each one's guard then stops the copy it restored.)"""
    prefix = str(under).encode() + b"/"
    killed = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[:2] == [b"criu", b"lazy-pages"] and any(a.startswith(prefix) for a in argv):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry.name), signal.SIGKILL)
                killed.append(int(entry.name))
    return killed


def stop_restore(work: Path) -> list[int]:
    """Kill the CRIU of a `runc restore` whose work directory is `work` (runc then returns, failed)."""
    flag = str(work).encode()
    runcs = {e.name for e in Path("/proc").iterdir() if e.name.isdigit() and _argv(e)[:1] == [b"runc"]
             and flag in _argv(e)}  # fmt: skip
    killed = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[1]
        except (OSError, IndexError):
            continue
        if ppid in runcs and _comm(entry) == "criu":
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry.name), signal.SIGKILL)
                killed.append(int(entry.name))
    return killed


def _argv(entry: Path) -> list[bytes]:
    try:
        return (entry / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def _comm(entry: Path) -> str:
    try:
        return (entry / "comm").read_text().strip()
    except OSError:
        return ""


def unmount_under(work: Path) -> list[str]:
    """Lazily unmount whatever a killed CRIU left mounted under `work` (its cgroup yard), so that the
    migration's directory can be wiped."""
    prefix = str(work) + "/"
    points = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    left = sorted((p for p in points if p.startswith(prefix)), reverse=True)
    for point in left:
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)
    return left
