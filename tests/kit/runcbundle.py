"""A small runc bundle for tests that drive runc directly: `runc spec`'s defaults, running `sleep 600` in a
rootfs that sees the host's programs read-only (a bind of /usr)."""

import json
import subprocess
from pathlib import Path
from typing import Any

from skyferry.pipeline.runtimes.runc import RUNC


def sleeper(directory: Path, cgroup: str) -> dict[str, Any]:
    """Write the bundle into `directory` and return its config (the caller adjusts it, then `save`s it)."""
    rootfs = directory / "rootfs"
    rootfs.mkdir(parents=True)
    for link in ("bin", "lib", "lib64", "sbin"):
        (rootfs / link).symlink_to(f"usr/{link}")
    subprocess.run([RUNC, "spec"], cwd=directory, check=True)
    config = json.loads((directory / "config.json").read_text())
    config["process"].update(terminal=False, args=["sleep", "600"])
    config["mounts"].append({"destination": "/usr", "type": "bind", "source": "/usr", "options": ["rbind", "ro"]})
    config["linux"]["cgroupsPath"] = cgroup
    return config


def save(directory: Path, config: dict[str, Any]) -> None:
    (directory / "config.json").write_text(json.dumps(config))
