"""Real servers (PostgreSQL, nginx, memcached) in containers from workload_images, and their clients.

The HTTP and memcached clients run with the host's python3 in another host's network namespace, as the
counter's client does; the PostgreSQL client needs psycopg2, so it runs in a client container from the
PostgreSQL image, on whichever host the caller names. Both speak workload_clients.py's protocol: a
progress count while they work, a stop file, one JSON verdict.
"""

import base64
import json
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from skyferry.netplane import netns
from skyferry.pipeline.controller import containers
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.scenarios import workload_clients, workload_images

PYTHON = "/usr/bin/python3"
PORTS = {
    "postgres": workload_images.PG_PORT,
    "nginx": workload_images.HTTP_PORT,
    "memcached": workload_images.MEMCACHED_PORT,
}


def start(state: Path, host: str, name: str, kind: str, host_netns: str, timeout: float = 60.0) -> dict[str, Any]:
    """Workload `kind` as container `name` on `host`, returned once it accepts TCP connections, as seen
    from `host_netns` (another host: the path its clients take)."""
    image = workload_images.ensure_image(kind)
    info = containers.run(state, host, name, workload_images.COMMANDS[kind], image=image)
    wait_listening(host_netns, info["ip"], PORTS[kind], timeout)
    return info


def wait_listening(host_netns: str, ip: str, port: int, timeout: float) -> None:
    probe = (
        "import socket, sys, time\n"
        f"deadline = time.monotonic() + {timeout}\n"
        "while True:\n"
        "    try:\n"
        f"        socket.create_connection(({ip!r}, {port}), timeout=2).close(); break\n"
        "    except OSError:\n"
        "        if time.monotonic() > deadline: sys.exit(f'nothing listens on {ip}:{port}')\n"
        "        time.sleep(0.2)\n"
    )
    proc = subprocess.run(netns.command(host_netns, [PYTHON, "-c", probe]), capture_output=True, text=True)
    if proc.returncode:
        raise SkyferryError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "probe failed")


@dataclass
class HostClient:
    """A workload client as a process we own in a host's network namespace (HTTP, memcached)."""

    kind: str
    host_netns: str
    ip: str
    workdir: Path
    options: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None

    def path(self, what: str) -> Path:
        return self.workdir / f"{self.kind}-client-{self.ip}.{what}"

    def start(self) -> "HostClient":
        for what in ("out", "stop", "progress", "progress.download"):
            self.path(what).unlink(missing_ok=True)
        argv = [PYTHON, workload_clients.__file__, self.kind, self.ip, str(PORTS[_server(self.kind)]),
                "--out", str(self.path("out")), "--stop-file", str(self.path("stop")),
                "--progress", str(self.path("progress")), *self.options]  # fmt: skip
        self.proc = subprocess.Popen(netns.command(self.host_netns, argv), stdin=subprocess.DEVNULL, close_fds=True)
        return self

    def progress(self) -> int:
        try:
            return int(self.path("progress").read_text() or 0)
        except FileNotFoundError:
            return 0

    def side(self) -> dict[str, Any]:
        """The download's state (HTTP): {"status", "size", "bytes"} so far."""
        try:
            return json.loads(self.path("progress.download").read_text() or "{}")
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 120.0) -> dict[str, Any]:
        self.path("stop").touch()
        if self.proc is not None:
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.result()

    def result(self) -> dict[str, Any]:
        out = self.path("out")
        return json.loads(out.read_text()) if out.exists() else {"ok": False, "errors": ["client wrote no verdict"]}


@dataclass
class ContainerClient:
    """The PostgreSQL client in its own container (the PostgreSQL image has psycopg2), driven through
    `skyferry exec`; its verdict is the last line of its log."""

    state: Path
    host: str
    name: str
    server_ip: str
    info: dict[str, Any] = field(default_factory=dict)

    def start(self) -> "ContainerClient":
        source = Path(workload_clients.__file__).read_text()
        argv = ["/usr/bin/python3", "-c", source, "pg", self.server_ip, str(workload_images.PG_PORT),
                "--out", "/tmp/verdict.json", "--stop-file", "/tmp/stop", "--progress", "/tmp/progress",
                "--print"]  # fmt: skip
        image = workload_images.ensure_image("postgres")
        self.info = containers.run(self.state, self.host, self.name, argv, image=image)
        return self

    def progress(self) -> int:
        done = containers.exec_(self.state, self.name, ["/bin/sh", "-c", "cat /tmp/progress 2>/dev/null || echo 0"])
        return int(_decode(done.stdout).strip() or 0) if done.exit_code == 0 else -1

    def stop(self, timeout: float = 120.0) -> dict[str, Any]:
        containers.exec_(self.state, self.name, ["/usr/bin/touch", "/tmp/stop"])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = containers.logs(self.state, self.name).decode(errors="replace").strip().splitlines()
            if lines and lines[-1].startswith("{"):
                return json.loads(lines[-1])
            time.sleep(0.5)
        return {"ok": False, "errors": ["the client container wrote no verdict"]}


def wait_progress(client: "HostClient | ContainerClient", more: int, timeout: float = 60.0) -> int:
    """Block until `client` has `more` acknowledgements beyond now; raises if it stalls."""
    goal = client.progress() + more
    deadline = time.monotonic() + timeout
    while (now := client.progress()) < goal:
        if now < 0 or time.monotonic() > deadline or (isinstance(client, HostClient) and not client.running()):
            verdict = client.stop() if isinstance(client, HostClient) else {}
            raise SkyferryError(f"the {type(client).__name__} stalled at {now} of {goal}: {verdict}")
        time.sleep(0.1)
    return now


def _server(kind: str) -> str:
    return {"pg": "postgres", "http": "nginx", "memcached": "memcached"}[kind]


def _decode(b64: str) -> str:
    return base64.b64decode(b64).decode(errors="replace")
