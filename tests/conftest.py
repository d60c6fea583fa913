"""Shared fixtures. Everything a test creates carries a unique per-run prefix and is removed even on failure."""

import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest


def needs_root() -> pytest.MarkDecorator:
    return pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


@pytest.fixture
def run_id() -> str:
    """A short unique id for kernel objects (netns, interfaces, cgroups); fits interface-name limits."""
    return "t" + secrets.token_hex(2)


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private controller state directory for one test."""
    path = tmp_path / "state"
    path.mkdir(mode=0o700)
    monkeypatch.setenv("SKYFERRY_STATE", str(path))
    yield path
    shutil.rmtree(path, ignore_errors=True)
