"""The bench's hosts and the measurements around its runs: one local mesh for a whole `skyferry bench`,
iperf3 over its overlay, and waiting until a workload holds its memory."""

import contextlib
import json
import mmap
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from skyferry.netplane import netns
from skyferry.netplane.mesh import Mesh
from skyferry.pipeline.controller import containers
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.proctree import tree_rss
from skyferry.pipeline.scenarios import benchreport
from skyferry.pipeline.scenarios import demo as scenario

IPERF_PORT = 5201
Progress = Callable[[str], None]


def say_nothing(_: str) -> None:
    pass


def warm_memory(gib: float, progress: Progress = say_nothing) -> float | None:
    """Touch `gib` GiB of memory once, then free it; the seconds per GiB it took (None for 0). A VM whose
    memory the hypervisor backs on first touch (this one: 25 s per GiB the first time, 1 s after) would
    otherwise charge that to whichever freeze first uses those pages: a 1 GiB stop-copy restore took 13 s
    instead of 0.9. Capped at what the machine has available less 2 GiB."""
    available = int(benchreport.proc_field("/proc/meminfo", "MemAvailable").split()[0]) * 1024
    size = min(int(gib * (1 << 30)), available - (2 << 30)) // mmap.PAGESIZE * mmap.PAGESIZE
    if size <= 0:
        return None
    progress(f"touching {size / (1 << 30):.1f} GiB of memory once (a VM may back it only on first touch)")
    t0 = time.monotonic()
    with mmap.mmap(-1, size) as mem:
        np.frombuffer(mem, np.uint8)[:: mmap.PAGESIZE] = 1
    return round((time.monotonic() - t0) / (size / (1 << 30)), 2)


@contextlib.contextmanager
def hosts(wan: str | None, name: str, progress: Progress = say_nothing) -> Iterator[tuple[Path, Mesh]]:
    """Three local hosts with agents in a state folder of their own (so no other mesh is touched), with
    SKYFERRY_STATE pointing at it meanwhile (agents and anything they start use it); `state/work` is for
    the parts' files. Always torn down, the folder with it."""
    old_env = os.environ.get("SKYFERRY_STATE")
    state = Path(tempfile.mkdtemp(prefix="skyferry-bench-"))
    state.chmod(0o700)
    os.environ["SKYFERRY_STATE"] = str(state)
    (state / "work").mkdir()
    try:
        progress(f"bringing up 3 local hosts, WAN {wan or 'none'}")
        yield state, scenario.mesh_up(state, 3, wan, name=name)
    finally:
        progress("tearing down the mesh")
        try:
            scenario.mesh_down(state)
        finally:
            shutil.rmtree(state, ignore_errors=True)
            if old_env is None:
                os.environ.pop("SKYFERRY_STATE", None)
            else:
                os.environ["SKYFERRY_STATE"] = old_env


OUTLIER_X, OUTLIER_MS = 2.0, 500.0  # a freeze past both this many times and this much over its prediction


def outliers(result: dict[str, Any]) -> list[str]:
    """The migrations of a bench result worth their logs: failed ones, and freezes far past their prediction
    (a hybrid warm-up froze 7 s against 402 ms predicted, and its CRIU logs went with the bench's state)."""
    found = []
    for r in [*result.get("warmups", []), *result.get("runs", [])]:
        if (mig := (r.get("report") or {}).get("id")) and (not r.get("ok") or _far(r)):
            found.append(mig)
    for run in (result.get("evacuate") or {}).get("runs", []):  # each container's move, by its migration
        for c in run.get("containers", []):
            if c.get("migration") and (c.get("state") != "done" or _far(c)):
                found.append(c["migration"])
    return found


def _far(r: dict[str, Any]) -> bool:
    freeze, predicted = r.get("freeze_ms"), r.get("predicted_freeze_ms")
    return bool(freeze and predicted and freeze > max(OUTLIER_X * predicted, predicted + OUTLIER_MS))


