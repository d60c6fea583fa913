"""The ledger of certificates the mesh CA signed for members, and which of them are revoked.

Every member certificate is recorded when it is signed (a joining host's, a local host's, a rotated
one), so a decommission can revoke exactly the serials a host held. The revocation list the agents get
is the revoked serials that have not expired: an expired certificate is refused anyway.
"""

import time
from contextlib import closing
from pathlib import Path

from cryptography import x509
from skyferry.netplane import store
from skyferry.pipeline.controller import db
from skyferry.pipeline.hostapi.revocation import RevocationList, serial


def record(state: Path, subject: str, cert_pem: bytes | str) -> str:
    """Note a certificate the CA signed for `subject` (a host name, or "controller"); returns its serial.
    Recording the same certificate again changes nothing."""
    cert = x509.load_pem_x509_certificate(cert_pem.encode() if isinstance(cert_pem, str) else cert_pem)
    with closing(db.connect(state)) as conn:
        if conn.execute("SELECT 1 FROM certs WHERE serial=?", (serial(cert),)).fetchone():
            return serial(cert)  # known: no write (this runs whenever the controller makes a client)
        conn.execute(
            "INSERT OR IGNORE INTO certs (serial, subject, not_after, issued) VALUES (?,?,?,?)",
            (serial(cert), subject, cert.not_valid_after_utc.timestamp(), time.time()),
        )
    return serial(cert)


def record_file(state: Path, subject: str, cert_path: Path) -> str:
    return record(state, subject, cert_path.read_bytes())


def revoke_subjects(state: Path, subjects: list[str]) -> list[str]:
    """Revoke every unexpired certificate of these subjects (hosts leaving the mesh); the serials."""
    return _revoke(state, "subject", subjects)


def revoke_serials(state: Path, serials: list[str]) -> list[str]:
    return _revoke(state, "serial", serials)


def _revoke(state: Path, column: str, values: list[str]) -> list[str]:
    if not values:
        return []
    now = time.time()
    marks = ",".join("?" * len(values))
    with closing(db.connect(state)) as conn, store.immediate(conn):
        rows = conn.execute(
            f"SELECT serial FROM certs WHERE {column} IN ({marks}) AND revoked IS NULL AND not_after > ?",
            (*values, now),
        ).fetchall()
        found = [r["serial"] for r in rows]
        conn.executemany("UPDATE certs SET revoked=? WHERE serial=?", [(now, s) for s in found])
    return found


def revoked(state: Path) -> RevocationList:
    """The serials every agent must refuse: revoked and not expired yet."""
    with closing(db.connect(state)) as conn:
        rows = conn.execute(
            "SELECT serial FROM certs WHERE revoked IS NOT NULL AND not_after > ? ORDER BY serial", (time.time(),)
        ).fetchall()
    return RevocationList(serials=[r["serial"] for r in rows])
