#!/usr/bin/env python3
"""Install the controller's own skyferry on a new host, from the controller (cloud-init runs this).

usage: host-install.py URL CA_PIN WHEEL

Trusts the controller's CA only if it matches CA_PIN, then downloads the wheel and the lock over TLS
verified by that CA, and installs them into /opt/skyferry: the locked dependencies from PyPI with their
hashes (skipped on a golden image, which carries them), pycriu from the CRIU tree bootstrap-host.sh
built, then the wheel itself. Standard library only: it runs before anything else is installed.
"""

import hashlib
import os
import ssl
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

VENV = Path("/opt/skyferry")
GOLDEN = Path("/etc/skyferry/golden-image")
CRIU_LIB = Path("/var/cache/skyferry/criu-4.2.1/lib")


def fetch(url: str, ctx: ssl.SSLContext) -> bytes:
    for attempt in range(30):  # the controller's service may start a moment after this host boots
        try:
            with urllib.request.urlopen(url, context=ctx, timeout=60) as reply:
                return reply.read()
        except OSError as exc:
            print(f"waiting for {url}: {exc}", file=sys.stderr)
            __import__("time").sleep(min(2 + attempt, 10))
    sys.exit(f"cannot fetch {url}")


def main(url: str, pin: str, wheel: str) -> None:
    insecure = ssl.create_default_context()
    insecure.check_hostname, insecure.verify_mode = False, ssl.CERT_NONE
    ca = fetch(f"{url}/v1/ca", insecure).decode()
    got = "sha256:" + hashlib.sha256(ssl.PEM_cert_to_DER_cert(ca)).hexdigest()
    if got != pin:
        sys.exit(f"the controller's CA is {got}, not the pinned {pin}: refusing")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "ca.pem").write_text(ca)
        ctx = ssl.create_default_context(cafile=os.path.join(tmp, "ca.pem"))
        for name in (wheel, "requirements.lock"):
            (Path(tmp) / name).write_bytes(fetch(f"{url}/v1/dist/{name}", ctx))
        if not (VENV / "bin" / "python").exists():
            subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        pip = [str(VENV / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        if not GOLDEN.exists():
            subprocess.run([*pip, "--require-hashes", "--no-deps", "-r", f"{tmp}/requirements.lock"], check=True)
            subprocess.run([*pip, "--no-deps", "--no-build-isolation", str(CRIU_LIB)], check=True)
        subprocess.run([*pip, "--no-deps", "--force-reinstall", f"{tmp}/{wheel}"], check=True)


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(*sys.argv[1:])
