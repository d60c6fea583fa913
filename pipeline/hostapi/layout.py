"""Where an agent can be found and what it keeps where: known to the controller and to every agent."""

from pathlib import Path

from skyferry.netplane.mesh import MACHINE_INTERFACE, MACHINE_STATE_ROOT

AGENT_PORT = 7420
# Checkpoint images hold every secret in a container's memory: tmpfs only, per mesh and host.
IMAGES_TMPFS = Path("/dev/shm/skyferry")
# How long a container may stay frozen for a migration before the source's watchdog thaws it and the
# migration rolls back (`skyferry migrate --freeze-timeout`; docs/reliability.md, "The freeze bound").
FREEZE_TIMEOUT = 30.0
# How long the target waits for the last page of a lazy restore before it stops its copy (its own bound:
# the controller's wait for that verdict must outlast it, and so must the frozen source's; docs/reliability.md).
POSTCOPY_TIMEOUT = 900.0


# A real machine's layout, made by `skyferry join` (local hosts keep theirs under the controller's state).
HOST_STATE = Path(MACHINE_STATE_ROOT)
WG_INTERFACE = MACHINE_INTERFACE
WG_CONFIG = Path("/etc/wireguard") / f"{WG_INTERFACE}.conf"
VENV = Path("/opt/skyferry")
