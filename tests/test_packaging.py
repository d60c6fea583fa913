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
