"""Real servers (PostgreSQL, nginx, memcached, a JVM, Node.js) and a shell pipeline in containers from
workload_images, their clients, and the one shape every workload is moved in: `there_and_back`.

The HTTP, memcached and echo clients run with the host's python3 in another host's network namespace, as
the counter's client does; the PostgreSQL client needs psycopg2, so it runs in a client container from the
PostgreSQL image, on whichever host the caller names. Both speak workload_clients.py's protocol: a
progress count while they work, a stop file, one JSON verdict. The pipeline has no network client: its
own log is the record, read through `skyferry exec` (`PipelineCheck`).
"""

import base64
import json
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from skyferry.netplane import netns
from skyferry.pipeline.controller import containers, migration
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.scenarios import workload_clients, workload_images

PYTHON = "/usr/bin/python3"
PORTS = {
    "postgres": workload_images.PG_PORT,
    "nginx": workload_images.HTTP_PORT,
    "memcached": workload_images.MEMCACHED_PORT,
    "jvm": workload_images.ECHO_PORT,
    "node": workload_images.ECHO_PORT,
}
CLIENT_PORTS = {"pg": workload_images.PG_PORT, "http": workload_images.HTTP_PORT,
                "memcached": workload_images.MEMCACHED_PORT, "echo": workload_images.ECHO_PORT}  # fmt: skip
THERE, BACK = ("local-2", "precopy"), ("local-1", "hybrid")  # the default moves: pre-copy there, hybrid back


def start(state: Path, host: str, name: str, kind: str, host_netns: str, timeout: float = 60.0) -> dict[str, Any]:
    """Workload `kind` as container `name` on `host`, returned once it accepts TCP connections, as seen
    from `host_netns` (another host: the path its clients take), or (the pipeline) once it logs."""
    image = workload_images.ensure_image(kind)
    info = containers.run(state, host, name, workload_images.COMMANDS[kind], image=image)
    if kind == "pipeline":
        wait_progress(PipelineCheck(state, name), 1, timeout)
    else:
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
        argv = [PYTHON, workload_clients.__file__, self.kind, self.ip, str(CLIENT_PORTS[self.kind]),
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


class PipelineCheck:
    """The shell pipeline's "client": its log, read through `skyferry exec`. Progress is the log's line
    count; the verdict reads the whole log (each sender's numbers 1..n, in order, none torn, missing or
    twice) and checks that the holder's flock is still held (`flock -n` on it must fail)."""

    def __init__(self, state: Path, name: str) -> None:
        self.state, self.name = state, name

    def start(self) -> "PipelineCheck":
        return self

    def progress(self) -> int:
        done = containers.exec_(self.state, self.name, ["/bin/sh", "-c", f"wc -l < {LOG} 2>/dev/null || echo 0"])
        return int(_decode(done.stdout).strip() or 0) if done.exit_code == 0 else -1

    def stop(self, timeout: float = 120.0) -> dict[str, Any]:
        log = containers.exec_(self.state, self.name, ["/bin/cat", LOG])
        held = containers.exec_(self.state, self.name, ["/usr/bin/flock", "-n", HELD, "/bin/true"])
        verdict = pipeline_verdict(_decode(log.stdout) if log.exit_code == 0 else "")
        if held.exit_code != 1:
            verdict["errors"].append(f"the holder's lock on {HELD} is not held (flock -n exited {held.exit_code})")
            verdict["ok"] = False
        return verdict


LOG, HELD = f"{workload_images.PIPELINE_DIR}/log", f"{workload_images.PIPELINE_DIR}/held"
LINE = re.compile(r"([ABT]) (\d+)")


def pipeline_verdict(log: str) -> dict[str, Any]:
    """Each sender's (A, B through the FIFO; T directly) numbers must run 1, 2, 3… in the log's order."""
    last: dict[str, int] = {}
    errors: list[str] = []
    for i, line in enumerate(log.splitlines(), 1):
        match = LINE.fullmatch(line)
        if match is None:
            errors.append(f"line {i}: torn or foreign {line!r:.60}")
            continue
        who, n = match[1], int(match[2])
        if n != last.get(who, 0) + 1:
            errors.append(f"line {i}: {who} {n} after {who} {last.get(who, 0)}")
        last[who] = n
    if sorted(last) != ["A", "B", "T"]:
        errors.append(f"senders seen: {sorted(last)}")
    return {"ok": not errors, "errors": errors[:20], "lines": sum(last.values()), "last": last}


class Client(Protocol):
    def start(self) -> Any: ...
    def progress(self) -> int: ...
    def stop(self, timeout: float = 120.0) -> dict[str, Any]: ...


def there_and_back(
    state: Path, name: str, client: Client, moves: tuple[tuple[str, str], ...] = (THERE, BACK), work: int = 20
) -> list[dict[str, Any]]:
    """Migrate `name` through `moves` ((host, mode) each) while `client` keeps being acknowledged before,
    between and after: `work` more acknowledgements each time, on the same connections. The reports."""
    reports = []
    wait_progress(client, work)
    for host, mode in moves:
        report = migration.migrate(state, name, host, mode=mode)
        if report["state"] != "done":
            raise SkyferryError(f"moving {name} to {host} ({mode}) ended {report['state']}")
        reports.append(report)
        wait_progress(client, work)
    return reports


def wait_progress(client: Client, more: int, timeout: float = 60.0) -> int:
    """Block until `client` has `more` acknowledgements beyond now; raises if it stalls."""
    goal = client.progress() + more
    deadline = time.monotonic() + timeout
    while (now := client.progress()) < goal:
        if now < 0 or time.monotonic() > deadline or (isinstance(client, HostClient) and not client.running()):
            verdict = client.stop() if isinstance(client, HostClient | PipelineCheck) else {}
            raise SkyferryError(f"the {type(client).__name__} stalled at {now} of {goal}: {verdict}")
        time.sleep(0.1)
    return now


def _decode(b64: str) -> str:
    return base64.b64decode(b64).decode(errors="replace")
