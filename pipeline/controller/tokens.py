"""One-time, expiring join tokens (`<id>.<secret>`): the store keeps only the secret's hash."""

import hashlib
import hmac
import secrets
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from skyferry.netplane import store
from skyferry.pipeline.controller import db
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.hostapi.enrolment import TOKEN

DEFAULT_TTL = 30 * 60.0


class TokenRefused(SkyferryError):
    pass


@dataclass(frozen=True)
class Grant:
    """What a consumed token allows: this host name, from this provider."""

    host: str
    provider: str


def issue(state: Path, host: str, provider: str, ttl: float = DEFAULT_TTL) -> str:
    """A new token for `host` that works once within `ttl` seconds."""
    ident, secret = secrets.token_hex(6), secrets.token_hex(16)
    now = time.time()
    with closing(db.connect(state)) as conn:
        conn.execute(
            "INSERT INTO join_tokens (id, secret_sha256, host, provider, created, expires) VALUES (?,?,?,?,?,?)",
            (ident, _hash(secret), host, provider, now, now + ttl),
        )
    return f"{ident}.{secret}"


def consume(state: Path, token: str, host: str) -> Grant:
    """Use `token` for `host`, once: refused if unknown, expired, used, or made for another host."""
    match = TOKEN.fullmatch(token)
    if not match:
        raise TokenRefused("malformed join token")
    ident, secret = match.groups()
    with closing(db.connect(state)) as conn, store.immediate(conn):
        row = conn.execute("SELECT * FROM join_tokens WHERE id=?", (ident,)).fetchone()
        if row is None or not hmac.compare_digest(row["secret_sha256"], _hash(secret)):
            raise TokenRefused("unknown join token", hint="make a new one: skyferry hosts join NAME")
        if row["used"] is not None:
            raise TokenRefused("join token already used", hint="a token admits one host once; make a new one")
        if row["expires"] < time.time():
            raise TokenRefused("join token expired", hint="make a new one: skyferry hosts join NAME")
        if row["host"] != host:
            raise TokenRefused(f"join token is for host {row['host']!r}, not {host!r}")
        conn.execute("UPDATE join_tokens SET used=? WHERE id=?", (time.time(), ident))
    return Grant(row["host"], row["provider"])


def issued(state: Path) -> dict[str, str]:
    """Every host a token was made for, and its provider."""
    with closing(db.connect(state)) as conn:
        return {r["host"]: r["provider"] for r in conn.execute("SELECT host, provider FROM join_tokens")}


def pending(state: Path) -> dict[str, float]:
    """Hosts that hold a token still good for a join, and when their newest one expires."""
    with closing(db.connect(state)) as conn:
        rows = conn.execute(
            "SELECT host, MAX(expires) AS expires FROM join_tokens WHERE used IS NULL AND expires > ? GROUP BY host",
            (time.time(),),
        )
        return {r["host"]: r["expires"] for r in rows}


def revoke(state: Path, host: str) -> int:
    """Forget every unused token for `host` (a provision that failed); returns how many."""
    with closing(db.connect(state)) as conn:
        return conn.execute("DELETE FROM join_tokens WHERE host=? AND used IS NULL", (host,)).rowcount


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()
