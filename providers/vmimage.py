"""A Debian 12 golden VM image for the `vm` provider, built offline-from-the-archive with mmdebstrap.

The image is an ext4 file system without a partition table or bootloader, stored as qcow2; QEMU boots it
with `-kernel/-initrd` (the kernel and initrd are extracted next to it) and `root=/dev/vda`. Each VM runs
on its own qcow2 overlay, so the golden image is never written to.

Images are cached under /var/cache/skyferry/vm/<recipe hash>/: any change to the recipe (packages,
sources, the CRIU binary, requirements.lock, the customisation scripts) gives a new hash and a new build;
an existing complete build is reused at once.

The image carries skyferry's dependencies, but not skyferry: a venv at /opt/skyferry with every wheel of
requirements.lock (hash-checked, no resolver, as scripts/install-venv.sh makes the host's) and pycriu
from the host's CRIU tree. Hosts get the controller's own skyferry wheel when they join.
`/etc/skyferry/golden-image` holds the recipe digest, so user-data can skip what the image already has.
"""

import fcntl
import hashlib
import json
import logging
import os
import re
import selectors
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import ProviderError

log = logging.getLogger(__name__)

CACHE_ROOT = Path("/var/cache/skyferry/vm")
HOST_CRIU = Path("/usr/local/sbin/criu")
CRIU_LIB = Path("/var/cache/skyferry/criu-4.2.1/lib")  # pycriu's source, left by bootstrap-host.sh
LOCK_FILE = Path(__file__).resolve().parents[1] / "requirements.lock"
VENV = "/opt/skyferry"
MARKER = "/etc/skyferry/golden-image"
STAGING = "/tmp/skyferry-build"  # inside the root, while the build runs
RECIPE_VERSION = 2  # bump when the build steps change in a way the recipe fields do not capture
SUITE = "bookworm"

PACKAGES = (
    "linux-image-amd64",
    "systemd",
    "systemd-sysv",  # provides /sbin/init
    "udev",
    "kmod",
    "e2fsprogs",  # fsck of the root at boot
    "cloud-init",
    "qemu-guest-agent",  # exec without network or keys
    "python3",
    "python3-venv",
    "iproute2",
    "iputils-ping",
    "procps",
    "wireguard-tools",
    "nftables",
    "iptables",  # CRIU's network lock
    "runc",
    # The shared libraries of the host-built CRIU 4.2.1 (`ldd /usr/local/sbin/criu`); the rest are
    # dependencies of these.
    "libprotobuf-c1",
    "libnl-3-200",
    "libnet1",
    "libbsd0",
    "libnftables1",
    "libuuid1",
)

# Runs in the target root ($1) after the packages are in. Kept as data so that it is part of the hash.
CUSTOMIZE = r"""
set -eu
root="$1"
printf '/dev/vda / ext4 defaults,errors=remount-ro 0 1\n' > "$root/etc/fstab"
mkdir -p "$root/etc/cloud/cloud.cfg.d" "$root/etc/systemd/system/systemd-networkd-wait-online.service.d"
# Only look for a NoCloud seed: probing the cloud datasources costs minutes without a network.
cat > "$root/etc/cloud/cloud.cfg.d/90-skyferry.cfg" <<'EOF'
datasource_list: [NoCloud, None]
# No `locales` package (generating one takes a minute under TCG), so cloud-init must not set a locale.
locale: false
ssh_genkeytypes: []
system_info:
  network:
    renderers: [networkd]
# Every module costs seconds of Python under TCG: keep the ones a host's user-data uses (files, commands,
# packages when there is a network), drop ssh, apt mirror rewriting, grub, ntp, snap and the like.
cloud_init_modules: [seed_random, bootcmd, write-files, resizefs, set_hostname, update_hostname,
  update_etc_hosts, ca-certs, users-groups]
cloud_config_modules: [timezone, runcmd]
cloud_final_modules: [package-update-upgrade-install, scripts-per-once, scripts-per-boot,
  scripts-per-instance, scripts-user, final-message, power-state-change]
EOF
# cloud-init.service orders itself after wait-online; a VM without a configured link must not wait 2 min.
cat > "$root/etc/systemd/system/systemd-networkd-wait-online.service.d/skyferry.conf" <<'EOF'
[Service]
ExecStart=
ExecStart=/lib/systemd/systemd-networkd-wait-online --any --timeout=20
EOF
chroot "$root" systemctl enable systemd-networkd.service
# Boot-time jobs that cost a minute each under TCG and do nothing for a throwaway VM.
chroot "$root" systemctl mask e2scrub_reap.service e2scrub_all.timer getty-static.service \
  apt-daily.timer apt-daily-upgrade.timer
# A small initrd with just what finds a virtio root: the default (MODULES=most) takes ~20 s more to
# unpack and probe under TCG.
printf 'MODULES=list\n' > "$root/etc/initramfs-tools/conf.d/skyferry"
printf '%s\n' virtio_pci virtio_blk ext4 crc32c_generic > "$root/etc/initramfs-tools/modules"
chroot "$root" update-initramfs -u -k all
# A unique machine-id per VM: systemd generates it at first boot when the file is empty.
: > "$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id"
# The host-built CRIU keeps its kernel-probe cache in /run/criu (scripts/bootstrap-host.sh): the guest's
# /run is a tmpfs, and systemd-tmpfiles makes the directory at every boot.
mkdir -p "$root/etc/tmpfiles.d"
printf 'd /run/criu 0755 root root -\n' > "$root/etc/tmpfiles.d/skyferry-criu.conf"
if chroot "$root" ldd /usr/local/sbin/criu | grep 'not found'; then
  echo "criu misses shared libraries in the image" >&2
  exit 1
fi
"""