def keep_logs(state: Path, migrations: list[str], dest: Path) -> dict[str, str]:
    """Copy each migration's CRIU logs (every host keeps them in <state_root>/logs/<mig>/: Host.wipe) to
    dest/<mig>/<host>/ before the bench's state goes; what was kept, by migration."""
    kept = {}
    for mig in migrations:
        for logs in sorted((state / "hosts").glob(f"*/logs/{mig}")):
            shutil.copytree(logs, dest / mig / logs.parent.parent.name, dirs_exist_ok=True)
            kept[mig] = str(dest / mig)
    return kept


def iperf3(
    mesh: Mesh, src: str, dst: str, seconds: float, attempts: int = 3, nbytes: int | None = None
) -> dict[str, Any]:
    """TCP throughput from host `src` to host `dst` over the overlay, as the agents' streams go: the server
    in dst's netns on its overlay address, the client in src's netns, an 8 MiB window; for `seconds`, or
    until it moved `nbytes` (then "seconds" is how long that took, its ramp-up included). A test that ends
    without a result (the server not listening yet, a control connection lost) is tried again."""
    server_ns, client_ns = mesh.host(dst).netns, mesh.host(src).netns
    ip = mesh.host(dst).overlay_ip
    if server_ns is None or client_ns is None:
        raise SkyferryError("iperf3 needs local hosts (network namespaces)")
    amount = ["-n", str(nbytes)] if nbytes else ["-t", str(max(1, round(seconds)))]
    budget = max(seconds, (nbytes or 0) / 10e6) + 30  # a byte count: as long as 80 Mbit/s would need
    argv = ["iperf3", "-c", ip, "-p", str(IPERF_PORT), "-w", "8M", *amount, "-J"]
    errors: list[str] = []
    for _ in range(attempts):
        server = subprocess.Popen(
            netns.command(server_ns, ["iperf3", "-s", "-1", "-B", ip, "-p", str(IPERF_PORT)]),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            for _ in range(50):  # the server needs a moment to listen
                proc = subprocess.run(netns.command(client_ns, argv), capture_output=True, text=True,
                                      timeout=budget)  # fmt: skip
                if "Connection refused" not in proc.stdout + proc.stderr:
                    break
                time.sleep(0.1)
        finally:
            if server.poll() is None:
                server.kill()
            server.wait()
        data: dict[str, Any] = {}
        with contextlib.suppress(ValueError):
            data = json.loads(proc.stdout)
        received = (data.get("end") or {}).get("sum_received")
        if not received:
            lines = proc.stderr.strip().splitlines()
            errors.append(data.get("error") or (lines[-1] if lines else f"exit status {proc.returncode}"))
            continue
        bps = received["bits_per_second"]
        return {
            "mbit_s": round(bps / 1e6, 1),
            # iperf3 ends a byte count when its socket took the last byte, a buffer short of the receiver
            # (which counted 65.6 of 67.1 MB here): the bytes at the rate it received them, not its clock.
            "seconds": round(nbytes * 8 / bps if nbytes else received["seconds"], 2),
            "retransmits": data["end"].get("sum_sent", {}).get("retransmits"),
            "window": "8M",
            **({"bytes": nbytes, "received": {k: received[k] for k in ("bytes", "seconds")}} if nbytes else {}),
            "failed_attempts": errors,
        }
    raise SkyferryError(f"iperf3 {src} -> {dst} gave no result: {'; '.join(errors)}")


def pid(state: Path, name: str) -> int:
    row = {r["name"]: r for r in containers.live(state)}.get(name) or {}
    if not row.get("pid"):
        raise SkyferryError(f"bench container {name!r} is {row.get('state', 'gone')}")
    return int(row["pid"])


def wait_touched(state: Path, name: str, size: int, timeout: float) -> None:
    """Until the workload holds its memory: RSS at least `size` and steady for a second (building the
    buffer briefly takes twice that)."""
    deadline = time.monotonic() + timeout
    last = -1
    while time.monotonic() < deadline:
        rss = tree_rss(pid(state, name))
        if rss >= size and abs(rss - last) < size * 0.02:
            return
        last = rss
        time.sleep(1.0)
    raise SkyferryError(f"the bench workload did not reach {size >> 20} MiB resident in {timeout:.0f} s")
