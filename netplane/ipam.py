"""Overlay address management: host addresses and container /32s from one CIDR, persisted in ipam.json."""

import fcntl
import ipaddress
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import NetplaneError

DEFAULT_CIDR = "100.64.0.0/16"
FILE = "ipam.json"


def parse_cidr(cidr: str) -> ipaddress.IPv4Network:
    try:
        net = ipaddress.ip_network(cidr, strict=True)
    except ValueError as exc:
        raise NetplaneError(f"bad overlay CIDR {cidr!r}: {exc}", hint="e.g. --cidr 100.64.0.0/16") from None
    if not isinstance(net, ipaddress.IPv4Network):
        raise NetplaneError(f"overlay CIDR {cidr} is not IPv4", hint="e.g. --cidr 100.64.0.0/16")
    return net


def write_json_atomic(path: Path, data: Any) -> None:
    """Write via a temp file and rename, so a crash never leaves a half-written file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class Ipam:
    """Allocations live in `<state>/ipam.json` as {ip: owner}; every call locks, reads and writes it.

    Allocation walks forward from the last address handed out, so a released address is not handed
    out again until the range wraps; an address is never given out while someone holds it.
    """

    def __init__(self, state: Path, cidr: str | None = None) -> None:
        self.path = Path(state) / FILE
        self._lock_path = Path(state) / ".ipam.lock"
        with self._locked() as data:
            if cidr is not None and data["cidr"] != str(parse_cidr(cidr)):
                if data["allocations"]:
                    raise NetplaneError(
                        f"IPAM in {state} already uses {data['cidr']}, not {cidr}",
                        hint="skyferry hosts down releases it",
                    )
                data["cidr"] = str(parse_cidr(cidr))
        self.network = parse_cidr(self._read()["cidr"])

    @property
    def cidr(self) -> str:
        return str(self.network)

    def _read(self) -> dict[str, Any]:
        if not self.path.exists():
            return {"cidr": DEFAULT_CIDR, "allocations": {}, "last": None}
        return json.loads(self.path.read_text())

    @contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(self._lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data = self._read()
            before = json.dumps(data, sort_keys=True)
            yield data
            if json.dumps(data, sort_keys=True) != before:
                write_json_atomic(self.path, data)

    def allocate(self, owner: str) -> str:
        """The address `owner` holds, or a fresh one; NetplaneError when the CIDR is full."""
        with self._locked() as data:
            held: dict[str, str] = data["allocations"]
            for ip, who in held.items():
                if who == owner:
                    return ip
            hosts = list(self.network.hosts())
            start = 0
            if data.get("last") is not None:
                start = (int(ipaddress.ip_address(data["last"])) - int(hosts[0]) + 1) % len(hosts)
            for i in range(len(hosts)):
                ip = str(hosts[(start + i) % len(hosts)])
                if ip not in held:
                    held[ip] = owner
                    data["last"] = ip
                    return ip
        raise NetplaneError(
            f"overlay CIDR {self.network} is full ({len(held)} addresses held)",
            hint="release addresses or bring the mesh up with a larger --cidr",
        )

    def release(self, ip: str) -> None:
        with self._locked() as data:
            data["allocations"].pop(ip, None)

    def owner_of(self, ip: str) -> str | None:
        return self._read()["allocations"].get(ip)

    def lookup(self, owner: str) -> str | None:
        for ip, who in self._read()["allocations"].items():
            if who == owner:
                return ip
        return None

    def allocations(self) -> dict[str, str]:
        return dict(self._read()["allocations"])
