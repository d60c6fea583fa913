"""Revoked certificates, as both ends of every agent connection check them.

The controller keeps the ledger (pipeline/controller/certs.py) and pushes the serials it revoked to every
agent (`PUT /v1/tls/revoked`), which keeps them in `<state_root>/tls/revoked.json`. Whoever accepts a
connection (an agent) or opens one (the controller, or an agent streaming to another) checks the peer's
certificate serial against that list right after the handshake: a CA signature alone no longer admits a
certificate once its host was decommissioned. Expired certificates need no list: OpenSSL refuses them
while verifying the chain, on both ends.
"""

import json
import os
import ssl
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated

from cryptography import x509
from pydantic import BaseModel, Field, StringConstraints

# Lower-case hex without leading zeros, as `serial` writes it; x509 serials are at most 20 bytes.
Serial = Annotated[str, StringConstraints(pattern=r"^[1-9a-f][0-9a-f]{0,39}$")]


class RevocationList(BaseModel):
    """What the controller pushes: every revoked serial that has not expired yet (expired ones are refused
    anyway, so the list stays as short as the certificates' lifetime)."""

    serials: list[Serial] = Field(default_factory=list, max_length=100_000)


class PeerRevoked(ssl.SSLError):
    """The peer's certificate is valid for the CA but on the revocation list (an SSLError, so a client
    never retries it and an agent logs it as a refused handshake)."""


def serial(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "x")


def peer_serial(sock: ssl.SSLSocket) -> str | None:
    der = sock.getpeercert(binary_form=True)
    return serial(x509.load_der_x509_certificate(der)) if der else None


def checker(revoked: Callable[[], Iterable[str]]) -> Callable[[ssl.SSLSocket], None]:
    """A check for a socket just after its handshake: raises PeerRevoked when the peer's serial is in
    `revoked()` (called per connection, so a list pushed meanwhile applies to the next one)."""

    def check(sock: ssl.SSLSocket) -> None:
        got = peer_serial(sock)
        if got is not None and got in set(revoked()):
            raise PeerRevoked(f"certificate serial {got} is revoked")

    return check


class RevokedFile:
    """An agent's copy of the list (0600 in its tls/ directory), read again only when the file changed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._seen: tuple[int, int] | None = None
        self._serials: frozenset[str] = frozenset()

    def serials(self) -> frozenset[str]:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return frozenset()
        if (st.st_mtime_ns, st.st_size) != self._seen:
            self._serials = frozenset(RevocationList.model_validate_json(self.path.read_bytes()).serials)
            self._seen = (st.st_mtime_ns, st.st_size)
        return self._serials

    def write(self, revoked: RevocationList) -> None:
        """Replace the list atomically: a reader sees the old list or the new one, never half of one."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(revoked.model_dump(), f)
        os.replace(tmp, self.path)

    def check(self, sock: ssl.SSLSocket) -> None:
        checker(self.serials)(sock)
