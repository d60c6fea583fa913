"""Where an agent can be found and what it keeps where: known to the controller and to every agent."""

import zlib
from pathlib import Path

AGENT_PORT = 7420
# Checkpoint images hold every secret in a container's memory: tmpfs only, per mesh and host.
IMAGES_TMPFS = Path("/dev/shm/skyferry")
PAGE_SERVER_PORTS = (27000, 2000)  # first port, how many


def page_server(mig: str, overlay_ip: str) -> str:
    """Where a source serves a post-copy migration's pages: derived from the migration, so the target
    (and a controller that resumes after a crash) find it without asking."""
    return f"{overlay_ip}:{PAGE_SERVER_PORTS[0] + zlib.crc32(mig.encode()) % PAGE_SERVER_PORTS[1]}"
