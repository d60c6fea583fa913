"""The join protocol: how a machine made elsewhere becomes a mesh member, without a private key ever
leaving it. One schema for both ends (the controller's enrolment service, `skyferry join` on the host).

    host                                        controller (enrolment service, JOIN_PORT)
    GET  /v1/ca            ------------------>  the mesh CA; the host checks it against the pin it was given
    POST /v1/join          ------------------>  token, name, WireGuard public key, CSR
                           <------------------  overlay address, certificate, peers, mesh settings
    GET  /v1/dist/FILE     ------------------>  the controller's own skyferry wheel and requirements.lock

A token is `<id>.<secret>`: the controller stores only the secret's hash, and a token is good for one
join before it expires.
"""

import re

from pydantic import BaseModel, Field
from skyferry.netplane.routes import PeerConfig
from skyferry.pipeline.hostapi.revocation import RevocationList

JOIN_PORT = 7421
HOST_NAME = r"^[a-z][a-z0-9-]{0,62}$"
TOKEN = re.compile(r"^([0-9a-f]{12})\.([0-9a-f]{32})$")
WG_KEY = r"^[A-Za-z0-9+/]{42}[AEIMQUYcgkosw480]=$"


class JoinRequest(BaseModel):
    token: str = Field(pattern=TOKEN.pattern)
    name: str = Field(pattern=HOST_NAME)
    wireguard_public_key: str = Field(pattern=WG_KEY)
    endpoint: str | None = Field(default=None, max_length=64)  # "addr:port"; None: the caller's address
    csr_pem: str = Field(max_length=8192)
    kernel: str = Field(default="", max_length=128)
    wireguard: str = Field(default="", max_length=32)  # "kernel" or "wireguard-go"


class JoinAnswer(BaseModel):
    mesh: str
    name: str
    overlay_ip: str
    cidr: str
    listen_port: int
    mtu: int
    cert_pem: str
    ca_pem: str
    peers: list[PeerConfig]
    revoked: RevocationList = Field(default_factory=RevocationList)  # refused from the agent's first connection
