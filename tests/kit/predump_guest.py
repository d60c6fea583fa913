"""Runs inside a VM whose kernel tracks soft-dirty pages (tests/pipeline/memory/test_predump_vm.py boots it
and shares this worktree into it): a local mesh of two hosts, a counter that holds memory and dirties it,
migrated local-1 -> local-2 by pre-copy while a client keeps talking to it from the controller's netns
(a mesh member, so its address is an overlay one; a third host would cost the VM another agent, minutes
under TCG; and a client in the source host's netns reaches the container over the local veth with its
underlay address, which the target's WireGuard then refuses). Prints one JSON object for the outer test.

    cd tests && ../.venv/bin/python -m kit.predump_guest --memory-mib 64 --dirty-mb-s 2 [--precopy content]
"""

import argparse
import json
import os
import re
import subprocess
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from skyferry.pipeline.controller import containers, migration
from skyferry.pipeline.controller.agentctl import START_TIMEOUT_ENV
from skyferry.pipeline.criu.version import PRECOPY_ENV
from skyferry.pipeline.scenarios import demo as scenario

from kit.mesh import mesh_in

NAME = "mem"


def run(memory_mib: int, dirty_mb_s: float) -> dict[str, Any]:
    """Everything the outer test asserts; a step that fails is recorded under "error" with what came before,
    so the outer test shows how far it got."""
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="sdguest-") as tmp:
        workdir, state = Path(tmp), Path(tmp) / "state"
        state.mkdir()
        with mesh_in(state, count=2, prefix="v") as mesh:
            source = mesh.hosts["local-1"]
            info = scenario.start_counter(state, "local-1", NAME, workdir, memory_mib=memory_mib,
                                          dirty_mb_s=dirty_mb_s)  # fmt: skip
            # Under TCG the freeze alone can pass a minute: the client waits up to 10 for an answer.
            client = scenario.CounterClient(mesh.controller.netns or "", info["ip"], workdir, interval=0.1,
                                            timeout=600)  # fmt: skip
            try:
                client.start(timeout=300)
                out["before"] = scenario.check_memory(client.host_netns, info["ip"])
                t0 = time.monotonic()
                out["report"] = migration.migrate(state, NAME, "local-2", mode="precopy")
                out["migrate_s"] = round(time.monotonic() - t0, 2)
                logs = Path(source.state_root) / "logs" / out["report"]["id"]
                out["criu_logs"] = {p.name: _parent_lines(p) for p in sorted(logs.glob("*.log"))}
                out["hosts"] = sorted(r["host"] for r in containers.live(state) if r["name"] == NAME)
                out["source_runc"] = _runc_list(Path(source.state_root))
                out["after"] = scenario.check_memory(client.host_netns, info["ip"])
                client.wait_for(client.progress() + 5, timeout=300)
            except Exception:
                out["error"] = traceback.format_exc()
            finally:
                out["client"] = client.stop()
                containers.remove(state, NAME)
    return out


def _runc_list(state_root: Path) -> list[str]:
    """The containers the source's own runc still knows (none, once the migration confirmed)."""
    argv = ["runc", "--root", str(state_root / "runc"), "list", "-q"]
    done = subprocess.run(argv, capture_output=True, text=True, check=True)
    return done.stdout.split()


def _parent_lines(log: Path) -> list[str]:
    """The parent images a CRIU (pre-)dump opened: "Opened local page read 2 (parent 1)" per image in
    the chain; none when it had no parent."""
    lines = log.read_text(errors="replace").splitlines()
    return [ln.strip() for ln in lines if re.search(r"Opened local page read \d+ \(parent \d+\)", ln)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--memory-mib", type=int, default=64)
    parser.add_argument("--dirty-mb-s", type=float, default=2.0)
    parser.add_argument("--precopy", choices=("auto", "content"), default="auto")
    args = parser.parse_args()
    os.environ[START_TIMEOUT_ENV] = "900"  # Python under TCG starts an agent in minutes
    if args.precopy == "content":
        os.environ[PRECOPY_ENV] = "content"  # the agents this starts inherit it
    print(json.dumps(run(args.memory_mib, args.dirty_mb_s)))


if __name__ == "__main__":
    main()
