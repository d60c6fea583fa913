"""The three top-level folders install as skyferry.* packages, subpackages included."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAPPED = {"pipeline": "skyferry.pipeline", "providers": "skyferry.providers", "netplane": "skyferry.netplane"}


def test_every_subpackage_is_listed_in_pyproject() -> None:
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = set()
    for folder, package in MAPPED.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            on_disk.add(".".join([package, *rel.parts]) if rel.parts else package)
    assert on_disk == listed


def test_console_entry_point_imports() -> None:
    from skyferry.pipeline.cli import main

    assert callable(main)


def test_the_lock_satisfies_pyproject() -> None:
    """A dependency added or re-ranged in pyproject.toml without `make lock` fails here, not on a fresh host."""
    from packaging.requirements import Requirement

    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if "==" in line and not line.startswith(("#", " ")):
            spec = line.split(" \\")[0]
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate():
                pins[req.name.lower()] = next(iter(req.specifier)).version
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [Requirement(r) for r in [*project["dependencies"], *project["optional-dependencies"]["dev"]]]
    wanted = [r for r in wanted if r.name != "pycriu"]  # built from CRIU's tree (scripts/lock.py)
    assert len(wanted) > 10 and "typer" in pins  # positive control: both sides were read
    for req in wanted:
        assert req.name.lower() in pins, f"{req.name} is not in requirements.lock: run `make lock`"
        assert req.specifier.contains(pins[req.name.lower()]), f"{req} vs lock {pins[req.name.lower()]}: run make lock"


def test_the_migration_runner_loads_neither_numpy_nor_pycriu() -> None:
    """The controller must start fast and run where CRIU is absent; lint-imports checks the static graph,
    this checks what a real import loads."""
    import subprocess
    import sys

    probe = "import sys, skyferry.pipeline.{}; print(sorted(m for m in ('numpy', 'pycriu') if m in sys.modules))"
    runner = subprocess.run(
        [sys.executable, "-c", probe.format("controller.migration")], capture_output=True, text=True
    )
    assert runner.returncode == 0, runner.stderr
    assert runner.stdout.strip() == "[]"
    agent = subprocess.run([sys.executable, "-c", probe.format("agent.server")], capture_output=True, text=True)
    assert agent.stdout.strip() == "['numpy', 'pycriu']"  # positive control: the probe sees what the agent loads
