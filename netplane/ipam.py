"""Overlay address management: host addresses and container /32s from one CIDR, kept in the store."""

import ipaddress
import sqlite3
from pathlib import Path

from . import store
from .errors import NetplaneError

DEFAULT_CIDR = "100.64.0.0/16"
SET_CIDR = "INSERT INTO ipam (id, cidr) VALUES (1,?) ON CONFLICT(id) DO UPDATE SET cidr=excluded.cidr, last=NULL"
SET_LAST = "INSERT INTO ipam (id, cidr, last) VALUES (1,?,?) ON CONFLICT(id) DO UPDATE SET last=excluded.last"


def parse_cidr(cidr: str) -> ipaddress.IPv4Network:
    try:
        net = ipaddress.ip_network(cidr, strict=True)
    except ValueError as exc:
        raise NetplaneError(f"bad overlay CIDR {cidr!r}: {exc}", hint="e.g. --cidr 100.64.0.0/16") from None
    if not isinstance(net, ipaddress.IPv4Network):
        raise NetplaneError(f"overlay CIDR {cidr} is not IPv4", hint="e.g. --cidr 100.64.0.0/16")
    return net


class Ipam:
    """Allocations are rows of `ipam_allocations` (ip, owner), one address per owner; every change is
    one write transaction, so concurrent allocators never hand out the same address.

    Allocation walks forward from the last address handed out, so a released address is not handed
    out again until the range wraps; an address is never given out while someone holds it.
    """

    def __init__(self, state: Path, cidr: str | None = None) -> None:
        self.state = Path(state)
        wanted = str(parse_cidr(cidr)) if cidr is not None else None
        with store.transaction(self.state, write=wanted is not None) as conn:
            current = _cidr(conn)
            if wanted is not None and wanted != current:
                if conn.execute("SELECT 1 FROM ipam_allocations LIMIT 1").fetchone():
                    raise NetplaneError(
                        f"IPAM in {state} already uses {current}, not {cidr}",
                        hint="skyferry hosts down releases it",
                    )
                conn.execute(SET_CIDR, (wanted,))
                current = wanted
        self.network = parse_cidr(current)

    @property
    def cidr(self) -> str:
        return str(self.network)

    def allocate(self, owner: str) -> str:
        """The address `owner` holds, or a fresh one; NetplaneError when the CIDR is full."""
        with store.transaction(self.state) as conn:
            row = conn.execute("SELECT ip FROM ipam_allocations WHERE owner=?", (owner,)).fetchone()
            if row:
                return str(row["ip"])
            held = {r["ip"] for r in conn.execute("SELECT ip FROM ipam_allocations")}
            first, count = int(self.network.network_address) + 1, self.network.num_addresses - 2
            if self.network.prefixlen >= 31:  # no network or broadcast address to skip (RFC 3021)
                first, count = int(self.network.network_address), self.network.num_addresses
            last = conn.execute("SELECT last FROM ipam WHERE id=1").fetchone()
            start = 0
            if last and last["last"] is not None:
                start = (int(ipaddress.ip_address(last["last"])) - first + 1) % count
            for i in range(count):
                ip = str(ipaddress.IPv4Address(first + (start + i) % count))
                if ip not in held:
                    conn.execute("INSERT INTO ipam_allocations (ip, owner) VALUES (?,?)", (ip, owner))
                    conn.execute(SET_LAST, (self.cidr, ip))
                    return ip
        raise NetplaneError(
            f"overlay CIDR {self.network} is full ({len(held)} addresses held)",
            hint="release addresses or bring the mesh up with a larger --cidr",
        )

    def release(self, ip: str) -> None:
        with store.transaction(self.state) as conn:
            conn.execute("DELETE FROM ipam_allocations WHERE ip=?", (ip,))

    def owner_of(self, ip: str) -> str | None:
        with store.transaction(self.state, write=False) as conn:
            row = conn.execute("SELECT owner FROM ipam_allocations WHERE ip=?", (ip,)).fetchone()
        return str(row["owner"]) if row else None

    def lookup(self, owner: str) -> str | None:
        with store.transaction(self.state, write=False) as conn:
            row = conn.execute("SELECT ip FROM ipam_allocations WHERE owner=?", (owner,)).fetchone()
        return str(row["ip"]) if row else None

    def allocations(self) -> dict[str, str]:
        with store.transaction(self.state, write=False) as conn:
            return {r["ip"]: r["owner"] for r in conn.execute("SELECT ip, owner FROM ipam_allocations")}

    @classmethod
    def drop(cls, state: Path) -> None:
        """Forget every allocation and the CIDR (the mesh that used them is gone)."""
        with store.transaction(state) as conn:
            for table in store.IPAM_TABLES:
                conn.execute(f"DELETE FROM {table}")


def _cidr(conn: sqlite3.Connection) -> str:
    row = conn.execute("SELECT cidr FROM ipam WHERE id=1").fetchone()
    return str(row["cidr"]) if row else DEFAULT_CIDR
