"""Real programs from Debian's archive as container images: PostgreSQL, nginx and memcached.

Each workload is one Debian 12 root built by mmdebstrap from this machine's own apt sources (the same
archive the host and the VM image install from; nothing else is fetched), wrapped as a one-layer OCI image
layout tarball that `skyferry run --image` unpacks. Builds are cached under
/var/cache/skyferry/workloads/<name>-<recipe hash>/image.tar, as the VM golden image is
(providers/vmimage.py): a change to the packages, the sources or the customisation gives a new hash and a
new build; a complete build is reused at once, and concurrent builders of one recipe wait on a lock.

`python -m skyferry.pipeline.scenarios.workload_images [NAME…]` builds (or finds) them and prints their paths.
"""

import gzip
import hashlib
import io
import json
import logging
import os
import shutil
import sys
import tarfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import BinaryIO

from skyferry.providers import vmimage

log = logging.getLogger(__name__)

CACHE_ROOT = Path("/var/cache/skyferry/workloads")
RECIPE_VERSION = 1  # bump when the build steps change in a way the recipe fields do not capture
PG_CONF = "/etc/postgresql/15/main"
PG_PORT = 5432
HTTP_PORT = 80
MEMCACHED_PORT = 11211

# Test images, reachable only on the overlay: trust every client, no TLS, sockets where the rootfs has them.
POSTGRES_CUSTOMIZE = rf"""
set -eu
root="$1"
[ -d "$root/var/lib/postgresql/15/main" ] || chroot "$root" pg_createcluster 15 main
cat >> "$root{PG_CONF}/postgresql.conf" <<'EOF'
listen_addresses = '*'
port = {PG_PORT}
ssl = off
unix_socket_directories = '/tmp'
external_pid_file = ''
EOF
echo 'host all all 0.0.0.0/0 trust' >> "$root{PG_CONF}/pg_hba.conf"
"""

NGINX_CUSTOMIZE = rf"""
set -eu
root="$1"
# Two workers on any machine, so the master and its worker channels are always part of the dump. Workers
# stay root: see ROOT_ONLY.
sed -i -e 's/^worker_processes .*/worker_processes 2;/' -e 's/^user .*/user root;/' "$root/etc/nginx/nginx.conf"
rm -f "$root/etc/nginx/sites-enabled/default"
mkdir -p "$root/var/www/html"
cat > "$root/etc/nginx/conf.d/skyferry.conf" <<'EOF'
server {{
    listen {HTTP_PORT} default_server;
    root /var/www/html;
    access_log off;
    keepalive_timeout 600s;
    keepalive_requests 1000000;
    location / {{ try_files $uri =404; }}
}}
EOF
echo ok > "$root/var/www/html/ping"
"""

# Drop what no program reads, to keep the image (and each migration's first file round) small.
SLIM = r"""
set -eu
root="$1"
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/var/cache/debconf/*-old
"""


