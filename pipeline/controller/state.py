"""The controller's state directory: mesh description, IPAM, journal, CA. Always mode 0700."""

import os
from pathlib import Path

DEFAULT_STATE = Path("/var/lib/skyferry")


def state_dir() -> Path:
    """$SKYFERRY_STATE, or /var/lib/skyferry; created 0700 because it holds keys and images' metadata."""
    path = Path(os.environ.get("SKYFERRY_STATE", DEFAULT_STATE))
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.chmod(0o700)
    return path
