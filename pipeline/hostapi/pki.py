"""The mesh's certificate authority: mutual TLS between the controller and every host agent.

The CA is created with the mesh and lives in the controller's state (`<state>/ca/`, 0700). It signs one
certificate per host (its overlay IP as SAN) and one for the controller. An agent accepts only peers
whose certificate this CA signed, so an agent of another mesh, or anyone without a certificate, is refused.

Each certificate names its holder's role in a SAN URI, `urn:skyferry:role:controller`,
`urn:skyferry:role:host` or `urn:skyferry:role:monitor` (Prometheus: it may read agents' metrics and
nothing else), next to its name (the CN); the CA decides both, never the requester. Agents
authorize each request by that (role, name) (`identify`; docs/security.md, "Authorization").
"""

import datetime as dt
import hashlib
import ipaddress
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

# Member certificates: 90 days, renewed by `skyferry mesh rotate` (or by `issue` once a third is left), so a
# stolen key that nobody revoked stops working within a quarter. The CA itself lasts ten years.
VALIDITY = dt.timedelta(days=90)
CA_VALIDITY = dt.timedelta(days=3650)
RENEW_BEFORE = VALIDITY / 3
CONTROLLER, HOST, MONITOR = "controller", "host", "monitor"  # the roles a certificate may carry
ROLES = (CONTROLLER, HOST, MONITOR)
ROLE_URI = "urn:skyferry:role:"


@dataclass(frozen=True)
class Identity:
    """Where one member's TLS material lives: the CA certificate, its own certificate and key."""

    ca: Path
    cert: Path
    key: Path

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(self.ca))
        ctx.load_cert_chain(str(self.cert), str(self.key))
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        return ctx

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca))
        ctx.load_cert_chain(str(self.cert), str(self.key))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        return ctx


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def ensure_ca(ca_dir: Path, mesh_name: str) -> Path:
    """Create the mesh CA once; returns the CA certificate path."""
    cert_path, key_path = ca_dir / "ca.pem", ca_dir / "ca.key"
    if cert_path.exists() and key_path.exists():
        return cert_path
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(f"skyferry mesh {mesh_name} CA"))
        .issuer_name(_name(f"skyferry mesh {mesh_name} CA"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    _write_private(key_path, _key_pem(key))
    _write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return cert_path


def issue(ca_dir: Path, out_dir: Path, common_name: str, ips: list[str], *, role: str) -> Identity:
    """Sign a certificate for `common_name` in `role` (valid for `ips`) into out_dir; reuses one already
    there that carries this role and is not due for renewal (one made before roles existed is replaced)."""
    ident = Identity(ca=out_dir / "ca.pem", cert=out_dir / "cert.pem", key=out_dir / "key.pem")
    if ident.cert.exists() and ident.key.exists() and ident.ca.exists() and not renewal_due(ident.cert):
        held = x509.load_pem_x509_certificate(ident.cert.read_bytes()).public_bytes(serialization.Encoding.DER)
        if identify(held) == (role, common_name):
            return ident
    key = ec.generate_private_key(ec.SECP256R1())
    _write_private(ident.key, _key_pem(key))
    _write_private(ident.cert, _sign(ca_dir, key.public_key(), common_name, ips, role).encode())
    _write_private(ident.ca, (ca_dir / "ca.pem").read_bytes())
    return ident


def renewal_due(cert_path: Path, before: dt.timedelta = RENEW_BEFORE) -> bool:
    """Whether the certificate at `cert_path` expires within `before`."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    return cert.not_valid_after_utc - dt.datetime.now(dt.UTC) < before


def _sign(ca_dir: Path, public_key: ec.EllipticCurvePublicKey, common_name: str, ips: list[str], role: str) -> str:
    if role not in ROLES:
        raise ValueError(f"no such role {role!r}")
    ca_key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate((ca_dir / "ca.pem").read_bytes())
    now = dt.datetime.now(dt.UTC)
    sans: list[x509.GeneralName] = [x509.DNSName(common_name), x509.UniformResourceIdentifier(ROLE_URI + role)]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def make_csr(common_name: str, key_path: Path) -> str:
    """A new private key at `key_path` (0600; it never leaves this machine) and a signing request for it."""
    key = ec.generate_private_key(ec.SECP256R1())
    _write_private(key_path, _key_pem(key))
    csr = x509.CertificateSigningRequestBuilder().subject_name(_name(common_name)).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def sign_csr(ca_dir: Path, csr_pem: str, common_name: str, ips: list[str], *, role: str) -> str:
    """A certificate for the key in `csr_pem`, with the name, role and addresses the CA decides, not the CSR."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem.encode())
    except ValueError as exc:
        raise ValueError(f"not a PEM certificate signing request: {exc}") from None
    if not csr.is_signature_valid:
        raise ValueError("the signing request's signature does not match its key")
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError("the signing request must carry an EC key")
    return _sign(ca_dir, key, common_name, ips, role)


def identify(cert_der: bytes) -> tuple[str | None, str]:
    """(role, name) of a peer's certificate (`getpeercert(binary_form=True)`, which TLS has already checked
    against the mesh CA); role is None for a certificate issued before roles existed."""
    cert = x509.load_der_x509_certificate(cert_der)
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    name = str(names[0].value) if names else ""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None, name
    roles = {u.removeprefix(ROLE_URI) for u in san.get_values_for_type(x509.UniformResourceIdentifier)
             if u.startswith(ROLE_URI)}  # fmt: skip
    role = roles.pop() if len(roles) == 1 else None  # two roles in one certificate: none
    return (role if role in ROLES else None), name


def pin(ca_pem: bytes) -> str:
    """What a joining host checks the controller's CA against: sha256 of the CA certificate (DER)."""
    der = x509.load_pem_x509_certificate(ca_pem).public_bytes(serialization.Encoding.DER)
    return "sha256:" + hashlib.sha256(der).hexdigest()
