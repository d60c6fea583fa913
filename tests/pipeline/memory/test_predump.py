"""Soft-dirty pre-copy, the parts that run on a kernel without soft-dirty tracking (this one): which method
a host picks, CRIU's dump statistics as pycriu reads them from a real dump, and the chain of rounds both
sides keep. The pre-dumps themselves run between VM hosts: tests/providers/test_vm_mesh.py.

The chain tests stand a small writer in for `runc checkpoint --pre-dump` (which this kernel refuses): it
lays out what CRIU writes (inventory, pagemap, pages; stats-dump, made with pycriu, and the log in the work
directory), so the streaming and
the parent links are tested, not CRIU.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import pycriu.images
import pytest
from skyferry.pipeline.criu import dumpstats
from skyferry.pipeline.criu import version as criu_version
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.hostapi.framing import StreamError
from skyferry.pipeline.memory.policy import ConvergencePolicy
from skyferry.pipeline.memory.predump import PredumpSource, PredumpTarget
from skyferry.pipeline.runtimes.docker import Docker
from skyferry.pipeline.runtimes.podman import Podman
from skyferry.pipeline.runtimes.runc import Runc

CRIU = "/usr/local/sbin/criu"
NEEDS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


# --- which method ----------------------------------------------------------------------------------


def test_method_needs_soft_dirty_and_an_engine_that_pre_dumps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(criu_version.PRECOPY_ENV, raising=False)
    method = criu_version.precopy_method
    assert method(True, Runc.pre_dumps) == "soft-dirty"
    assert method(False, Runc.pre_dumps) == "content"
    assert method(True, Podman.pre_dumps) == method(True, Docker.pre_dumps) == "content"
    monkeypatch.setenv(criu_version.PRECOPY_ENV, "content")  # the override, to compare both on one host
    assert method(True, Runc.pre_dumps) == "content"


def _kernel_has_soft_dirty() -> bool:
    config = Path(f"/boot/config-{os.uname().release}")
    text = config.read_text() if config.exists() else subprocess.run(
        ["sh", "-c", "zcat /proc/config.gz"], capture_output=True, text=True
    ).stdout  # fmt: skip
    return re.search(r"^CONFIG_MEM_SOFT_DIRTY=y$", text, re.M) is not None


@NEEDS_ROOT
def test_the_probe_tells_the_truth_about_this_kernel() -> None:
    """`criu check --feature mem_dirty_track`, as the agent's facts report it, matches the kernel config
    (off on this 6.18 host, on in the VMs' 6.1)."""
    assert criu_version.soft_dirty() == _kernel_has_soft_dirty()


# --- CRIU's statistics, read by pycriu ---------------------------------------------------------------


def test_stats_parse_adds_shared_memory_and_tolerates_missing_counters() -> None:
    entry = {"pages_scanned": 100, "pages_written": 7, "pages_skipped_parent": 93, "shpages_scanned": 10,
             "shpages_written": 1, "frozen_time": 2500, "memdump_time": 900}  # fmt: skip
    stats = dumpstats.parse(entry)
    assert (stats.pages_scanned, stats.pages_written, stats.pages_skipped_parent) == (110, 8, 93)
    assert (stats.frozen_us, stats.memdump_us, stats.memwrite_us) == (2500, 900, 0)


@NEEDS_ROOT
@pytest.mark.integration  # real CRIU: not in a chroot (docs/host-setup.md)
def test_stats_of_a_real_criu_dump(tmp_path: Path) -> None:
    """A plain `criu dump` works on this kernel: its stats-dump, read through pycriu, counts the pages it
    wrote, and a 16 MiB buffer of written pages shows up in them."""
    code = "import time; b = bytearray(16 << 20); b[::4096] = b'x' * (16 << 8); print(1, flush=True); time.sleep(600)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"1\n"
        images = tmp_path / "images"
        images.mkdir()
        dump = [CRIU, "dump", "-t", str(proc.pid), "-D", str(images), "--leave-running", "-o", "dump.log"]
        done = subprocess.run(dump, capture_output=True, text=True)
        assert done.returncode == 0, (images / "dump.log").read_text()[-2000:]
        stats = dumpstats.read(images)
    finally:
        proc.kill()
        proc.wait()
    assert stats.pages_written >= 16 << 8
    assert stats.pages_scanned >= stats.pages_written and stats.pages_skipped_parent == 0
    assert stats.frozen_us > 0


def test_no_stats_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SkyferryError, match="no CRIU dump statistics"):
        dumpstats.read(tmp_path)


# --- the chain of rounds -----------------------------------------------------------------------------


class FakeCriu:
    """Writes what a CRIU pre-dump writes for one task: `written` pages in the pages file, the rest of
    `total` counted as in the parent, and the parent link CRIU would follow."""

    def __init__(self, total: int, written: list[int]) -> None:
        self.total, self.written = total, list(written)
        self.calls: list[tuple[str, str | None]] = []

    def __call__(self, images: Path, parent: str | None) -> Path:
        self.calls.append((images.name, parent))
        if parent is not None:
            assert (images / parent / "pagemap-1.img").exists(), "CRIU needs the parent's pagemap"
        written = self.written.pop(0)
        (images / "inventory.img").write_bytes(b"inventory of " + images.name.encode())
        (images / "pagemap-1.img").write_bytes(b"pagemap " + images.name.encode())
        (images / "pages-1.img").write_bytes(os.urandom(written * 4096))  # zstd cannot shrink it
        work = images.parent / f"work-{images.name}"
        work.mkdir()
        (work / "dump.log").write_text("logs stay on the source\n")
        entry = {"pages_scanned": self.total, "pages_written": written,
                 "pages_skipped_parent": self.total - written, "frozen_time": 1500, "freezing_time": 100,
                 "memdump_time": 800, "memwrite_time": 3000, "pages_lazy": 0}  # fmt: skip
        with (work / "stats-dump").open("wb") as f:
            pycriu.images.dump({"magic": "STATS", "entries": [{"dump": entry}]}, f)
        return work