# Runs in the target root ($1) once the wheels, requirements.lock and pycriu's source are staged in it.
# The guest's python3 is Debian 12's 3.11, as on the host, so the host's wheels fit.
VENV_SETUP = rf"""
set -eu
root="$1"
chroot "$root" python3 -m venv {VENV}
pip="{VENV}/bin/python -m pip --disable-pip-version-check --no-cache-dir"
chroot "$root" $pip install --progress-bar off --no-index --find-links {STAGING}/wheels --require-hashes --no-deps \
  -r {STAGING}/requirements.lock
# pycriu's pyproject has a `license` table that the locked setuptools accepts with a deprecation notice.
chroot "$root" env PYTHONWARNINGS=ignore $pip install --no-index --no-deps --no-build-isolation {STAGING}/criu-lib
chroot "$root" $pip check
rm -rf "$root{STAGING}"
"""


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the image's content; its hash names the cache entry."""

    suite: str = SUITE
    packages: tuple[str, ...] = PACKAGES
    sources: tuple[str, ...] = field(default_factory=lambda: tuple(host_debian_sources()))
    criu_sha256: str = field(default_factory=lambda: _sha256_file(HOST_CRIU))
    lock_sha256: str = field(default_factory=lambda: _sha256_file(LOCK_FILE))
    customize: str = CUSTOMIZE
    venv_setup: str = VENV_SETUP
    size_gib: int = 4
    version: int = RECIPE_VERSION

    def digest(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


@dataclass(frozen=True)
class Image:
    """A built golden image: boot `kernel` + `initrd` with `disk` (qcow2) as /dev/vda."""

    dir: Path
    disk: Path
    kernel: Path
    initrd: Path
    kernel_version: str


def _sha256_file(path: Path) -> str:
    if not path.is_file():
        raise ProviderError(f"{path} is missing", hint="run scripts/bootstrap-host.sh, which builds CRIU 4.2.1")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def host_debian_sources(sources_dir: Path = Path("/etc/apt/sources.list.d")) -> list[str]:
    """One-line `deb URI SUITE COMPONENTS` entries for this host's bookworm mirrors (deb822 files).

    Reusing the host's URIs keeps the build on whatever archive this machine may reach; no mirror is
    hard-coded. Only binary (`deb`) stanzas of bookworm suites count, so a `deb-src sid` stanza is skipped.
    """
    lines: list[str] = []
    for path in sorted(sources_dir.glob("*.sources")):
        for stanza in re.split(r"\n\s*\n", path.read_text()):
            fields = _deb822_fields(stanza)
            if "deb" not in fields.get("types", "").split() or fields.get("enabled", "yes") == "no":
                continue
            for uri in fields.get("uris", "").split():
                for suite in fields.get("suites", "").split():
                    if suite == SUITE or suite.startswith(SUITE + "-"):
                        lines.append(f"deb {uri} {suite} {fields.get('components', 'main')}")
    if not lines:
        raise ProviderError(
            f"no {SUITE} apt sources found in {sources_dir}",
            hint="the VM image is built from the same Debian archive the host installs from",
        )
    return lines


def _deb822_fields(stanza: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in stanza.splitlines():
        if line.startswith("#") or ":" not in line or line[:1].isspace():
            continue
        key, _, value = line.partition(":")
        fields[key.strip().lower()] = value.strip()
    return fields


def cached(recipe: Recipe, cache_root: Path = CACHE_ROOT) -> Image | None:
    """The complete build for this recipe, if there is one."""
    out = cache_root / recipe.digest()
    meta = out / "image.json"
    if not meta.is_file():
        return None
    info = json.loads(meta.read_text())
    return Image(out, out / "disk.qcow2", out / "vmlinuz", out / "initrd.img", info["kernel_version"])


def ensure_image(recipe: Recipe | None = None, cache_root: Path = CACHE_ROOT) -> Image:
    """Return the cached golden image for `recipe`, building it first (minutes) if needed."""
    recipe = recipe or Recipe()
    image = cached(recipe, cache_root)
    if image:
        return image
    cache_root.mkdir(parents=True, exist_ok=True)
    with _lock(cache_root / f".{recipe.digest()}.lock"):
        image = cached(recipe, cache_root)  # another process may have built it while we waited
        return image or _build(recipe, cache_root)


@contextmanager
def _lock(path: Path) -> Iterator[None]:
    with path.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build(recipe: Recipe, cache_root: Path) -> Image:
    digest = recipe.digest()
    work = cache_root / f".build-{digest}-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    started = time.monotonic()
    try:
        rootfs = work / "rootfs"
        wheels = work / "wheels"
        _download_wheels(wheels)
        _mmdebstrap(recipe, rootfs, wheels)
        shutil.rmtree(wheels)
        kernel_version = _extract_boot(rootfs, work)
        _make_disk(rootfs, work, recipe.size_gib)
        shutil.rmtree(rootfs)
        (work / "disk.qcow2").chmod(0o444)  # VMs only ever read it, through their overlays
        (work / "image.json").write_text(json.dumps({"kernel_version": kernel_version, "recipe": asdict(recipe)}))
        final = cache_root / digest
        shutil.rmtree(final, ignore_errors=True)
        work.rename(final)  # atomic: a cache entry is either complete or absent
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    log.info("vm image %s built in %.0f s", digest, time.monotonic() - started)
    image = cached(recipe, cache_root)
    assert image is not None
    return image


def _download_wheels(dest: Path) -> None:
    """Every wheel requirements.lock names, hash-checked, into `dest`: pip's cache and index are the host's."""
    _run_logged(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", "download", "--progress-bar", "off",
         "-q", "--require-hashes", "--no-deps", "--only-binary", ":all:", "-r", str(LOCK_FILE), "-d", str(dest)],
        "pip download",
    )  # fmt: skip


def _mmdebstrap(recipe: Recipe, rootfs: Path, wheels: Path) -> None:
    if not (CRIU_LIB / "pyproject.toml").is_file():
        raise ProviderError(f"{CRIU_LIB} is missing", hint="run make host (scripts/bootstrap-host.sh)")
    stage = f'mkdir -p "$1{STAGING}" && cp -r {wheels} {LOCK_FILE} "$1{STAGING}/"'
    stage += f' && cp -r {CRIU_LIB} "$1{STAGING}/criu-lib"'
    marker = f'mkdir -p "$1{Path(MARKER).parent}" && echo {recipe.digest()} > "$1{MARKER}"'
    argv = [
        "nice", "-n", "10", "mmdebstrap",
        "--variant=minbase",
        "--mode=root",
        f"--include={','.join(recipe.packages)}",
        f"--customize-hook=copy-in {HOST_CRIU} /usr/local/sbin",
        f"--customize-hook={recipe.customize}",
        f"--customize-hook={stage}",
        f"--customize-hook={recipe.venv_setup}",
        f"--customize-hook={marker}",
        recipe.suite,
        str(rootfs),
        *recipe.sources,
    ]  # fmt: skip
    _run_logged(argv, "mmdebstrap")


def _extract_boot(rootfs: Path, out: Path) -> str:
    """Copy the kernel and initrd out of the root, for a direct `-kernel/-initrd` boot."""
    kernels = sorted((rootfs / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise ProviderError(f"expected one kernel in the image, found {[k.name for k in kernels]}")
    version = kernels[0].name.removeprefix("vmlinuz-")
    initrd = rootfs / "boot" / f"initrd.img-{version}"
    if not initrd.is_file():
        raise ProviderError(f"the image has no initrd for kernel {version}")
    shutil.copyfile(kernels[0], out / "vmlinuz")
    shutil.copyfile(initrd, out / "initrd.img")
    return version


def _make_disk(rootfs: Path, out: Path, size_gib: int) -> None:
    raw = out / "disk.raw"
    log.info("vm image: writing ext4 file system (%d GiB, sparse)", size_gib)
    _run_logged(
        ["nice", "-n", "10", "mke2fs", "-q", "-F", "-t", "ext4", "-L", "skyferry-root", "-d", str(rootfs),
         str(raw), f"{size_gib}G"],
        "mke2fs",
    )  # fmt: skip
    log.info("vm image: converting to qcow2")
    qcow2 = out / "disk.qcow2"
    _run_logged(["nice", "-n", "10", "qemu-img", "convert", "-O", "qcow2", str(raw), str(qcow2)], "qemu-img")
    raw.unlink()


def _run_logged(argv: list[str], tag: str, heartbeat: float = 30.0) -> None:
    """Run a long step, echoing its output as log lines (and a heartbeat when it is quiet)."""
    started = time.monotonic()
    log.info("%s: starting", tag)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    tail: list[str] = []
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while True:
            if not sel.select(timeout=heartbeat):
                log.info("%s [%4.0f s] still running", tag, time.monotonic() - started)
                continue
            raw = proc.stdout.readline()
            if not raw:
                break
            line = raw.decode(errors="replace").rstrip()
            if line:
                log.info("%s [%4.0f s] %s", tag, time.monotonic() - started, line)
                tail = [*tail[-19:], line]
    if proc.wait() != 0:
        raise ProviderError(f"{tag} failed (exit {proc.returncode}): " + " | ".join(tail[-5:]))
    log.info("%s: done in %.0f s", tag, time.monotonic() - started)


def main() -> None:
    """`python -m skyferry.providers.vmimage`: build (or find) the image and print where it is."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    image = ensure_image()
    print(json.dumps({k: str(v) for k, v in asdict(image).items()}))


if __name__ == "__main__":
    main()
