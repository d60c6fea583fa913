"""Draw each migration's plot (report.plot) in a process of its own that runs only on idle CPU, while a
runbook's other migrations go on. Drawn in the controller's own thread, matplotlib held the GIL that the
other migrations' calls (their freezes' included) wait for, and took 6 % of a 2-core host's CPU in an
8-container evacuation, from the agents and WireGuard. At nice 19 it still took 0.35-0.47 of a core
while the link was busy (WireGuard's and the relay's threads sleep between packets, and a niced task
runs in those gaps); SCHED_IDLE yields them at once. Left to the end, 8 plots kept the command busy for
seconds after its last migration."""

import contextlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from skyferry.pipeline.runbooks import report as runreport

WAIT_S = 60.0  # for the plots still queued at the end; the report draws whatever is missing itself


class Plotter:
    def __init__(self) -> None:
        self._proc = subprocess.Popen(
            ["chrt", "--idle", "0", sys.executable, "-m", __name__], stdin=subprocess.PIPE, text=True
        )  # fmt: skip
        self.pid = self._proc.pid

    def draw(self, report: dict[str, Any], path: Path) -> None:
        assert self._proc.stdin is not None
        with contextlib.suppress(OSError):  # the drawer died: the report draws the plot itself
            self._proc.stdin.write(json.dumps({"report": report, "path": str(path)}, default=str) + "\n")
            self._proc.stdin.flush()

    def close(self) -> None:
        """Wait for the queued plots."""
        with contextlib.suppress(OSError):
            self._proc.stdin.close()  # type: ignore[union-attr]
        try:
            self._proc.wait(WAIT_S)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()

    def __enter__(self) -> "Plotter":
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def main() -> None:
    for line in sys.stdin:
        job = json.loads(line)
        with contextlib.suppress(Exception):  # a plot that fails is left to the report, which says so
            runreport.plot(job["report"], Path(job["path"]))


if __name__ == "__main__":
    main()
