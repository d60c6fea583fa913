"""Memory integrity: the counter keeps a crc32 of every page it holds and proves, after a migration in each
mode, that every page arrived intact.

The unit tests run the real counter server on loopback and show that the check finds a page changed behind
the process's back (written through /proc/PID/mem, as a faulty migration would), and that `CHECK` leaves the
`SEQ COUNT` contract alone. The integration tests migrate a counter holding 32 MiB across real hosts.
"""

import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from kit.mesh import local_mesh
from skyferry.netplane.mesh import Mesh
from skyferry.pipeline.controller import containers, migration
from skyferry.pipeline.scenarios import demo as scenario
from skyferry.pipeline.scenarios import workload_counter

NEEDS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
MIB = 32
PAGES_PER_MIB = 256


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """The counter's real `serve` as a process we own, holding `request.param` MiB without dirtying it
    (a dirtying write would refresh a page's crc and so hide the corruption the test makes)."""
    port = free_port()
    argv = [sys.executable, workload_counter.__file__, "serve", str(port), "--memory-mib", str(request.param)]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    try:
        yield proc, port
    finally:
        proc.kill()
        proc.wait()


def check(port: int) -> tuple[int, dict]:
    argv = [sys.executable, workload_counter.__file__, "check", "127.0.0.1", str(port)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    return done.returncode, json.loads(done.stdout)


def anonymous_mappings(pid: int, size: int) -> list[int]:
    """Start addresses of private anonymous read-write mappings of `size` bytes in `pid`."""
    found = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split()
        start, end = (int(a, 16) for a in fields[0].split("-"))
        if end - start == size and fields[1] == "rw-p" and len(fields) == 5:
            found.append(start)
    return found


@pytest.mark.parametrize("server", [16], indirect=True)
def test_check_counts_pages_and_finds_a_corrupted_one(server: tuple[subprocess.Popen[bytes], int]) -> None:
    proc, port = server
    code, report = check(port)
    assert (code, report) == (0, {"pages": 16 * PAGES_PER_MIB, "bad": 0, "first_bad": []})

    # The 16 MiB buffer is one mmap of 16 MiB plus malloc's header page; thread stacks are 8 MiB.
    [buffer] = anonymous_mappings(proc.pid, (16 << 20) + 4096)
    with open(f"/proc/{proc.pid}/mem", "r+b", buffering=0) as mem:
        for where in (buffer + (4 << 20) + 100, buffer + (12 << 20) + 100):
            mem.seek(where)
            old = mem.read(1)
            mem.seek(where)
            mem.write(bytes([old[0] ^ 0xFF]))
    code, report = check(port)
    assert code == 1
    assert report["pages"] == 16 * PAGES_PER_MIB and report["bad"] == 2
    assert len(report["first_bad"]) == 2 and report["first_bad"][1] - report["first_bad"][0] == 2048


@pytest.mark.parametrize("server", [2], indirect=True)
def test_check_is_not_a_request(server: tuple[subprocess.Popen[bytes], int]) -> None:
    _, port = server
    assert check(port)[0] == 0  # also waits until the server listens and holds its memory
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn, conn.makefile("rwb") as f:
        replies = []
        for line in (b"1", b"CHECK", b"2", b"CHECK", b"3"):
            f.write(line + b"\n")
            f.flush()
            replies.append(f.readline())
    assert replies[0::2] == [b"1 1\n", b"2 2\n", b"3 3\n"]
    for reply in replies[1::2]:
        assert json.loads(reply) == {"pages": 2 * PAGES_PER_MIB, "bad": 0, "first_bad": []}


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Mesh]]:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    with local_mesh(tmp_path_factory) as made:
        yield made


@pytest.mark.integration
@NEEDS_ROOT
@pytest.mark.parametrize("mode", sorted(migration.MODES))
def test_every_page_survives_migration(mesh: tuple[Path, Mesh], tmp_path: Path, mode: str) -> None:
    state, m = mesh
    name = "mem-" + re.sub(r"[^a-z0-9]+", "-", mode)
    client_netns = m.hosts["local-3"].netns or ""
    info = scenario.start_counter(state, "local-1", name, tmp_path, memory_mib=MIB, dirty_mb_s=4)
    client = scenario.CounterClient(client_netns, info["ip"], tmp_path)
    try:
        client.start()
        before = scenario.check_memory(client_netns, info["ip"])
        assert before == {"pages": MIB * PAGES_PER_MIB, "bad": 0, "first_bad": []}

        report = migration.migrate(state, name, "local-2", mode=mode)
        assert (report["state"], report["mode_requested"]) == ("done", mode)
        assert report["mode"] in (("precopy", "hybrid") if mode == "auto" else (mode,))  # auto: its finish
        client.wait_for(client.progress() + 5)
        after = scenario.check_memory(client_netns, info["ip"])
        assert after == {"pages": MIB * PAGES_PER_MIB, "bad": 0, "first_bad": []}, f"{mode}: pages changed"

        assert {r["name"]: r for r in containers.live(state)}[name]["host"] == "local-2"
        seen = client.stop()
        assert seen["survived"], seen["errors"]
    finally:
        client.stop()
        containers.remove(state, name)
