"""cloud-init user-data that turns a fresh Debian 12 / Ubuntu 24.04 VM into a skyferry host.

The document carries no key. It holds the host's name, the controller's enrolment URL, the pin of the
mesh CA and a one-time join token (worthless once used or expired). The VM runs the repo's own
scripts/bootstrap-host.sh (CRIU >= 4.2, WireGuard, runc) unless it boots a skyferry golden image,
installs the controller's own wheel with scripts/host-install.py, and runs `skyferry join`, which makes
the host's keys on the host and starts WireGuard and the agent. docs/providers.md explains the flow.
"""

from dataclasses import dataclass
from pathlib import Path

import yaml

from .errors import ProviderError

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
BOOTSTRAP_SCRIPT = SCRIPTS / "bootstrap-host.sh"
INSTALL_SCRIPT = SCRIPTS / "host-install.py"
VENV = "/opt/skyferry"
GOLDEN = "/etc/skyferry/golden-image"  # a VM image that already carries what bootstrap-host.sh installs


@dataclass(frozen=True)
class HostBootstrap:
    """What one host needs to join the mesh. `token` is a secret until it is used: never log it."""

    name: str
    join_url: str  # https://CONTROLLER:7421
    ca_pin: str  # sha256:… of the mesh CA
    token: str
    wheel: str  # the file name the enrolment service serves under /v1/dist/


def _script(path: Path) -> str:
    """The script as the host runs it. A shell script goes without its comment lines: EC2 caps user-data at
    16 KiB, and the repo keeps the documented copy."""
    try:
        text = path.read_text()
    except OSError:
        raise ProviderError(f"cannot read {path}", hint="provision from a skyferry source checkout") from None
    if path.suffix != ".sh":
        return text
    shebang, *body = text.splitlines()
    return "\n".join([shebang, *(line for line in body if not line.lstrip().startswith("#"))]) + "\n"


def render_user_data(b: HostBootstrap) -> str:
    """The #cloud-config document for one host (valid for `cloud-init schema --config-file`)."""
    scripts = {"skyferry-bootstrap-host": BOOTSTRAP_SCRIPT, "skyferry-install": INSTALL_SCRIPT}
    files = [
        {"path": f"/usr/local/sbin/{name}", "permissions": "0755", "content": _script(path)}
        for name, path in scripts.items()
    ]
    doc = {
        "hostname": b.name,
        "write_files": files,
        "runcmd": [
            ["sh", "-c", f"[ -e {GOLDEN} ] || /usr/local/sbin/skyferry-bootstrap-host"],
            ["python3", "/usr/local/sbin/skyferry-install", b.join_url, b.ca_pin, b.wheel],
            [f"{VENV}/bin/skyferry", "join", b.join_url, "--name", b.name, "--token", b.token, "--ca-pin", b.ca_pin],
        ],
        "final_message": f"skyferry host {b.name} joined after $UPTIME s",
    }
    return "#cloud-config\n" + yaml.safe_dump(doc, sort_keys=False, width=1000)
