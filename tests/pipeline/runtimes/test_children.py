"""What a freeze watchdog may kill: only the process groups we started and still wait on (real processes)."""

import contextlib
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from skyferry.pipeline.runtimes.children import CGROUP, Children, kill_cgroup, kill_groups


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["sleep", "600"], start_new_session=True)
    yield proc
    proc.kill()
    proc.wait()


def test_a_recorded_child_is_listed_while_waited_on_and_killed_with_its_group(
    tmp_path: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    children = Children(tmp_path)
    with children.waiting_on("web", sleeper.pid):
        assert children.started("web") == [sleeper.pid]
        assert children.started("other") == []
        kill_groups(children.started("web"))
        assert sleeper.wait(timeout=30) == -9
    assert children.started("web") == [], "the record goes with the wait"


def test_a_recycled_pid_is_never_taken_for_ours(tmp_path: Path, sleeper: subprocess.Popen[bytes]) -> None:
    """An entry left by an agent that died names a PID; if another process now has it (another start time),
    it is dropped, not killed."""
    entry = tmp_path / "web" / str(sleeper.pid)
    entry.parent.mkdir()
    entry.write_text("1")  # a start time that is not this process's
    assert Children(tmp_path).started("web") == []
    assert not entry.exists()
    assert sleeper.poll() is None, "the stranger still runs"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for cgroups")
def test_kill_cgroup_ends_a_frozen_task_runc_no_longer_knows(sleeper: subprocess.Popen[bytes]) -> None:
    """What a killed restore leaves: a task in the container's frozen cgroup that no runc state names."""
    rel = f"skyferry-test-{uuid.uuid4().hex[:8]}"
    v1 = not (CGROUP / "cgroup.controllers").exists()
    dirs = [CGROUP / "pids" / rel, CGROUP / "freezer" / rel] if v1 else [CGROUP / rel]
    try:
        for d in dirs:
            d.mkdir()
            (d / "cgroup.procs").write_text(str(sleeper.pid))
        (dirs[1] / "freezer.state" if v1 else dirs[0] / "cgroup.freeze").write_text("FROZEN" if v1 else "1")
        os.kill(sleeper.pid, 9)  # positive control: a frozen task holds a SIGKILL pending
        with pytest.raises(subprocess.TimeoutExpired):
            sleeper.wait(timeout=1)
        assert kill_cgroup(rel) == [sleeper.pid]
        assert sleeper.wait(timeout=10) == -9
    finally:
        for d in dirs:
            with contextlib.suppress(OSError):
                (d / "cgroup.procs").read_text() or d.rmdir()
