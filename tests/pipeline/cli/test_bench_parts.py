"""`skyferry bench`'s command line: which parts a run holds (no hosts)."""

import subprocess
import sys
from pathlib import Path

import pytest
from skyferry.pipeline.cli.bench import PARTS, config
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.scenarios import benchtargets

SKYFERRY = str(Path(sys.executable).with_name("skyferry"))


def test_the_default_run_holds_every_part_of_the_targets_table() -> None:
    cfg = config(False, benchtargets.WAN, [], False, 4)
    assert cfg.workloads == benchtargets.FULL and [w.part for w in cfg.workloads] == PARTS[:4]
    assert cfg.evacuate is not None and cfg.evacuate.counts == (1, 4, 8) and cfg.evacuate.memory_mib == 64
    assert cfg.evacuate.podman and cfg.evacuate.parallel == 4
    assert [cfg.mode_order(w) for w in cfg.workloads] == [
        ["stop-copy", "auto"], ["stop-copy", "auto", "precopy", "hybrid", "postcopy"],
        ["stop-copy", "auto", "precopy", "hybrid", "postcopy"], ["stop-copy", "auto"],
    ]  # fmt: skip


def test_quick_skip_and_evacuate_only() -> None:
    quick = config(True, "", ["incompressible", "podman"], False, 8)
    assert [w.label for w in quick.workloads] == ["tiny service", "256 MiB"] and quick.wan is None
    assert quick.evacuate is not None and (quick.evacuate.counts, quick.evacuate.memory_mib) == ((1, 4), 32)
    assert not quick.evacuate.podman and quick.evacuate.parallel == 8
    only = config(False, benchtargets.WAN, [], True, 4)
    assert only.workloads == () and only.evacuate is not None and only.evacuate.counts == (1, 4, 8)
    podman_alone = config(False, benchtargets.WAN, ["evacuate"], True, 4)
    assert podman_alone.evacuate is not None and podman_alone.evacuate.counts == () and podman_alone.evacuate.podman
    assert config(False, benchtargets.WAN, ["evacuate", "podman"], False, 4).evacuate is None


def test_an_unknown_part_is_refused_before_any_host_comes_up() -> None:
    with pytest.raises(SkyferryError, match="no bench part 1gb"):
        config(False, benchtargets.WAN, ["1gb"], False, 4)
    proc = subprocess.run([SKYFERRY, "bench", "--skip", "1gb"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "no bench part 1gb" in proc.stderr and "--skip tiny | 256mib" in proc.stderr
