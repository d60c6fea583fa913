"""Soft-dirty pre-copy for real, on a kernel that has it: this host's 6.18 has no soft-dirty tracking, the
golden VM image's Debian 6.1 has. One VM boots (providers/qemu.py) with this worktree shared into it over
9p at the same absolute path, read-only, so the guest runs this very code with this venv (Debian 12's
python3.11 on both sides, the same CRIU 4.2.1 behind pycriu). Inside it, tests/kit/predump_guest.py runs a
two-host local mesh on kernel WireGuard and migrates a counter that holds and dirties memory, by
pre-copy, while a client keeps talking to it.

The guest boots with two kernel arguments, both found by this test (docs/precopy.md, "Soft-dirty"):
- `systemd.unified_cgroup_hierarchy=0`: on cgroup v2 runc passes CRIU no cgroup root, so a restore puts
  the tasks back into the cgroup path they were dumped from; two local hosts share one cgroup tree, and
  that path is the source's, frozen: the restore hung there. cgroup v1 (as on this host) maps it.
- `transparent_hugepage=madvise` (Ubuntu's default and this host's; Debian's is `always`): soft-dirty
  bits of a huge page cover 2 MiB, and the counter's scattered 16-byte writes then dirtied every huge
  page of its buffer between rounds, so each round and the final dump carried all of it.
"""

import json
import logging
import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from skyferry.providers import qemu, vmimage

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.timeout(3600),  # image build (if stale) + a TCG boot + two migrations under TCG
]

REPO = Path(__file__).resolve().parents[3]
MOUNT = "wt"  # the 9p mount tag
MIB = 64
PAGES = MIB * 256
# QEMU keeps the last -append: the image's arguments plus the two the module docstring explains.
KERNEL_ARGS = f"{qemu.KERNEL_ARGS} systemd.unified_cgroup_hierarchy=0 transparent_hugepage=madvise"

log = logging.getLogger(__name__)


class Guest:
    def __init__(self, vm: qemu.Vm) -> None:
        self.vm = vm

    def sh(self, script: str, timeout: float = 120) -> tuple[int, str, str]:
        return self.vm.exec(["sh", "-c", script], timeout=timeout)

    def migrate(self, precopy: str) -> dict[str, Any]:
        """One migration inside the guest (tests/kit/predump_guest.py); its JSON result."""
        started = time.monotonic()
        script = (f"cd {REPO}/tests && PYTHONDONTWRITEBYTECODE=1 {REPO}/.venv/bin/python -m kit.predump_guest "
                  f"--memory-mib {MIB} --dirty-mb-s 1 --precopy {precopy}")  # fmt: skip
        rc, out, err = self.sh(script, timeout=2400)
        assert rc == 0, f"guest run failed (rc {rc}):\n{err[-4000:]}"
        result = json.loads(out.strip().splitlines()[-1])
        log.info("%s migration in the guest: %.0f s", precopy, time.monotonic() - started)
        print(json.dumps(result.get("report"), indent=1))
        assert "error" not in result, result["error"]
        return result


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    run = "p" + secrets.token_hex(2)
    netns = f"{run}-vmnet"  # the VM's tap lives here; it needs no outside network
    workdir = tmp_path_factory.mktemp("vm")
    image = vmimage.ensure_image()
    subprocess.run(["ip", "netns", "add", netns], check=True)
    vm: qemu.Vm | None = None
    try:
        share = f"local,path={REPO},mount_tag={MOUNT},security_model=none,readonly=on"
        spec = qemu.VmSpec(prefix=run, name="vm0", image=image, memory_mib=3072, cpus=2, netns=netns,
                           workdir=workdir, nice=10, extra_args=("-virtfs", share, "-append", KERNEL_ARGS))  # fmt: skip
        vm = qemu.boot(spec)
        vm.wait_ready(timeout=1500)
        g = Guest(vm)
        options = "trans=virtio,version=9p2000.L,msize=524288,cache=loose,ro"  # loose: imports under TCG
        mount = f"modprobe 9pnet_virtio && modprobe 9p && mkdir -p {REPO} && mount -t 9p -o {options} {MOUNT} {REPO}"
        rc, _, err = g.sh(mount)
        assert rc == 0, f"cannot mount the worktree in the guest: {err}"
        yield g
    finally:
        if vm is not None:
            vm.stop(keep_console=workdir / f"{run}-console.log")
            assert not vm.alive()
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)


def test_guest_pre_dumps_with_the_same_criu(guest: Guest) -> None:
    """The guest has what the method needs: soft-dirty for CRIU, and pycriu from the CRIU it runs."""
    rc, out, err = guest.sh("/usr/local/sbin/criu check --feature mem_dirty_track")
    assert rc == 0, out + err
    code = "from pycriu.version import __version__ as v; print(v)"
    rc, out, err = guest.sh(f"{REPO}/.venv/bin/python -c '{code}'; /usr/local/sbin/criu --version")
    assert rc == 0, err
    pycriu_version, criu_line = out.split("\n", 1)
    assert f"Version: {pycriu_version}" in criu_line


def _assert_survived(result: dict[str, Any]) -> None:
    clean = {"pages": PAGES, "bad": 0, "first_bad": []}
    assert result["before"] == clean
    assert result["after"] == clean, "the counter's memory changed across the migration"
    assert result["report"]["state"] == "done"
    assert result["hosts"] == ["local-2"]  # exactly once, on the target
    assert result["source_runc"] == []  # and the source's runc no longer knows it
    assert result["client"]["survived"], result["client"]["errors"]


def test_soft_dirty_precopy_in_a_vm(guest: Guest) -> None:
    result = guest.migrate("auto")
    report = result["report"]
    _assert_survived(result)
    assert report["precopy_method"] == "soft-dirty"
    rounds = report["rounds"]
    assert len(rounds) >= 2
    assert rounds[0]["pages_changed"] >= PAGES  # round 1 pre-dumps everything
    assert rounds[-1]["pages_changed"] < rounds[0]["pages_changed"]  # the kernel's bits, not a full copy
    assert all(r["frozen_ms"] > 0 for r in rounds)  # CRIU pre-dumped (it freezes to collect pages)
    # CRIU's own logs: every round after the first and the final dump were made on a parent image.
    logs = result["criu_logs"]
    assert {f"work-round{r['seq']}-dump.log" for r in rounds} <= set(logs)
    assert logs["work-round1-dump.log"] == []  # round 1 has no parent
    for r in rounds[1:]:
        assert len(logs[f"work-round{r['seq']}-dump.log"]) == r["seq"] - 1, f"round {r['seq']}: no parent chain"
    assert len(logs["work-dump.log"]) == len(rounds), "the final dump did not stand on every round"


def test_content_precopy_on_the_same_vm(guest: Guest) -> None:
    """The comparison the docs quote, and the override: $SKYFERRY_PRECOPY=content on the agents."""
    result = guest.migrate("content")
    report = result["report"]
    _assert_survived(result)
    assert report["precopy_method"] == "content"
    assert not any(name.startswith("work-round") for name in result["criu_logs"])
