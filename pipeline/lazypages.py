"""CRIU's lazy-pages daemon on the target: it fills the restored copy's memory on faults and in the
background, from a page server (here always the proxy of pipeline/lazyproxy.py)."""

import subprocess
import time
from pathlib import Path

from skyferry.pipeline.errors import SkyferryError

START_TIMEOUT_S = 10.0


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
            stop(daemon)
            raise SkyferryError("CRIU's lazy-pages daemon did not start", hint=f"see {work / 'lazy-pages.log'}")
        time.sleep(0.005)
    return daemon


def stop(daemon: subprocess.Popen[bytes]) -> None:
    if daemon.poll() is None:
        daemon.kill()
    daemon.wait()
