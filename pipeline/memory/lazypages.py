"""The target's side of a lazy restore: CRIU's lazy-pages daemon, pointed at the page-server proxy
(pipeline/memory/lazyproxy.py) that serves it from the pre-copy store and the source."""

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.memory.lazyproxy import LazyProxy
from skyferry.pipeline.memory.pages import HashTable
from skyferry.pipeline.memory.store import TargetStore

START_TIMEOUT_S = 10.0


class Pager:
    """A proxy for `store` (clean pages from it, the rest from the source at `page_server`) and a
    lazy-pages daemon for the images in `images`, listening in `work` for `restore --lazy-pages`."""

    def __init__(
        self, store: TargetStore, clean: dict[int, HashTable], images: Path, page_server: str, bind: str, work: Path
    ) -> None:
        self.work = work
        self.proxy = LazyProxy(store, clean, images, page_server, bind)
        self.proxy.start()
        try:
            self.daemon = start_daemon(images, work, self.proxy.address)
        except BaseException:
            self.proxy.close()
            raise

    def alive(self) -> bool:
        return self.daemon.poll() is None

    def finish(self, timeout: float) -> tuple[int | None, dict[str, Any]]:
        """Wait until the daemon has every page (its exit status, None on timeout); then the proxy's stats."""
        t0 = time.monotonic()
        try:
            rc: int | None = self.daemon.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
        waited = round(time.monotonic() - t0, 3)
        return rc, {"lazy_s": waited, **self.stop()}

    def stop(self) -> dict[str, Any]:
        """Kill the daemon if it still runs and close the proxy; returns the proxy's stats."""
        if self.daemon.poll() is None:
            self.daemon.kill()
        self.daemon.wait()
        return self.proxy.close()


def start_daemon(images: Path, work: Path, page_server: str) -> subprocess.Popen[bytes]:
    """Start `criu lazy-pages` for the images in `images`; returns once it listens in `work` for the
    restore (`restore --lazy-pages` with the same work directory). It exits once every page has arrived."""
    work.mkdir(parents=True, exist_ok=True)
    address, port = page_server.rsplit(":", 1)
    socket_path = work / "lazy-pages.socket"
    socket_path.unlink(missing_ok=True)
    argv = ["criu", "lazy-pages", "--page-server", "--address", address, "--port", port,
            "-D", str(images), "-W", str(work), "-o", "lazy-pages.log", "-v4"]  # fmt: skip
    daemon = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + START_TIMEOUT_S
    while not socket_path.exists():
        if daemon.poll() is not None or time.monotonic() > deadline:
            if daemon.poll() is None:
                daemon.kill()
            daemon.wait()
            raise SkyferryError("CRIU's lazy-pages daemon did not start", hint=f"see {work / 'lazy-pages.log'}")
        time.sleep(0.005)
    return daemon


def stop_strays(under: Path) -> list[int]:
    """Kill lazy-pages daemons whose images lie under `under` (a host's image tmpfs): an agent that died
    leaves them behind, since they run in their own session. Run when an agent starts, before it serves
    anything, so none of them is its own; matched by the image directory on their command line."""
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
