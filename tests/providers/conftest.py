"""Fixtures for the provider tests: moto's real HTTP server (AWS) and a stateful fake of GCE's REST API."""

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from kit.gce_fake import GceFake, new_service_account
from kit.moto_server import PatchedMotoServer
from kit.vms import Session, vm_session


@pytest.fixture(scope="session")
def vms(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Session]:
    """One local host and two VMs in one mesh, shared by every VM test of the run (kit/vms.py)."""
    yield from vm_session(tmp_path_factory)


@pytest.fixture(scope="session")
def moto_server() -> Iterator[PatchedMotoServer]:
    server = PatchedMotoServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def aws_env(moto_server: PatchedMotoServer, monkeypatch: pytest.MonkeyPatch) -> str:
    """Fake credentials and the endpoint variable the CLI reads; no real AWS config is consulted."""
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": "/nonexistent",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
        "AWS_EC2_METADATA_DISABLED": "true",
        "SKYFERRY_AWS_ENDPOINT_URL": moto_server.url,
    }.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION"):
        monkeypatch.delenv(key, raising=False)
    return moto_server.url


@pytest.fixture
def plan(run_id: str) -> str:
    """A plan name unique to this test: moto's state lives as long as the session."""
    return f"p{run_id}"


@pytest.fixture
def gce(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_id: str) -> Iterator[GceFake]:
    """A fresh GCE fake and a service-account key it trusts, exported the way users export theirs."""
    project = f"skyferry-{run_id}"
    fake = GceFake(project).start()
    info, public_key = new_service_account(project, token_uri=f"{fake.url}/token")
    fake.trust(info["client_email"], public_key)
    key_file = tmp_path / "sa.json"
    key_file.write_text(json.dumps(info))
    key_file.chmod(0o600)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key_file))
    monkeypatch.setenv("SKYFERRY_GCE_ENDPOINT_URL", fake.url)
    monkeypatch.setenv("HOME", str(tmp_path))  # libcloud caches tokens under ~
    for key in ("SKYFERRY_GCP_PROJECT", "GOOGLE_CLOUD_PROJECT", "SKYFERRY_GCP_ZONE"):
        monkeypatch.delenv(key, raising=False)
    try:
        yield fake
    finally:
        fake.stop()
