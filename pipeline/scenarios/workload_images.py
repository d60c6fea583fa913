"""Real programs from Debian's archive as container images: PostgreSQL, nginx, memcached, a JVM and a
Node.js echo server, and a shell pipeline of FIFOs and file locks.

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
ECHO_PORT = 7000  # the JVM's and Node's line-echo servers
PIPELINE_DIR = "/srv/pipeline"

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

# A line-echo server per runtime: each connection answers every line with "<its own line count> <line>",
# so the client sees that the per-connection state in the server's heap survived the move. Both come as
# source: the JRE runs a single Java file directly (its `lib/modules` carries jdk.compiler), so the image
# needs no JDK.
ECHO_JAVA = r"""
import java.io.*;
import java.net.*;

public class Echo {
    public static void main(String[] args) throws IOException {
        try (ServerSocket server = new ServerSocket(Integer.parseInt(args[0]))) {
            while (true) {
                Socket s = server.accept();
                new Thread(() -> serve(s)).start();
            }
        }
    }

    static void serve(Socket s) {
        long n = 0;
        try (s; BufferedReader in = new BufferedReader(new InputStreamReader(s.getInputStream()));
             Writer out = new BufferedWriter(new OutputStreamWriter(s.getOutputStream()))) {
            for (String line; (line = in.readLine()) != null; ) {
                out.write(++n + " " + line + "\n");
                out.flush();
            }
        } catch (IOException e) {
            // the client went away
        }
    }
}
"""

ECHO_JS = r"""
const net = require('net');
net.createServer((sock) => {
  let n = 0, buf = '';
  sock.setEncoding('utf8');
  sock.on('data', (data) => {
    buf += data;
    for (let i; (i = buf.indexOf('\n')) >= 0; buf = buf.slice(i + 1)) sock.write(`${++n} ${buf.slice(0, i)}\n`);
  });
  sock.on('error', () => {});
}).listen(Number(process.argv[2]));
"""

# Processes joined by a named FIFO and serialised by flock(1): producers A and B write numbered lines
# into the FIFO, a consumer appends each to the log under an exclusive lock, a ticker appends its own
# numbered lines under the same lock, and a holder keeps a second lock for as long as the container
# runs. The log must hold each sender's numbers 1..n in order, none torn, none missing, none twice.
PIPELINE_SH = rf"""#!/bin/bash
set -u
mkdir -p {PIPELINE_DIR} && cd {PIPELINE_DIR}
rm -f queue && mkfifo queue
flock held sleep infinity &
produce() {{ i=0; while :; do i=$((i + 1)); echo "$1 $i"; sleep 0.1; done > queue; }}
produce A & produce B &
(exec 9>> log.lock; i=0; while :; do i=$((i + 1)); flock 9; echo "T $i" >> log; flock -u 9; sleep 0.2; done) &
exec 9>> log.lock
while read -r line; do flock 9; echo "$line" >> log; flock -u 9; done < queue
"""


def _write_files(files: dict[str, tuple[str, int]]) -> str:
    """A customize hook writing each file (path in the root -> (text, mode))."""
    lines = ["set -eu", 'root="$1"']
    for path, (text, mode) in files.items():
        lines += [f'mkdir -p "$root{Path(path).parent}"', f"cat > \"$root{path}\" <<'SKYFERRY_EOF'", text.strip("\n"),
                  "SKYFERRY_EOF", f'chmod {mode:o} "$root{path}"']  # fmt: skip
    return "\n".join(lines) + "\n"


# openjdk's postinst registers its man page as an alternative's slave link, which fails without the
# directory, and the images leave out /usr/share/man's contents.
MAN1_DIR = 'mkdir -p "$1/usr/share/man/man1"'

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
    setup: str = ""  # a hook run before any package is installed (mmdebstrap --setup-hook)
    suite: str = vmimage.SUITE
    sources: tuple[str, ...] = field(default_factory=lambda: tuple(vmimage.host_debian_sources()))
    version: int = RECIPE_VERSION

    def digest(self) -> str:
        fields = asdict(self)
        if not fields["setup"]:  # added later: recipes without one keep their hash and their cached image
            del fields["setup"]
        blob = json.dumps(fields, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def recipes() -> dict[str, Recipe]:
    return {
        "postgres": Recipe("postgres", ("postgresql-15", "python3-psycopg2"), POSTGRES_CUSTOMIZE),
        "nginx": Recipe("nginx", ("nginx-light",), NGINX_CUSTOMIZE),
        "memcached": Recipe("memcached", ("memcached",)),
        "jvm": Recipe(
            "jvm", ("openjdk-17-jre-headless",), _write_files({"/srv/Echo.java": (ECHO_JAVA, 0o644)}), setup=MAN1_DIR
        ),
        "node": Recipe("node", ("nodejs",), _write_files({"/srv/echo.js": (ECHO_JS, 0o644)})),
        "pipeline": Recipe("pipeline", (), _write_files({"/usr/local/bin/pipeline": (PIPELINE_SH, 0o755)})),
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
    # A small heap, serial GC and C1 only: a few threads and little memory to move; no hsperfdata file
    # mapped shared in /tmp.
    "jvm": ["/usr/bin/java", "-Xmx64m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-XX:-UsePerfData",
            "/srv/Echo.java", str(ECHO_PORT)],
    "node": ["/usr/bin/node", "/srv/echo.js", str(ECHO_PORT)],
    "pipeline": ["/usr/local/bin/pipeline"],
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
        hooks = [f"--setup-hook={recipe.setup}"] if recipe.setup else []
        hooks += [f"--customize-hook={script}" for script in (recipe.customize, SLIM) if script]
        vmimage._run_logged(
            ["nice", "-n", "10", "mmdebstrap", "--variant=apt", "--mode=root",
             "--dpkgopt=path-exclude=/usr/share/man/*", "--dpkgopt=path-exclude=/usr/share/doc/*",
             "--dpkgopt=path-exclude=/usr/share/locale/*",
             *([f"--include={','.join(recipe.packages)}"] if recipe.packages else []), *hooks,
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