@dataclass(frozen=True)
class Recipe:
    """Everything that decides one workload image's content; its hash names the cache entry."""

    name: str
    packages: tuple[str, ...]
    customize: str = ""
    suite: str = vmimage.SUITE
    sources: tuple[str, ...] = field(default_factory=lambda: tuple(vmimage.host_debian_sources()))
    version: int = RECIPE_VERSION

    def digest(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def recipes() -> dict[str, Recipe]:
    return {
        "postgres": Recipe("postgres", ("postgresql-15", "python3-psycopg2"), POSTGRES_CUSTOMIZE),
        "nginx": Recipe("nginx", ("nginx-light",), NGINX_CUSTOMIZE),
        "memcached": Recipe("memcached", ("memcached",)),
    }


# How each workload runs inside its image: as PID 1, in the foreground. nginx's workers and memcached stay
# root inside the container: CRIU reads every task's rlimits with prlimit(2), which for a task of another
# user needs CAP_SYS_RESOURCE, and root on some hosts (this project's dev VM) lacks it; there a dropped
# user fails the checkpoint (docs/compatibility.md). PostgreSQL refuses to run as root, so it cannot be
# helped that way.
COMMANDS: dict[str, list[str]] = {
    "postgres": [
        "/usr/bin/setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups",
        "/usr/lib/postgresql/15/bin/postgres", "-c", f"config_file={PG_CONF}/postgresql.conf",
    ],
    "nginx": ["/usr/sbin/nginx", "-g", "daemon off;"],
    "memcached": ["/usr/bin/memcached", "-u", "root", "-l", "0.0.0.0", "-p", str(MEMCACHED_PORT),
                  "-t", "4", "-m", "64", "-c", "1024"],
}  # fmt: skip


def image_path(recipe: Recipe, cache_root: Path = CACHE_ROOT) -> Path:
    return cache_root / f"{recipe.name}-{recipe.digest()}" / "image.tar"


def ensure_image(name: str, cache_root: Path = CACHE_ROOT) -> Path:
    """The cached OCI image tarball of workload `name`, built first (a minute or two) if needed."""
    recipe = recipes()[name]
    path = image_path(recipe, cache_root)
    if path.is_file():
        return path
    cache_root.mkdir(parents=True, exist_ok=True)
    with vmimage._lock(cache_root / f".{recipe.name}-{recipe.digest()}.lock"):
        if not path.is_file():  # another process may have built it while we waited
            _build(recipe, path.parent)
    return path


def _build(recipe: Recipe, final: Path) -> None:
    work = final.parent / f".build-{final.name}-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    started = time.monotonic()
    try:
        root_tar = work / "root.tar"
        hooks = [f"--customize-hook={script}" for script in (recipe.customize, SLIM) if script]
        vmimage._run_logged(
            ["nice", "-n", "10", "mmdebstrap", "--variant=apt", "--mode=root",
             "--dpkgopt=path-exclude=/usr/share/man/*", "--dpkgopt=path-exclude=/usr/share/doc/*",
             "--dpkgopt=path-exclude=/usr/share/locale/*",
             f"--include={','.join(recipe.packages)}", *hooks,
             recipe.suite, str(root_tar), *recipe.sources],
            f"mmdebstrap {recipe.name}",
        )  # fmt: skip
        _oci_layout(root_tar, work / "image.tar", recipe)
        root_tar.unlink()
        (work / "recipe.json").write_text(json.dumps(asdict(recipe), indent=1))
        shutil.rmtree(final, ignore_errors=True)
        work.rename(final)  # atomic: a cache entry is either complete or absent
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    log.info("workload image %s built in %.0f s", final.name, time.monotonic() - started)


def _oci_layout(root_tar: Path, out: Path, recipe: Recipe) -> None:
    """Wrap mmdebstrap's root tar as a one-layer OCI image layout.

    The layer drops /dev's nodes (runc gives every container its own /dev; image unpacking refuses
    devices) and every owner *name*: Python's tarfile maps names through the host's passwd, where
    `postgres` may have another uid than in the image, so only the image's numeric ids may count.
    """
    layer = out.parent / "layer.tar.gz"
    with (
        tarfile.open(root_tar) as src,
        gzip.open(layer, "wb", compresslevel=1) as gz,
        tarfile.open(fileobj=gz, mode="w|", format=tarfile.PAX_FORMAT) as dst,
    ):
        for entry in src:
            parts = [p for p in entry.name.split("/") if p not in ("", ".")]
            if entry.isdev() or (parts[:1] == ["dev"] and len(parts) > 1):
                continue
            entry.uname = entry.gname = ""
            dst.addfile(entry, src.extractfile(entry) if entry.isfile() else None)
    with gzip.open(layer) as uncompressed:
        diff_id = _sha256(uncompressed)
    blobs: dict[str, bytes] = {}

    def blob(data: bytes) -> dict[str, object]:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        return {"digest": digest, "size": len(data)}

    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": COMMANDS.get(recipe.name, ["/bin/sh"])},
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{diff_id}"]},
    }
    with layer.open("rb") as compressed:
        layer_digest = "sha256:" + _sha256(compressed)
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **blob(json.dumps(config).encode())},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer_digest,
                    "size": layer.stat().st_size}],
    }  # fmt: skip
    ref = {"org.opencontainers.image.ref.name": f"skyferry/{recipe.name}:{recipe.digest()}"}
    index = {
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       **blob(json.dumps(manifest).encode()), "annotations": ref}],
    }  # fmt: skip
    with tarfile.open(out, "w") as tar:
        _add_bytes(tar, "oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
        _add_bytes(tar, "index.json", json.dumps(index).encode())
        for digest, data in blobs.items():
            _add_bytes(tar, "blobs/sha256/" + digest.removeprefix("sha256:"), data)
        tar.add(layer, arcname="blobs/sha256/" + layer_digest.removeprefix("sha256:"))
    layer.unlink()


def _sha256(stream: BinaryIO) -> str:
    h = hashlib.sha256()
    while chunk := stream.read(1 << 20):
        h.update(chunk)
    return h.hexdigest()


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(time.time())
    tar.addfile(info, io.BytesIO(data))


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    names = sys.argv[1:] or list(recipes())
    print(json.dumps({name: str(ensure_image(name)) for name in names}))


if __name__ == "__main__":
    main()
