"""This host's TLS identity while the agent runs: renewed in place (`skyferry mesh rotate`) and checked
against the controller's revocation list, with no restart.

Rotation keeps the private key on the host: the controller asks for a signing request (`POST
/v1/tls/csr`, a new key is made here, next to the one in use), signs it, and hands the certificate back
(`PUT /v1/tls/cert`); the agent installs it only if it is for that new key and signed by its mesh CA. The
server builds its TLS context again when any of its files changed, so the next connection shows the new
certificate while connections already open keep theirs.
"""

import logging
import os
import ssl
import threading

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from pydantic import BaseModel, Field
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.hostapi import pki
from skyferry.pipeline.hostapi.revocation import RevokedFile, serial

log = logging.getLogger(__name__)
NEXT_KEY = "key.next.pem"  # the key a pending rotation made; it becomes key.pem when its certificate comes


class NewCert(BaseModel):
    """`PUT /v1/tls/cert`: the certificate the controller signed for this host's pending key."""

    cert_pem: str = Field(max_length=16 << 10)


class LiveIdentity:
    """The agent's identity files, read again when they change: `server()` and `client()` give the
    context for the next connection, `check` refuses revoked peers."""

    def __init__(self, identity: pki.Identity) -> None:
        self.identity = identity
        self.revoked = RevokedFile(identity.cert.parent / "revoked.json")
        self._lock = threading.Lock()
        self._stamp: tuple[tuple[int, int], ...] | None = None
        self._server: ssl.SSLContext | None = None
        self._client: ssl.SSLContext | None = None

    def _files(self) -> tuple[tuple[int, int], ...]:
        stats = [os.stat(p) for p in (self.identity.ca, self.identity.cert, self.identity.key)]
        return tuple((st.st_mtime_ns, st.st_ino) for st in stats)

    def _current(self) -> tuple[ssl.SSLContext, ssl.SSLContext]:
        with self._lock:
            stamp = self._files()
            if stamp != self._stamp or self._server is None or self._client is None:
                try:
                    self._server, self._client = self.identity.server_context(), self.identity.client_context()
                    self._stamp = stamp
                except (ssl.SSLError, OSError) as exc:
                    if self._server is None or self._client is None:
                        raise
                    # A file half replaced (key before certificate): keep serving with what worked.
                    log.warning("TLS files changed but do not load yet (%s); keeping the previous ones", exc)
            return self._server, self._client

    def server(self) -> ssl.SSLContext:
        return self._current()[0]

    def client(self) -> ssl.SSLContext:
        return self._current()[1]

    def check(self, sock: ssl.SSLSocket) -> None:
        self.revoked.check(sock)

    def csr(self, name: str) -> str:
        """A new key (kept beside the one in use until its certificate comes) and a signing request."""
        return pki.make_csr(name, self.identity.key.with_name(NEXT_KEY))

    def install(self, new: NewCert) -> str:
        """Install the certificate for the pending key; returns its serial. Refused unless it is for that
        key and the mesh CA signed it (a wrong certificate must not cost the host its identity)."""
        next_key = self.identity.key.with_name(NEXT_KEY)
        if not next_key.exists():
            raise SkyferryError("no certificate rotation is pending here", hint="POST /v1/tls/csr first")
        try:
            cert = x509.load_pem_x509_certificate(new.cert_pem.encode())
        except ValueError as exc:
            raise SkyferryError(f"not a PEM certificate: {exc}") from None
        key = serialization.load_pem_private_key(next_key.read_bytes(), password=None)
        if cert.public_key() != key.public_key():
            raise SkyferryError("the certificate is not for the key this host made for the rotation")
        ca = x509.load_pem_x509_certificate(self.identity.ca.read_bytes())
        try:
            cert.verify_directly_issued_by(ca)
        except (InvalidSignature, ValueError, TypeError) as exc:
            raise SkyferryError(f"the certificate is not from this mesh's CA: {exc}") from None
        tmp = self.identity.cert.with_name("cert.next.pem")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(new.cert_pem)
        # Two renames: a context built between them fails to load and the previous one stays (_current).
        os.replace(next_key, self.identity.key)
        os.replace(tmp, self.identity.cert)
        log.info("installed a new certificate, serial %s, valid until %s", serial(cert), cert.not_valid_after_utc)
        return serial(cert)
