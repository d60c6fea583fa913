"""A CRIU service worker (`criu swrk`) started before the request it will serve.

`runc checkpoint` spends 15-20 ms of a tiny container's freeze before and around CRIU's own dump: its Go
start, a first `criu swrk` only to ask CRIU's version, then the exec of the one that dumps (CRIU links
20 libraries). A worker started ahead, outside the freeze, waits on its socket; the request inside the
freeze goes straight to it. One request per worker: CRIU's service ends after a dump.

The wire is CRIU's RPC (pycriu's `rpc_pb2`), the one runc and pycriu speak: a `criu_req` on a
SOCK_SEQPACKET pair, answered by a `criu_resp`.
"""

from __future__ import annotations

import socket
import subprocess

from pycriu import rpc_pb2 as rpc

CRIU = "criu"
MAX_MESSAGE = 10 * 4096  # runc's buffer for one answer; a dump's answer is a few bytes


class Worker:
    """One `criu swrk` waiting for a request, in a session of its own (so a freeze watchdog can kill
    exactly it: `Children.waiting_on`). Closing it unused ends it: CRIU's service exits on EOF."""

    def __init__(self, criu: str = CRIU) -> None:
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with theirs:
            self.proc = subprocess.Popen(
                [criu, "swrk", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,  # CRIU logs to the request's log file
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def call(self, req: rpc.criu_req) -> rpc.criu_resp:
        """Send `req` and return CRIU's answer (requests with `notify_scripts` are not supported: their
        notifications would need answers). Raises OSError if the worker is gone or hangs up."""
        self.sock.sendall(req.SerializeToString())
        data = self.sock.recv(MAX_MESSAGE)
        if not data:
            raise ConnectionResetError(f"criu swrk (pid {self.pid}) exited without an answer")
        resp = rpc.criu_resp()
        resp.ParseFromString(data)
        return resp

    def close(self) -> None:
        """Hang up and reap (idempotent); a worker that does not exit at once is killed."""
        self.sock.close()
        try:
            self.proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
