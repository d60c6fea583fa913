"""Watching a container's CPU limit while auto-converge throttles it (pipeline/runtimes/throttle.py): every
value its cgroup's limit files held, read on this machine (a namespace host's container)."""

import threading

from skyferry.pipeline.runtimes.throttle import CpuFiles

INTERVAL = 0.02  # seconds between reads: every throttle step holds for at least one round's transfer


class Sampler:
    """Reads a cgroup's CPU limit until stopped (or until the cgroup is gone): every value it held."""

    def __init__(self, files: CpuFiles) -> None:
        self.files, self.seen, self._stop = files, [files.originals()], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(INTERVAL):
            try:
                now = self.files.originals()
            except OSError:  # ENODEV: the cgroup is being removed with the container
                return
            if "" in now.values():  # the cgroup went with the container
                return
            if now != self.seen[-1]:
                self.seen.append(now)

    def stop(self) -> list[dict[str, str]]:
        self._stop.set()
        self._thread.join()
        return self.seen
