"""cloud-init user-data that turns a fresh Debian 12 / Ubuntu 24.04 VM into a skyferry host.

The controller renders one document per host. It carries the host's WireGuard private key, overlay
address and peers (from the mesh in `<state>/skyferry.db`) and its agent's TLS identity (signed by the mesh CA); the
VM runs the repo's own scripts/bootstrap-host.sh (CRIU >= 4.2, WireGuard, runc), installs skyferry into
/opt/skyferry, brings the overlay up with wg-quick and starts `skyferry agent` as a systemd unit. The
host is ready when its agent answers over the overlay. docs/providers.md discusses the key trade-off.
"""

import base64
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from .base import WIREGUARD_PORT
from .errors import ProviderError

BOOTSTRAP_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bootstrap-host.sh"
WG_INTERFACE = "skyferry"
HOST_STATE = "/var/lib/skyferry/host"
VENV = "/opt/skyferry"
AGENT_PORT = 7420
CRIU_LIB = "/var/cache/skyferry/criu-4.2.1/lib"  # where bootstrap-host.sh leaves pycriu's sources


@dataclass(frozen=True)
class Peer:
    public_key: str
    endpoint: str | None  # "addr:port"; None for peers that only dial in
    allowed_ips: list[str]


@dataclass(frozen=True)
class HostBootstrap:
    """Everything one host needs to join the mesh. Private material: render it, never log it."""

    name: str
    mesh: str
    overlay_ip: str
    private_key: str
    peers: list[Peer] = field(default_factory=list)
    listen_port: int = WIREGUARD_PORT
    mtu: int = 1420
    ca_pem: str | None = None
    cert_pem: str | None = None
    key_pem: str | None = None
    skyferry_source: str = "skyferry"  # a pip requirement: a version pin, a wheel URL or git+https URL


def new_wireguard_key() -> tuple[str, str]:
    """(private, public) as base64, like `wg genkey | wg pubkey`, without needing the wg tool here."""
    key = X25519PrivateKey.generate()
    raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode(), base64.b64encode(pub).decode()


def wg_quick_config(b: HostBootstrap) -> str:
    lines = [
        "[Interface]",
        f"PrivateKey = {b.private_key}",
        f"Address = {b.overlay_ip}/32",
        f"ListenPort = {b.listen_port}",
        f"MTU = {b.mtu}",
    ]
    for p in b.peers:
        lines += ["", "[Peer]", f"PublicKey = {p.public_key}", f"AllowedIPs = {', '.join(p.allowed_ips)}"]
        if p.endpoint:
            lines += [f"Endpoint = {p.endpoint}", "PersistentKeepalive = 25"]
    return "\n".join(lines) + "\n"


def agent_unit(b: HostBootstrap) -> str:
    argv = [
        f"{VENV}/bin/skyferry", "agent", "--host", b.name, "--mesh", b.mesh, "--state-root", HOST_STATE,
        "--listen", b.overlay_ip, "--port", str(AGENT_PORT), "--mtu", str(b.mtu),
    ]  # fmt: skip
    return (
        "[Unit]\n"
        "Description=skyferry host agent\n"
        f"After=network-online.target wg-quick@{WG_INTERFACE}.service\n"
        f"Requires=wg-quick@{WG_INTERFACE}.service\n\n"
        "[Service]\n"
        f"ExecStart={shlex.join(argv)}\n"
        "Restart=on-failure\n"
        "RestartSec=2\n\n"
        "[Install]\n"
        "WantedBy=multi-user.target\n"
    )


def render_user_data(b: HostBootstrap) -> str:
    """The #cloud-config document for one host (valid for `cloud-init schema --config-file`)."""
    try:
        bootstrap = BOOTSTRAP_SCRIPT.read_text()
    except OSError:
        raise ProviderError(
            f"cannot read {BOOTSTRAP_SCRIPT}", hint="provision from a skyferry source checkout"
        ) from None
    files = [
        {"path": "/usr/local/sbin/skyferry-bootstrap-host", "permissions": "0755", "content": bootstrap},
        {"path": f"/etc/wireguard/{WG_INTERFACE}.conf", "permissions": "0600", "content": wg_quick_config(b)},
        {"path": "/etc/systemd/system/skyferry-agent.service", "permissions": "0644", "content": agent_unit(b)},
    ]
    tls = {"ca.pem": b.ca_pem, "cert.pem": b.cert_pem, "key.pem": b.key_pem}
    files += [
        {"path": f"{HOST_STATE}/tls/{name}", "permissions": "0600", "content": pem} for name, pem in tls.items() if pem
    ]
    pip = f"{VENV}/bin/pip"
    doc = {
        "hostname": b.name,
        "package_update": True,
        # bootstrap-host.sh installs the rest (CRIU build deps, runc, wireguard-go); these run it.
        "packages": ["ca-certificates", "git", "python3-venv", "wireguard-tools"],
        "write_files": files,
        "runcmd": [
            ["/usr/local/sbin/skyferry-bootstrap-host"],
            ["python3", "-m", "venv", VENV],
            [pip, "install", "-q", "protobuf>=4.21,<6"],
            [pip, "install", "-q", "--no-build-isolation", CRIU_LIB],
            [pip, "install", "-q", b.skyferry_source],
            ["systemctl", "enable", "--now", f"wg-quick@{WG_INTERFACE}"],
            ["systemctl", "daemon-reload"],
            ["systemctl", "enable", "--now", "skyferry-agent.service"],
        ],
        "final_message": f"skyferry host {b.name} up after $UPTIME s; agent on {b.overlay_ip}:{AGENT_PORT}",
    }
    return "#cloud-config\n" + yaml.safe_dump(doc, sort_keys=False, width=1000)
