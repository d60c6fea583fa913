"""The real cloud-init schema validator (Debian's /usr/bin/cloud-init), run on a rendered document."""

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

CLOUD_INIT = shutil.which("cloud-init") or "/usr/bin/cloud-init"


def schema_check(user_data: str) -> subprocess.CompletedProcess[str]:
    if not Path(CLOUD_INIT).exists():
        pytest.fail("cloud-init is missing: scripts/bootstrap-host.sh installs it")
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        f.write(user_data)
        f.flush()
        return subprocess.run(
            [CLOUD_INIT, "schema", "--config-file", f.name], capture_output=True, text=True, timeout=60
        )


def assert_valid(user_data: str) -> None:
    result = schema_check(user_data)
    assert result.returncode == 0 and "Valid cloud-config" in result.stdout, result.stdout + result.stderr
