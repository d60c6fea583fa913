"""The guard of a lazy restore: a copy whose missing pages would read as zeros never keeps running.

CRIU's restore hands each restored task's userfaultfd to the lazy-pages daemon and closes its own copy,
so the daemon holds the only reference. If the daemon dies (its agent was killed, so the proxy it reads
pages from is gone), the kernel releases the uffd: the ranges are unregistered and the next fault on a
page that never arrived maps a zero page (fs/userfaultfd.c, userfaultfd_release). The container then runs
on, silently corrupt.

This guard is the daemon's parent, in its own session, so it outlives the agent. Once the restore is done
(`hold` on stdin, with the command that kills the container), it takes its own reference to every uffd the
daemon holds (pidfd_getfd), so a dying daemon no longer releases them: faults on missing pages block
instead. It then waits for the daemon:
- exit 0: every page arrived; the guard lets go of the uffds and exits 0;
- anything else (a crash, a kill, a lost page source): the guard kills the container *first*, while its
  faults still block, and only then lets go; it exits with 128 + the signal, or the daemon's status.
SIGTERM to the guard (the agent gives up on the lazy phase) kills the daemon, and so the container.

Run as `python -m skyferry.pipeline.memory.lazyguard -- criu lazy-pages ARGS…`, or without arguments to
start ahead of the daemon (Python's start-up, ~25 ms, then lies outside the freeze): the first line on
stdin then names it, `{"run": ["criu", "lazy-pages", ARGS…]}`; EOF before it exits 0.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import threading

SYS_PIDFD_GETFD = 438  # the same number on every architecture since Linux 5.6
UFFD_LINK = "anon_inode:[userfaultfd]"
_libc = ctypes.CDLL(None, use_errno=True)


def grab_uffds(pid: int) -> list[int]:
    """Our own descriptors for every userfaultfd that process `pid` holds."""
    held = []
    pidfd = os.pidfd_open(pid)
    try:
        for entry in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{entry}") != UFFD_LINK:
                    continue
            except OSError:
                continue
            fd = _libc.syscall(SYS_PIDFD_GETFD, pidfd, int(entry), 0)
            if fd < 0:
                raise OSError(ctypes.get_errno(), f"pidfd_getfd of fd {entry} of pid {pid}")
            held.append(fd)
    finally:
        os.close(pidfd)
    return held


def main(argv: list[str]) -> int:
    if not argv:
        line = sys.stdin.readline()
        if not line:  # the agent let go of us before any daemon
            return 0
        argv = json.loads(line)["run"]
    daemon = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    signal.signal(signal.SIGTERM, lambda *_: daemon.kill())
    held: list[int] = []
    kill: list[str] = []
    lock = threading.Lock()

    def commands() -> None:
        # The agent writes one line after the restore; EOF (the agent died) changes nothing.
        for line in sys.stdin:
            error = None
            with lock:
                kill[:] = json.loads(line)["kill"]
                try:
                    if daemon.poll() is None:
                        held.extend(grab_uffds(daemon.pid))
                except OSError as exc:  # still kill on the daemon's death, a moment later than faults see it
                    error = str(exc)
            print(json.dumps({"held": len(held), "error": error}), flush=True)

    threading.Thread(target=commands, daemon=True).start()
    rc = daemon.wait()
    with lock:
        if rc != 0 and kill:
            # The faults on missing pages block while we hold the uffds: kill the copy before letting go.
            subprocess.run(kill, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            print(json.dumps({"killed": kill, "daemon": rc}), file=sys.stderr, flush=True)
        for fd in held:
            os.close(fd)
    return 128 - rc if rc < 0 else rc


if __name__ == "__main__":
    args = sys.argv[1:]
    sys.exit(main(args[1:] if args[:1] == ["--"] else args))
