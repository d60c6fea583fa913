"""`skyferry join`: this machine becomes a host of a mesh. Its WireGuard key and TLS key are made here and
never leave it; the controller gets the public halves and a signing request (hostapi/enrolment.py).

What it leaves behind is one readable description each: /etc/wireguard/skyferry.conf (wg-quick) and
skyferry-agent.service, both started through systemd, so the host comes back by itself after a reboot.
"""

import ipaddress
import json
import os
import platform
import shlex
import shutil
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from skyferry.netplane import wg
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.hostapi import pki
from skyferry.pipeline.hostapi.enrolment import JoinAnswer, JoinRequest
from skyferry.pipeline.hostapi.layout import AGENT_PORT, HOST_STATE, WG_CONFIG, WG_INTERFACE
from skyferry.pipeline.hostapi.revocation import RevokedFile


@dataclass(frozen=True)
class Layout:
    """Where a joined host keeps what `join` writes (a test points it elsewhere)."""

    state_root: Path = HOST_STATE
    wg_config: Path = WG_CONFIG
    agent_unit: Path = Path("/etc/systemd/system/skyferry-agent.service")


MACHINE = Layout()


def fetch_ca(url: str, pin: str, timeout: float = 30.0) -> bytes:
    """The controller's CA, trusted only if it matches `pin` (the TLS of this one call proves nothing)."""
    insecure = ssl.create_default_context()
    insecure.check_hostname, insecure.verify_mode = False, ssl.CERT_NONE
    ca = _call(f"{url}/v1/ca", insecure, timeout=timeout)
    try:
        got = pki.pin(ca)
    except ValueError:
        raise SkyferryError(f"{url} did not send a CA certificate") from None
    if got != pin:
        raise SkyferryError(
            f"the controller at {url} has CA {got}, not the pinned {pin}",
            hint="check the join command you were given; someone may be in between",
        )
    return ca


def join(
    url: str,
    token: str,
    pin: str,
    name: str,
    endpoint: str | None = None,
    start: bool = True,
    layout: Layout = MACHINE,
) -> dict[str, Any]:
    """Join the mesh behind `url` as `name`; returns what the host now is."""
    if layout.wg_config.exists():
        raise SkyferryError(
            f"this machine already joined a mesh ({layout.wg_config} exists)",
            hint="to join another, remove that file and the skyferry-agent unit first",
        )
    ca = fetch_ca(url, pin)
    tls = layout.state_root / "tls"
    tls.mkdir(parents=True, exist_ok=True, mode=0o700)
    (tls / "ca.pem").write_bytes(ca)
    public_key = wg.genkey(layout.state_root / "wireguard")
    backend = wg.choose_backend(None)
    req = JoinRequest(
        token=token, name=name, wireguard_public_key=public_key, endpoint=endpoint,
        csr_pem=pki.make_csr(name, tls / "key.pem"), kernel=platform.release(), wireguard=backend,
    )  # fmt: skip
    verified = ssl.create_default_context(cafile=str(tls / "ca.pem"))
    answer = JoinAnswer.model_validate_json(_call(f"{url}/v1/join", verified, req.model_dump_json().encode()))
    (tls / "cert.pem").write_text(answer.cert_pem)
    RevokedFile(tls / "revoked.json").write(answer.revoked)
    private = (layout.state_root / "wireguard" / "private.key").read_text().strip()
    _write_private(layout.wg_config, wg_quick_config(answer, private))
    layout.agent_unit.write_text(agent_unit(answer, layout.state_root))
    if start:
        _systemctl("daemon-reload")
        _systemctl("enable", "--now", f"wg-quick@{WG_INTERFACE}")
        _systemctl("enable", "--now", layout.agent_unit.name)
    return {
        "name": name, "mesh": answer.mesh, "overlay_ip": answer.overlay_ip, "kernel": platform.release(),
        "wireguard": wg.backend_of(None, WG_INTERFACE) or backend, "peers": len(answer.peers),
    }  # fmt: skip


