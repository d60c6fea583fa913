"""scripts/bootstrap-host.sh: refuses bad input without touching the machine, and a second run on a
bootstrapped machine only checks (no rebuild of CRIU)."""

import os
import subprocess
from pathlib import Path

import pytest

# Not imported from conftest.py: with several conftest.py files that module name is ambiguous.
NEEDS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

pytestmark = [pytest.mark.integration, NEEDS_ROOT]

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bootstrap-host.sh"
CRIU = Path("/usr/local/sbin/criu")
CRIU_SRC = Path("/var/cache/skyferry/criu-4.2.1")
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]

# /etc/os-release of distributions the bootstrap does not support, as they ship it.
UBUNTU_2204 = """\
PRETTY_NAME="Ubuntu 22.04.4 LTS"
NAME="Ubuntu"
VERSION_ID="22.04"
VERSION="22.04.4 LTS (Jammy Jellyfish)"
VERSION_CODENAME=jammy
ID=ubuntu
ID_LIKE=debian
"""
DEBIAN_11 = """\
PRETTY_NAME="Debian GNU/Linux 11 (bullseye)"
NAME="Debian GNU/Linux"
VERSION_ID="11"
VERSION="11 (bullseye)"
VERSION_CODENAME=bullseye
ID=debian
"""

# What a run could change: the installed binary, the kernel knobs and their config, the apt database.
CONNTRACK = Path("/proc/sys/net/netfilter/nf_conntrack_buckets")
WATCHED = [CRIU, Path("/etc/sysctl.d/60-skyferry.conf"), Path("/etc/modprobe.d/skyferry.conf"),
           Path("/var/lib/dpkg/status")]  # fmt: skip


def machine_state() -> dict[str, object]:
    state: dict[str, object] = {str(p): p.stat().st_mtime_ns if p.exists() else None for p in WATCHED}
    state["fs.pipe-max-size"] = Path("/proc/sys/fs/pipe-max-size").read_text()
    state["nf_conntrack_buckets"] = CONNTRACK.read_text() if CONNTRACK.exists() else None
    return state


def bootstrap(env: dict[str, str], prefix: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*(prefix or []), str(SCRIPT)],
        env={"PATH": os.environ["PATH"], **env},
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_non_root_is_refused_and_nothing_changes(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    before = machine_state()
    proc = bootstrap({"SKYFERRY_CACHE": str(cache)}, NOBODY)
    assert proc.returncode != 0
    assert "run as root" in proc.stderr and "nothing was changed" in proc.stderr
    assert machine_state() == before
    assert not cache.exists()


@pytest.mark.parametrize("os_release", [UBUNTU_2204, DEBIAN_11], ids=["ubuntu-22.04", "debian-11"])
def test_unsupported_os_is_refused_and_nothing_changes(tmp_path: Path, os_release: str) -> None:
    release = tmp_path / "os-release"
    release.write_text(os_release)
    cache = tmp_path / "cache"
    before = machine_state()
    proc = bootstrap({"SKYFERRY_CACHE": str(cache), "SKYFERRY_OS_RELEASE": str(release)})
    assert proc.returncode != 0
    pretty = next(line.split("=", 1)[1].strip('"') for line in os_release.splitlines() if "PRETTY" in line)
    assert f"unsupported OS '{pretty}'" in proc.stderr
    assert "Debian 12, Ubuntu 24.04 or newer" in proc.stderr and "nothing was changed" in proc.stderr
    assert machine_state() == before
    assert not cache.exists()


def test_second_run_only_checks() -> None:
    """`make test` bootstrapped this machine already; running again must not rebuild or reinstall CRIU."""
    if not (CRIU.exists() and (CRIU_SRC / "criu" / "criu").exists()):
        pytest.skip("this machine was not bootstrapped by scripts/bootstrap-host.sh")
    built = (CRIU_SRC / "criu" / "criu").stat().st_mtime_ns
    before = machine_state()
    proc = bootstrap({})
    assert proc.returncode == 0, proc.stderr
    assert "host ready" in proc.stderr
    assert "building CRIU" not in proc.stderr and "installing" not in proc.stderr
    assert (CRIU_SRC / "criu" / "criu").stat().st_mtime_ns == built
    assert machine_state() == before


def test_criu_keeps_its_kernel_probe_cache(tmp_path: Path) -> None:
    """The bootstrapped CRIU caches its kernel probe (criu.kdat) on the tmpfs the bootstrap gives it, so
    the runs inside a freeze skip it; the first run after the cache is gone (the positive control) probes."""
    if not CRIU.exists():
        pytest.skip("this machine was not bootstrapped by scripts/bootstrap-host.sh")
    cache = Path("/run/criu/criu.kdat")
    cache.unlink(missing_ok=True)
    logs = []
    for run in ("probes", "cached"):
        log = tmp_path / f"{run}.log"
        subprocess.run([str(CRIU), "check", "-v4", "-o", str(log)], capture_output=True, check=True, timeout=60)
        logs.append(log.read_text())
    assert "Loaded kdat cache" not in logs[0]
    assert f"Loaded kdat cache from {cache}" in logs[1]
