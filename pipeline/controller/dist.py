"""The skyferry a new host installs: a wheel of the very code this controller runs, and the lock that pins
its dependencies. The enrolment service serves both; no package registry is involved.

The wheel is built from the controller's checkout (skyferry installs editable from it) and cached by a
digest of the files that go into it, so a changed tree builds a new wheel and an unchanged one is reused.
"""

import fcntl
import hashlib
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import skyferry.pipeline
from skyferry.pipeline.errors import SkyferryError

SOURCE = Path(skyferry.pipeline.__file__).resolve().parents[1]
PACKAGES = ("pipeline", "providers", "netplane")
LOCK = "requirements.lock"


@dataclass(frozen=True)
class Dist:
    wheel: Path
    lock: Path

    def files(self) -> dict[str, Path]:
        return {self.wheel.name: self.wheel, self.lock.name: self.lock}


def digest(source: Path = SOURCE) -> str:
    h = hashlib.sha256()
    files = [source / "pyproject.toml", source / LOCK]
    files += sorted(p for pkg in PACKAGES for p in (source / pkg).rglob("*.py"))
    for path in files:
        h.update(str(path.relative_to(source)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def build(state: Path, source: Path = SOURCE) -> Dist:
    """The wheel and lock for this controller's code, built once per digest under `<state>/dist/`."""
    if not (source / "pyproject.toml").exists():
        raise SkyferryError(
            f"cannot build the host wheel: {source} is not a skyferry checkout",
            hint="run the controller from a source checkout (make venv installs it editable)",
        )
    out = state / "dist" / digest(source)
    out.mkdir(parents=True, exist_ok=True)
    with open(out.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two provisions at once build once
        wheels = sorted(out.glob("skyferry-*.whl"))
        if not wheels:
            with tempfile.TemporaryDirectory(prefix="skyferry-wheel-") as tmp:
                argv = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "--disable-pip-version-check", "-w", tmp, str(source)]  # fmt: skip
                done = subprocess.run(argv, capture_output=True, text=True, check=False)
                if done.returncode != 0:
                    raise SkyferryError(f"building the host wheel failed: {done.stderr.strip()[-400:]}")
                (wheel,) = Path(tmp).glob("skyferry-*.whl")
                shutil.move(wheel, out / wheel.name)
            shutil.copy(source / LOCK, out / LOCK)
            wheels = sorted(out.glob("skyferry-*.whl"))
    return Dist(wheel=wheels[0], lock=out / LOCK)
