"""CRIU round trip through pycriu's RPC (swrk): a TCP server with a live loopback connection is dumped,
killed, restored into the same (external) network namespace, and the connection keeps carrying data.

Everything runs in a network namespace made for this test, so CRIU's network lock never touches the
root namespace.
"""

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from skyferry.pipeline.criu.rpc import EXTNET, Criu, external_netns, open_netns
from skyferry.pipeline.errors import SkyferryError

# Not imported from conftest.py: with several conftest.py files that module name is ambiguous.
NEEDS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
pytestmark = [pytest.mark.integration, NEEDS_ROOT]

PORT = 7001
CLONE_NEWNET = 0x40000000

# Replies "<count>:<line>" to every line, so the count shows the restored process kept its memory.
SERVER = f"""
import socket
ls = socket.socket()
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("127.0.0.1", {PORT}))
ls.listen(1)
conn, _ = ls.accept()
count, buf = 0, b""
while data := conn.recv(4096):
    buf += data
    while b"\\n" in buf:
        line, buf = buf.split(b"\\n", 1)
        count += 1
        conn.sendall(b"%d:%s\\n" % (count, line))
"""


@pytest.fixture
def netns(run_id: str) -> Iterator[str]:
    name = f"{run_id}-criu"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield f"/run/netns/{name}"
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


