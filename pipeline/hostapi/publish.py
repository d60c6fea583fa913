"""Public ports, as the controller asks an agent to publish them and the agent installs them (the DNAT from
the host's public address to a container's /32, pipeline/agent/dnat.py; docs/runbooks.md "Ingress").

Written `PUBLIC[=CONTAINER][/tcp|/udp]`: `80`, `443/tcp`, `80=8080` (the host's port 80 to the
container's 8080), `53/udp`. Several are joined with commas.
"""

import re
from dataclasses import dataclass

from skyferry.pipeline.errors import SkyferryError

_PORT = re.compile(r"(\d{1,5})(?:=(\d{1,5}))?(?:/(tcp|udp))?")
GRAMMAR = "PORT[=CONTAINER_PORT][/tcp|/udp], comma-separated: 80,443 or 80=8080 or 53/udp"


@dataclass(frozen=True, order=True)
class PublicPort:
    proto: str
    public: int
    container: int

    def __str__(self) -> str:
        mapped = f"={self.container}" if self.container != self.public else ""
        return f"{self.public}{mapped}/{self.proto}"

    @classmethod
    def parse(cls, text: str) -> "PublicPort":
        m = _PORT.fullmatch(text.strip())
        if not m:
            raise SkyferryError(f"bad public port {text!r}", hint=GRAMMAR)
        public = int(m.group(1))
        container = int(m.group(2) or public)
        if not (0 < public < 65536 and 0 < container < 65536):
            raise SkyferryError(f"bad public port {text!r}: ports are 1-65535", hint=GRAMMAR)
        return cls(m.group(3) or "tcp", public, container)


def parse_list(text: str) -> list[PublicPort]:
    """`80,443/tcp,53/udp` -> sorted ports; refuses one public port listed twice."""
    ports = sorted(PublicPort.parse(p) for p in text.split(",") if p.strip())
    if not ports:
        raise SkyferryError(f"no public ports in {text!r}", hint=GRAMMAR)
    keys = [(p.proto, p.public) for p in ports]
    if len(set(keys)) != len(keys):
        raise SkyferryError(f"a public port is listed twice in {text!r}", hint=GRAMMAR)
    return ports
