"""`skyferry cp`: files into and out of a container, wherever it runs, as a tar stream through `exec`.

The container's own `tar` reads and writes its side, so paths resolve inside its root and as its user,
never on the host; our side refuses, before unpacking anything, whatever a container put in the stream
that would land outside the destination (absolute paths, `..`, links out, devices): `_checked`.
"""

import base64
import io
import os
import posixpath
import tarfile
from pathlib import Path

from skyferry.pipeline.controller import containers
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.hostapi.execute import MAX_STDIN


def split(text: str) -> tuple[str | None, str]:
    """`NAME:PATH` -> (NAME, PATH); a local path -> (None, path). A local path with a colon starts ./ or /."""
    if text.startswith(("/", ".")) or ":" not in text:
        return None, text
    name, path = text.split(":", 1)
    if name in ("docker", "podman", "runc") and ":" in path:  # runtime:name:path
        more, path = path.split(":", 1)
        name = f"{name}:{more}"
    if not path.startswith("/"):
        raise SkyferryError(f"{text}: the path inside the container must be absolute", hint=f"{name}:/{path}")
    return name, path


def copy_in(state: Path, src: Path, name: str, dest: str) -> int:
    """Copy local `src` (a file or a directory) to `dest` in the container: into `dest` if it is a
    directory there, else as `dest`. Returns the bytes sent."""
    if not src.exists():
        raise SkyferryError(f"{src}: no such file or directory")
    into_dir = _run(state, name, ["sh", "-c", 'test -d "$1"', "sh", dest], check=False)[0] == 0
    parent, arcname = (dest, src.name) if into_dir else posixpath.split(dest.rstrip("/") or "/")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(src, arcname=arcname)
    data = buf.getvalue()
    if len(data) > MAX_STDIN:
        raise SkyferryError(f"{src} is {len(data) >> 20} MiB as a tar stream; cp moves up to {MAX_STDIN >> 20} MiB")
    _run(state, name, ["tar", "-x", "-f", "-", "-C", parent or "/"], stdin=data)
    return len(data)


def copy_out(state: Path, name: str, src: str, dest: Path) -> int:
    """Copy `src` from the container to local `dest`: into `dest` if it is a directory, else as `dest`."""
    parent, base = posixpath.split(src.rstrip("/") or "/")
    _, data, _ = _run(state, name, ["tar", "-c", "-f", "-", "-C", parent or "/", base])
    into, rename = (dest, None) if dest.is_dir() else (dest.parent, dest.name)
    if not into.is_dir():
        raise SkyferryError(f"{into}: no such directory")
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = tar.getmembers()
        if rename:
            for m in members:  # base/... -> rename/...
                m.name = rename + m.name[len(base) :]
        for m in members:
            refused = _checked(m)
            if refused:
                raise SkyferryError(f"cp from {name}: refused {m.name!r}: {refused}", hint="nothing was copied")
        tar.extractall(into, members=members)
    return len(data)


def _checked(m: tarfile.TarInfo) -> str | None:
    """Why member `m` may not be extracted (None: it may). It may hold files, directories and links that
    stay inside; owner and set-id bits become the caller's."""
    # This is tarfile's `data` filter, written out: Debian 12's Python 3.11.2 has no extraction filters
    # (they came in 3.11.4), so nothing else stands between the container's stream and this host's files.
    parts = m.name.split("/")
    if m.name.startswith("/") or ".." in parts:
        return "it points outside the destination"
    if m.issym():
        target = posixpath.normpath(posixpath.join(posixpath.dirname(m.name), m.linkname))
        if m.linkname.startswith("/") or target == ".." or target.startswith("../"):
            return f"a link to {m.linkname}, outside the destination"
    elif not (m.isreg() or m.isdir()):
        return "only files, directories and links inside are copied out"
    m.mode &= 0o777
    m.uid, m.gid, m.uname, m.gname = os.getuid(), os.getgid(), "", ""
    return None


def _run(state: Path, name: str, argv: list[str], stdin: bytes = b"", check: bool = True) -> tuple[int, bytes, bytes]:
    done = containers.exec_(state, name, argv, stdin)
    out, err = base64.b64decode(done.stdout), base64.b64decode(done.stderr)
    if check and done.exit_code != 0:
        message = err.decode(errors="replace").strip().splitlines() or [f"exit status {done.exit_code}"]
        missing = done.exit_code in (126, 127) or "executable file not found" in message[-1]
        raise SkyferryError(
            f"cp in {name}: {argv[0]} failed: {message[-1]}",
            hint="cp runs the container's own tar (busybox or GNU); this container has none" if missing else None,
        )
    return done.exit_code, out, err
