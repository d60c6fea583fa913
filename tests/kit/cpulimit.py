"""Watching a container's CPU limit while auto-converge throttles it (pipeline/runtimes/throttle.py): every
value its cgroup's limit files held, sampled where the cgroup is. `Sampler` reads them on this machine (a
namespace host's container); `GuestSampler` runs the same loop inside a VM, whose cgroups this machine
cannot see, and fetches what it saw at the end.
"""

import shlex
import threading
import time
from collections.abc import Sequence
from typing import Any, Protocol

from skyferry.pipeline.runtimes.throttle import CpuFiles

INTERVAL = 0.02  # seconds between reads: every throttle step holds for at least one round's transfer


class Shell(Protocol):
    """What GuestSampler needs of kit.vms.Session: a shell on a VM host."""

    def sh(self, host: str, script: str, timeout: float = 300) -> Any: ...


class Sampler:
    """Reads a cgroup's CPU limit until stopped (or until the cgroup is gone): every value it held."""

    def __init__(self, files: CpuFiles) -> None:
        self.files, self.seen, self._stop = files, [files.originals()], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(INTERVAL):
            now = self.files.originals()
            if "" in now.values():  # the cgroup went with the container
                return
            if now != self.seen[-1]:
                self.seen.append(now)

    def stop(self) -> list[dict[str, str]]:
        self._stop.set()
        self._thread.join()
        return self.seen


# The guest's loop: one line per change of the file, "end" when the stop file appears or the cgroup goes.
GUEST_LOOP = f"""
import os, sys, time
path, stop, prev = sys.argv[1], sys.argv[2], None
while not os.path.exists(stop):
    try:
        with open(path) as f:
            now = f.read().strip()
    except FileNotFoundError:
        break
    if now != prev:
        print(now, flush=True)
        prev = now
    time.sleep({INTERVAL})
print("end", flush=True)
"""


class GuestSampler:
    """The Sampler's loop inside VM host `host`, reading one limit file (cgroup v2: `cpu.max`) there, in
    the background; `stop` ends it and returns every value the file held, in order."""

    def __init__(self, vms: Shell, host: str, path: str, tag: str) -> None:
        self.vms, self.host = vms, host
        self.log, self.flag = f"/run/{tag}-sampler.log", f"/run/{tag}-sampler.stop"
        loop = shlex.quote(GUEST_LOOP)
        started = vms.sh(host, f"rm -f {self.flag}; setsid python3 -c {loop} {shlex.quote(path)} {self.flag} "
                               f"</dev/null >{self.log} 2>&1 & sleep 1; cat {self.log}")  # fmt: skip
        assert started.returncode == 0 and started.stdout.strip(), f"the sampler did not start: {started.stderr}"

    def stop(self, timeout: float = 60) -> list[str]:
        deadline = time.monotonic() + timeout
        while True:
            out = self.vms.sh(self.host, f"touch {self.flag}; cat {self.log}").stdout.splitlines()
            if out[-1:] == ["end"] or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        self.vms.sh(self.host, f"rm -f {self.flag} {self.log}")
        assert out[-1:] == ["end"], f"the sampler on {self.host} did not end: {out[-5:]}"
        return out[:-1]


def throttled(seen: Sequence[Any], original: Any) -> list[Any]:
    """The values other than the container's own limit, in order, each once per stretch: a pre-dump round
    writes the original back while CRIU freezes the container (Throttle.relaxed) and the step after it."""
    out: list[Any] = []
    for value in seen:
        if value != original and (not out or out[-1] != value):
            out.append(value)
    return out


def in_order(seen: Sequence[Any], steps: Sequence[Any]) -> bool:
    """Every value of `seen` is one of `steps`, in their order (a sampler on a busy guest can miss a step
    whose hold it never got scheduled in; it must never see one that was not taken)."""
    rest = iter(steps)
    return all(value in rest for value in seen)