def _send(transfer: Iterable[bytes], target: PredumpTarget) -> None:
    target.apply(iter(list(transfer)))


def test_rounds_become_a_parent_chain_on_the_target(tmp_path: Path) -> None:
    criu = FakeCriu(total=1000, written=[1000, 300, 40, 10])
    source = PredumpSource(tmp_path / "src" / "rounds", criu)
    target = PredumpTarget(tmp_path / "dst" / "rounds")
    policy = ConvergencePolicy(max_delta_bytes=64 * 4096)
    while True:
        _send(source.round(), target)
        decision = policy.decide(source.history)
        if decision.stop:
            break
    assert (decision.reason, len(source.history)) == ("converged", 3)
    assert criu.calls == [("1", None), ("2", "../1"), ("3", "../2")]
    first, last = source.history[0], source.history[-1]
    assert (first.pages_changed, first.pages_parent, first.bytes_raw) == (1000, 0, 1000 * 4096)
    assert (last.pages_changed, last.pages_parent, last.frozen_ms) == (40, 960, 1.5)
    assert last.bytes_out < 64 * 4096 < first.bytes_out  # the policy saw the stream CRIU's pages made

    # Source: the pages went to the target and only the metadata CRIU reads of a parent stays.
    for k in ("1", "2", "3"):
        src = tmp_path / "src" / "rounds" / k
        assert (src / "pages-1.img").stat().st_size == 0
        assert (src / "pagemap-1.img").exists() and (src / "inventory.img").exists()
    # Target: every round whole, each pointing at the one before, no logs.
    dst = tmp_path / "dst" / "rounds"
    assert not (dst / "1" / "parent").exists()
    for k in ("2", "3"):
        assert os.readlink(dst / k / "parent") == f"../{int(k) - 1}"
    assert (dst / "2" / "pages-1.img").stat().st_size == 300 * 4096
    assert not list(dst.rglob("*.log")) and not list(dst.rglob("stats-dump"))

    # The final dump, made with the last round as parent, lands in the image dir that restore reads.
    images = tmp_path / "src" / "images"
    images.mkdir()
    parent = source.parent_for(images)
    assert parent == "../rounds/3"
    final = source.final(images, criu(images, parent))
    target_images = tmp_path / "dst" / "images"
    stats = target.build_image(iter(list(final)), target_images)
    assert final.stats.kind == "final" and final.stats.pages_changed == 10
    assert stats.bytes_out == final.stats.bytes_out
    link = os.readlink(target_images / "parent")
    assert not os.path.isabs(link)  # resolved through the image dir's fd, inside the container's root
    assert (target_images / link).resolve() == (dst / "3").resolve()
    assert (target_images / "pages-1.img").stat().st_size == 10 * 4096


def test_a_damaged_round_leaves_the_chain_as_it_was(tmp_path: Path) -> None:
    criu = FakeCriu(total=100, written=[100, 20, 20])
    source = PredumpSource(tmp_path / "src", criu)
    target = PredumpTarget(tmp_path / "dst")
    _send(source.round(), target)
    frames = list(source.round())
    frames[1] = frames[1][:30] + bytes([frames[1][30] ^ 1]) + frames[1][31:]  # a flipped bit in a FILE frame
    with pytest.raises(StreamError, match="corrupt"):
        target.apply(iter(frames))
    assert sorted(p.name for p in (tmp_path / "dst").iterdir()) == ["1"]
    assert target.seq == 1
    # Out of sequence and foreign streams are refused before anything is written.
    other = PredumpSource(tmp_path / "other", FakeCriu(total=100, written=[100, 5]))
    list(other.round())
    with pytest.raises(StreamError, match="another migration"):
        target.apply(iter(list(other.round())))
    with pytest.raises(StreamError, match="expected final 2"):
        images = tmp_path / "img"
        images.mkdir()
        work = criu(images, "../src/1")
        target.build_image(iter(list(source.final(images, work))), tmp_path / "dst-images")
    assert not (tmp_path / "dst-images").exists()


def test_a_final_needs_rounds(tmp_path: Path) -> None:
    criu = FakeCriu(total=10, written=[10])
    source = PredumpSource(tmp_path / "src", criu)
    images = tmp_path / "images"
    images.mkdir()
    work = criu(images, None)
    with pytest.raises(StreamError, match="no round came before it"):
        PredumpTarget(tmp_path / "dst").build_image(iter(list(source.final(images, work))), tmp_path / "out")


def test_only_runc_pre_dumps() -> None:
    """The capability the agent reports beside the modes: Podman and Docker move by stop-copy only."""
    assert Runc.pre_dumps and "precopy" in Runc.modes
    assert not Podman.pre_dumps and not Docker.pre_dumps