def wg_quick_config(answer: JoinAnswer, private_key: str) -> str:
    lines = [
        "# Written by `skyferry join`; peers change at run time through the agent (PUT /v1/mesh/peers).",
        "[Interface]",
        f"PrivateKey = {private_key}",
        # The whole overlay through this interface: peers added later at run time (`wg set`) get no route
        # of their own from wg-quick, which routes only the allowed-ips it saw at `up`.
        f"Address = {answer.overlay_ip}/{ipaddress.ip_network(answer.cidr).prefixlen}",
        f"ListenPort = {answer.listen_port}",
        f"MTU = {answer.mtu}",
        "PostUp = sysctl -qw net.ipv4.ip_forward=1",
        # Only wireguard-go (no kernel module) has a TUN queue to drop from: netplane/wg.py.
        f"PostUp = ip link set dev %i txqueuelen {wg.TUN_QUEUE}",
    ]
    for p in answer.peers:
        lines += ["", "[Peer]", f"PublicKey = {p.public_key}", f"AllowedIPs = {', '.join(p.allowed_ips)}"]
        if p.endpoint:
            lines.append(f"Endpoint = {p.endpoint}")
        if p.keepalive:
            lines.append(f"PersistentKeepalive = {p.keepalive}")
    return "\n".join(lines) + "\n"


# `$$` is systemd's escape for a literal `$`.
FAVOR_DYNMODS = (
    'm=$$(findmnt -rn -t cgroup2 -o TARGET | head -1); o=$$(findmnt -rn -o OPTIONS "$$m"); '
    'case ",$$o," in *,favordynmods,*|,,) ;; *) mount -o "remount,$$o,favordynmods" "$$m" ;; esac'
)


def agent_unit(answer: JoinAnswer, state_root: Path) -> str:
    argv = [
        str(Path(sys.executable).parent / "skyferry"), "agent", "--host", answer.name, "--mesh", answer.mesh,
        "--state-root", str(state_root), "--listen", answer.overlay_ip, "--port", str(AGENT_PORT),
        "--mtu", str(answer.mtu), "--wg-interface", WG_INTERFACE,
    ]  # fmt: skip
    return (
        "[Unit]\n"
        "Description=skyferry host agent\n"
        f"After=network-online.target wg-quick@{WG_INTERFACE}.service\n"
        f"Requires=wg-quick@{WG_INTERFACE}.service\n\n"
        "[Service]\n"
        # runc's restore moves CRIU into the container's cgroup inside the freeze: favordynmods spares each
        # move an RCU grace period (docs/host-setup.md). A remount replaces every option: repeat them.
        f"ExecStartPre=-/bin/sh -c {shlex.quote(FAVOR_DYNMODS)}\n"
        f"ExecStart={shlex.join(argv)}\n"
        "Restart=on-failure\n"
        "RestartSec=2\n\n"
        "[Install]\n"
        "WantedBy=multi-user.target\n"
    )


def _call(url: str, ctx: ssl.SSLContext, body: bytes | None = None, timeout: float = 60.0) -> bytes:
    headers = {"Content-Type": "application/json"} if body is not None else {}
    request = urllib.request.Request(url, data=body, headers=headers, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(request, context=ctx, timeout=timeout) as reply:
            return bytes(reply.read())
    except urllib.error.HTTPError as exc:
        try:
            detail = json.loads(exc.read())
        except ValueError:
            detail = {"error": exc.reason, "hint": None}
        raise SkyferryError(f"the controller refused: {detail.get('error')}", hint=detail.get("hint")) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise SkyferryError(
            f"cannot reach the controller at {url}: {reason}", hint="is the join being served (skyferry hosts join)?"
        ) from None


def _systemctl(*args: str) -> None:
    if not shutil.which("systemctl"):
        raise SkyferryError("systemd is needed to run the agent", hint="pass --no-start and run them yourself")
    done = subprocess.run(["systemctl", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SkyferryError(f"systemctl {' '.join(args)} failed: {done.stderr.strip()[-300:]}")


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
