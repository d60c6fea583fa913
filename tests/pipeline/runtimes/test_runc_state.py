"""`Runc.state` reads runc's state file instead of starting runc (pipeline/runtimes/runc.py): checked
against `runc state` itself, on a real container taken through every status runc reports (created,
running, paused, stopped, gone). runc's own answers are the control: each step must change them."""

import json
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kit import runcbundle
from kit.cgroups import remove_tree
from skyferry.pipeline.runtimes.runc import RUNC, Runc

pytestmark = [pytest.mark.integration, pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]


def _bundle(directory: Path, cgroup: str) -> Path:
    """A bundle whose rootfs sees the host's programs read-only and runs `sleep`."""
    config = runcbundle.sleeper(directory, cgroup)
    config["root"]["readonly"] = True
    runcbundle.save(directory, config)
    return directory


@pytest.fixture
def runc(tmp_path: Path) -> Iterator[tuple[Runc, str, Path]]:
    prefix, name = f"/sf-runcstate-{secrets.token_hex(3)}", "c1"
    rt = Runc(tmp_path / "host", prefix)
    rt.root.mkdir(parents=True)
    bundle = _bundle(tmp_path / "bundle", rt.cgroup(name))
    try:
        yield rt, name, bundle
    finally:
        subprocess.run([RUNC, "--root", str(rt.root), "delete", "--force", name], capture_output=True, check=False)
        remove_tree(prefix)


def _runc_says(rt: Runc, name: str) -> dict[str, object] | None:
    proc = subprocess.run([RUNC, "--root", str(rt.root), "state", name], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return None
    found = json.loads(proc.stdout)
    return {"status": found["status"], "pid": found["pid"]}


def _ours(rt: Runc, name: str) -> dict[str, object] | None:
    found = rt.state(name)
    return None if found is None else {"status": found["status"], "pid": found["pid"]}


def test_the_state_file_says_what_runc_state_says(runc: tuple[Runc, str, Path]) -> None:
    rt, name, bundle = runc
    seen = []

    def same() -> None:
        theirs = _runc_says(rt, name)
        assert _ours(rt, name) == theirs
        seen.append(None if theirs is None else theirs["status"])

    same()  # unknown
    subprocess.run([RUNC, "--root", str(rt.root), "create", "--bundle", str(bundle), name], check=True,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    same()
    subprocess.run([RUNC, "--root", str(rt.root), "start", name], check=True)
    same()
    rt.pause(name)
    same()
    rt.resume(name)
    same()
    pid = rt.state(name)["pid"]  # type: ignore[index]
    os.kill(int(pid), signal.SIGKILL)  # type: ignore[arg-type]
    deadline = time.monotonic() + 30
    while _runc_says(rt, name) != {"status": "stopped", "pid": 0}:  # once reaped (it is not our child)
        assert time.monotonic() < deadline, "runc never saw the container stop"
        time.sleep(0.05)
    same()
    subprocess.run([RUNC, "--root", str(rt.root), "delete", name], check=True)
    same()
    assert seen == [None, "created", "running", "paused", "running", "stopped", None]
