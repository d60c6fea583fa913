"""Offline static scan of terraform/ with checkov (--skip-download: no Bridgecrew platform calls).

checkov 3.3.30 pins boto3 1.35, networkx 2.6 and packaging 23, which would downgrade this project's own
dependencies, so it lives in its own venv under $SKYFERRY_CACHE (like pipx would), made on first use
(about 290 MB, a minute or two) and reused after that.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]
CHECKOV = "3.3.30"
ROOT = Path(__file__).resolve().parents[2] / "terraform"


@pytest.fixture(scope="session")
def checkov() -> str:
    venv = Path(os.environ.get("SKYFERRY_CACHE", "/var/cache/skyferry")) / f"checkov-{CHECKOV}"
    exe = venv / "bin" / "checkov"
    if not exe.exists():
        shutil.rmtree(venv, ignore_errors=True)
        base = getattr(sys, "_base_executable", sys.executable)  # not this venv's python: a clean venv
        subprocess.run([base, "-m", "venv", str(venv)], check=True, timeout=120)
        pip = subprocess.run(
            [str(venv / "bin" / "pip"), "install", "-q", f"checkov=={CHECKOV}"],
            capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        if pip.returncode != 0:
            shutil.rmtree(venv, ignore_errors=True)
            pytest.fail(f"could not install checkov {CHECKOV}: {pip.stderr[-2000:]}")
    return str(exe)


def scan(checkov: str, directory: Path) -> dict:
    result = subprocess.run(
        [checkov, "-d", str(directory), "--framework", "terraform", "--skip-download", "-o", "json"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "BC_SKIP_MAPPING": "TRUE"},
    )  # fmt: skip
    assert result.stdout.strip(), result.stderr
    return json.loads(result.stdout)


def test_terraform_passes_checkov(checkov: str) -> None:
    report = scan(checkov, ROOT)
    summary = report["summary"]
    failed = [(f["check_id"], f["resource"]) for f in report["results"]["failed_checks"]]
    assert summary["failed"] == 0 and summary["parsing_errors"] == 0, failed
    assert summary["passed"] >= 20
    for skipped in report["results"]["skipped_checks"]:  # every skip in the HCL says why
        assert skipped["check_result"].get("suppress_comment"), skipped["check_id"]


def test_checkov_catches_a_regression(checkov: str, tmp_path: Path) -> None:
    module = tmp_path / "aws-hosts"
    shutil.copytree(ROOT / "modules" / "aws-hosts", module)
    shutil.copytree(ROOT / "modules" / "inventory", tmp_path / "inventory")
    main = module / "main.tf"
    text = main.read_text()
    rule = '    description = "WireGuard between mesh members, which roam across clouds"\n'
    assert rule in text
    main.write_text(text.replace(rule, ""))
    failed = {f["check_id"] for f in scan(checkov, module)["results"]["failed_checks"]}
    assert "CKV_AWS_23" in failed  # a security group rule without a description
