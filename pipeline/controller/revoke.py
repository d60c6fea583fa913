"""Taking certificates away: hosts leaving the mesh lose theirs, and every agent learns the list.

The ledger (controller/certs.py) says which serials are revoked; this hands the list to every host's
agent (`PUT /v1/tls/revoked`), which refuses those serials from its next connection on. A host that
cannot be reached keeps its old list until `skyferry mesh sync` or the next revocation reaches it; the
controller itself refuses revoked agents at once (it reads the ledger).
"""

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from skyferry.netplane.mesh import Mesh
from skyferry.pipeline.controller import agentctl, certs
from skyferry.pipeline.errors import SkyferryError

log = logging.getLogger(__name__)


def push(state: Path, mesh: Mesh, skip: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """Send the revocation list to every host's agent but `skip`; returns the hosts not reached."""
    body = certs.revoked(state).model_dump()
    names = [n for n in mesh.hosts if n not in skip]

    def one(name: str) -> None:
        client = agentctl.client(state, mesh, name)
        try:
            client.call("PUT", "/v1/tls/revoked", body, retry_for=2.0)
        finally:
            client.close()

    with ThreadPoolExecutor(max_workers=max(1, len(names))) as pool:
        futures = {n: pool.submit(one, n) for n in names}
    for f in futures.values():
        if (exc := f.exception()) is not None and not isinstance(exc, SkyferryError):
            raise exc  # a bug, not an unreachable host
    failed = sorted(n for n, f in futures.items() if f.exception() is not None)
    if failed:
        log.warning("the revocation list did not reach %s; skyferry mesh sync sends it again", ", ".join(failed))
    return failed


def hosts(state: Path, mesh: Mesh, names: list[str]) -> dict[str, Any]:
    """Revoke every certificate of the hosts `names` (leaving the mesh) and tell the other members."""
    serials = certs.revoke_subjects(state, names)
    return {"revoked": serials, "not_told": push(state, mesh, skip=set(names)) if serials else []}


def monitor(state: Path, mesh: Mesh, name: str) -> dict[str, Any]:
    """Revoke every certificate of monitor `name` (its key may have leaked) and tell every host."""
    serials = certs.revoke_subjects(state, [agentctl.monitor_subject(name)])
    return {"revoked": serials, "not_told": push(state, mesh) if serials else []}