class Children:
    """Processes this test started, and restored trees (restored with `sibling=True`, so they are our
    children too). Killed and reaped at the end, whatever happened. A pid is only signalled while it
    is our unreaped child, so it cannot have been reused by anyone else's process."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[bytes]] = []
        self.restored: list[int] = []

    def cleanup(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for pid in self.restored:
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(pid, os.WNOHANG) == (0, 0):  # still running
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)


@pytest.fixture
def children() -> Iterator[Children]:
    kids = Children()
    try:
        yield kids
    finally:
        kids.cleanup()


def connect_in_netns(netns_path: str, timeout: float = 10.0) -> socket.socket:
    """A TCP client socket created inside the netns (setns in a short-lived thread only)."""
    result: dict[str, socket.socket | BaseException] = {}

    def work() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        with open_netns(netns_path) as fd:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                result["err"] = OSError(ctypes.get_errno(), "setns")
                return
        deadline = time.monotonic() + timeout
        while True:
            try:
                result["sock"] = socket.create_connection(("127.0.0.1", PORT), timeout=timeout)
                return
            except ConnectionRefusedError as exc:  # the server is still starting
                if time.monotonic() > deadline:
                    result["err"] = exc
                    return
                time.sleep(0.05)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    if "err" in result:
        raise result["err"]
    sock = result["sock"]
    assert isinstance(sock, socket.socket)
    return sock


def exchange(sock: socket.socket, line: bytes) -> bytes:
    sock.sendall(line + b"\n")
    reply = b""
    while not reply.endswith(b"\n"):
        chunk = sock.recv(4096)
        assert chunk, "server closed the connection"
        reply += chunk
    return reply.rstrip(b"\n")


def start_server(netns: str, cwd: Path) -> subprocess.Popen[bytes]:
    # nsenter switches only the network namespace (`ip netns exec` would add a mount namespace).
    # Stdio points at /dev/null and the server leads its own session: CRIU dumps a closed tree.
    return subprocess.Popen(
        ["nsenter", f"--net={netns}", sys.executable, "-c", SERVER],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        close_fds=True,
        start_new_session=True,
        cwd=cwd,
    )


def test_tcp_connection_survives_dump_and_restore(netns: str, children: Children, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    server = start_server(netns, tmp_path)
    children.started.append(server)
    with connect_in_netns(netns) as client:
        assert exchange(client, b"before") == b"1:before"

        criu = Criu()
        criu.dump(
            server.pid,
            images,
            tcp_established=True,
            external=[external_netns(netns)],
            network_lock="nftables",
        )
        assert server.wait(timeout=10) == -signal.SIGKILL  # dump killed it
        # While nothing runs, the client's data waits in its send queue; the lock dropped nothing yet.
        client.sendall(b"during\n")

        with open_netns(netns) as netns_fd:
            pid = criu.restore(
                images,
                tcp_established=True,
                inherit_fds={EXTNET: netns_fd},
                network_lock="nftables",
                sibling=True,  # the restored server becomes our child, so `children` can reap it
            )
        children.restored.append(pid)
        assert pid == server.pid

        reply = b""
        while reply.count(b"\n") < 1:
            reply += client.recv(4096)
        assert reply == b"2:during\n"  # sent while the server was gone, answered by the restored one
        assert exchange(client, b"after") == b"3:after"


def test_leave_running_then_final_dump_restores(netns: str, children: Children, tmp_path: Path) -> None:
    """A dump that leaves the tree serving, then the final dump, then a restore with its own work dir."""
    first, final, work = tmp_path / "first", tmp_path / "final", tmp_path / "work"
    for path in (first, final, work):
        path.mkdir()
    server = start_server(netns, tmp_path)
    children.started.append(server)
    criu = Criu()
    opts = {"tcp_established": True, "network_lock": "nftables"}
    ext = [external_netns(netns)]
    with connect_in_netns(netns) as client:
        assert exchange(client, b"a") == b"1:a"
        criu.dump(server.pid, first, leave_running=True, external=ext, **opts)
        assert server.poll() is None
        assert exchange(client, b"b") == b"2:b"  # still serving: the lock was lifted

        criu.dump(server.pid, final, external=ext, **opts)
        server.wait(timeout=10)
        with open_netns(netns) as fd:
            pid = criu.restore(final, work_dir=work, inherit_fds={EXTNET: fd}, sibling=True, **opts)
        children.restored.append(pid)
        assert (work / "restore.log").exists()
        assert exchange(client, b"c") == b"3:c"


def test_pre_dump_needs_soft_dirty(netns: str, children: Children, tmp_path: Path) -> None:
    """Where soft-dirty exists, pre-dump rounds chain into the final dump as parent images; where it
    does not (this machine), pre_dump fails with CRIU's reason instead of CRIU's BUG()."""
    rounds, work = [tmp_path / "pre1", tmp_path / "final"], tmp_path / "work"
    for path in [*rounds, work]:
        path.mkdir()
    server = start_server(netns, tmp_path)
    children.started.append(server)
    criu = Criu()
    with connect_in_netns(netns) as client:
        assert exchange(client, b"a") == b"1:a"
        if not criu.feature_check()["mem_track"]:
            with pytest.raises(SkyferryError, match="Tracking memory is not available"):
                criu.pre_dump(server.pid, rounds[0])
            assert exchange(client, b"b") == b"2:b"  # the failed pre-dump left the server running
            return
        criu.pre_dump(server.pid, rounds[0])
        opts = {"tcp_established": True, "network_lock": "nftables"}
        criu.dump(server.pid, rounds[1], parent_image="../pre1", external=[external_netns(netns)], **opts)
        server.wait(timeout=10)
        with open_netns(netns) as fd:
            pid = criu.restore(rounds[1], work_dir=work, inherit_fds={EXTNET: fd}, sibling=True, **opts)
        children.restored.append(pid)
        assert exchange(client, b"b") == b"2:b"


def test_restore_waits_for_the_old_pid(netns: str, children: Children, tmp_path: Path) -> None:
    """Restoring before the dumped process is reaped meets "Can't fork for <pid>: File exists";
    restore() retries until the pid is free."""
    server = start_server(netns, tmp_path)
    children.started.append(server)
    criu = Criu()
    opts = {"tcp_established": True, "network_lock": "nftables"}
    with connect_in_netns(netns) as client, open_netns(netns) as fd:
        assert exchange(client, b"a") == b"1:a"
        criu.dump(server.pid, tmp_path, external=[external_netns(netns)], **opts)
        # The killed server is a zombie until we reap it, so its pid is taken.
        with pytest.raises(SkyferryError, match="Can't fork for"):
            criu.restore(tmp_path, inherit_fds={EXTNET: fd}, pid_busy_timeout=0, **opts)
        reaper = threading.Timer(0.3, server.wait)
        reaper.start()
        try:
            pid = criu.restore(tmp_path, inherit_fds={EXTNET: fd}, sibling=True, **opts)
        finally:
            reaper.join()
        children.restored.append(pid)
        assert pid == server.pid
        assert exchange(client, b"b") == b"2:b"


def test_dump_failure_names_the_cause(tmp_path: Path) -> None:
    """A failed dump becomes a SkyferryError whose hint is the tail of CRIU's log."""
    with pytest.raises(SkyferryError) as info:
        Criu().dump(2**22 + 1, tmp_path)  # above pid_max's default range: no such process
    assert "criu dump failed" in str(info.value)
    assert info.value.hint and str(tmp_path / "dump.log") in info.value.hint
    assert "Error" in info.value.hint


def test_rpc_answers_match_the_command_line() -> None:
    """version() and feature_check() agree with `criu --version` and `criu check --feature`."""
    criu = Criu()
    cli_version = subprocess.run([criu.binary, "--version"], capture_output=True, text=True).stdout
    assert f"Version: {criu.version()}" in cli_version
    soft_dirty = subprocess.run([criu.binary, "check", "--feature", "mem_dirty_track"], capture_output=True)
    uffd = subprocess.run([criu.binary, "check", "--feature", "uffd-noncoop"], capture_output=True)
    features = criu.feature_check()
    assert features["mem_track"] == (soft_dirty.returncode == 0)
    assert features["lazy_pages"] == (uffd.returncode == 0)
    criu.check()
