"""Fixtures for the provider tests: moto's real HTTP server (AWS) and a stateful fake of GCE's REST API."""

from collections.abc import Iterator

import pytest

from moto_server import PatchedMotoServer


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
