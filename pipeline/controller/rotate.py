"""`skyferry mesh rotate`: every member gets a new certificate while everything keeps running.

A host's private key never leaves it: its agent makes a new key and a signing request (`POST
/v1/tls/csr`), the CA here signs it with the name and address the mesh gives that host, and the agent
installs it (`PUT /v1/tls/cert`) and shows it from its next connection on, without a restart
(agent/certs.py). Connections already open, a migration's included, keep their handshake. The rotation
then opens a fresh connection to check that the agent shows the new serial. The controller's own key
and certificate are made again here. `revoke_old` then revokes the previous certificates (a suspected
key theft); without it they stay valid until they expire, so no process that still holds one breaks.
"""

import logging
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from cryptography import x509
from skyferry.netplane.mesh import Mesh
from skyferry.pipeline.controller import agentctl, certs, revoke
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.hostapi import pki
from skyferry.pipeline.hostapi.revocation import serial

log = logging.getLogger(__name__)


def rotate(state: Path, mesh: Mesh, revoke_old: bool = False) -> dict[str, Any]:
    """Renew every host's certificate through its agent, then the controller's; a host that fails is
    reported in "failed" and keeps its current certificate (run again)."""
    with ThreadPoolExecutor(max_workers=max(1, len(mesh.hosts))) as pool:
        futures = {name: pool.submit(_host, state, mesh, name) for name in mesh.hosts}
    done: dict[str, dict[str, Any]] = {}
    failed: dict[str, str] = {}
    for name, future in futures.items():
        exc = future.exception()
        if exc is None:
            done[name] = future.result()
        elif isinstance(exc, SkyferryError):
            failed[name] = str(exc)
        else:
            raise exc
    done["controller"] = _controller(state, mesh)
    report: dict[str, Any] = {"mesh": mesh.name, "renewed": done, "failed": failed}
    if revoke_old:
        report["revoked"] = certs.revoke_serials(state, [r["old"] for r in done.values() if r["old"]])
        report["not_told"] = revoke.push(state, mesh)
    return report


def _host(state: Path, mesh: Mesh, name: str) -> dict[str, Any]:
    member = mesh.host(name)
    client = agentctl.client(state, mesh, name)
    try:
        old = serial(x509.load_der_x509_certificate(client.peer_certificate()))
        csr = client.call("POST", "/v1/tls/csr", {})["csr_pem"]
        pem = pki.sign_csr(state / "ca", csr, name, [member.overlay_ip], role=pki.HOST)
        new = certs.record(state, name, pem)
        client.call("PUT", "/v1/tls/cert", {"cert_pem": pem})
    finally:
        client.close()
    fresh = agentctl.client(state, mesh, name)  # a new handshake: the agent must show the new certificate now
    try:
        shown = serial(x509.load_der_x509_certificate(fresh.peer_certificate()))
    finally:
        fresh.close()
    if shown != new:
        raise SkyferryError(f"{name} installed certificate {new} but still shows {shown}")
    not_after = x509.load_pem_x509_certificate(pem.encode()).not_valid_after_utc
    log.info("%s: certificate %s replaced by %s, valid until %s", name, old, new, not_after)
    return {"old": old, "new": new, "not_after": not_after.isoformat()}


def _controller(state: Path, mesh: Mesh) -> dict[str, Any]:
    """A new key and certificate for the controller, swapped into place (each file replaced whole)."""
    ca = state / "ca"
    current = agentctl.controller_identity(state, mesh)
    old = serial(x509.load_pem_x509_certificate(current.cert.read_bytes()))
    staging = ca / "controller.next"
    shutil.rmtree(staging, ignore_errors=True)
    made = pki.issue(ca, staging, "controller", [mesh.controller.overlay_ip], role=pki.CONTROLLER)
    new = certs.record_file(state, "controller", made.cert)
    os.replace(made.key, current.key)
    os.replace(made.cert, current.cert)
    shutil.rmtree(staging)
    for enrolment in ca.glob("enrolment-*"):  # the join service's certificate: signed again when it next serves
        shutil.rmtree(enrolment)
    not_after = x509.load_pem_x509_certificate(current.cert.read_bytes()).not_valid_after_utc
    return {"old": old, "new": new, "not_after": not_after.isoformat()}
