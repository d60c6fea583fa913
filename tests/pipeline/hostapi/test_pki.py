"""The role a certificate carries: set by the CA on every issuing path, read back by `pki.identify`."""

from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from skyferry.pipeline.hostapi import pki


def _held(cert_pem: bytes) -> tuple[str | None, str]:
    return pki.identify(x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER))


def test_issue_and_sign_csr_write_the_role_the_ca_decides(tmp_path: Path) -> None:
    ca = tmp_path / "ca"
    pki.ensure_ca(ca, "t")
    ident = pki.issue(ca, tmp_path / "ctl", "controller", ["100.64.0.1"], role=pki.CONTROLLER)
    assert _held(ident.cert.read_bytes()) == (pki.CONTROLLER, "controller")
    # A joining host asks in its CSR to be the controller; the CA signs the name and role it decided.
    csr = pki.make_csr("controller", tmp_path / "edge" / "key.pem")
    assert _held(pki.sign_csr(ca, csr, "edge-1", ["100.64.0.9"], role=pki.HOST).encode()) == (pki.HOST, "edge-1")
    with pytest.raises(ValueError, match="no such role"):
        pki.sign_csr(ca, csr, "edge-1", ["100.64.0.9"], role="admin")


def test_issue_replaces_a_certificate_of_another_role_and_keeps_its_own(tmp_path: Path) -> None:
    ca = tmp_path / "ca"
    pki.ensure_ca(ca, "t")
    first = pki.issue(ca, tmp_path / "h", "local-1", ["100.64.0.2"], role=pki.HOST)
    pem = first.cert.read_bytes()
    assert pki.issue(ca, tmp_path / "h", "local-1", ["100.64.0.2"], role=pki.HOST).cert.read_bytes() == pem
    pki.issue(ca, tmp_path / "h", "local-1", ["100.64.0.2"], role=pki.CONTROLLER)
    assert _held(first.cert.read_bytes()) == (pki.CONTROLLER, "local-1")
