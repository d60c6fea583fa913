"""docs/grafana-dashboard.json has the shape Grafana's own published types give a dashboard: the classic
model of @grafana/schema, each panel's options and field config by its type, each query as Prometheus's
(board-type.ts). The compiler is the checker: the JSON becomes an object literal assigned to a const of
that type, and `tsc --strict` must accept it. Broken copies of it must be refused (the positive control).
Grafana itself cannot run here (docs/observability.md, "What proves the dashboard")."""

import copy
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
BOARD = HERE.parent.parent / "docs" / "grafana-dashboard.json"
# scripts/install-dashboard-check.sh, run by `make venv`, puts the pinned packages beside the venv's python.
NODE_MODULES = Path(sys.prefix) / "dashboard" / "node_modules"
ERROR = re.compile(r"^(?P<file>[\w.-]+\.ts)\(\d+,\d+\): error (?P<message>.*)$")

Board = dict[str, Any]


def _panel_type(board: Board, kind: str) -> Board:
    return next(p for p in board["panels"] if p["type"] == kind)


def _set(path: Callable[[Board], Board], key: str, value: object) -> Callable[[Board], None]:
    def mutate(board: Board) -> None:
        path(board)[key] = value

    return mutate


# Each broken copy, and a piece of the error tsc must give for it.
BROKEN: dict[str, tuple[Callable[[Board], None], str]] = {
    "panel title a number": (
        _set(lambda b: b["panels"][0], "title", 42),
        "'number' is not assignable to type 'string'",
    ),
    "unknown top-level key": (_set(lambda b: b, "refreshEvery", "5s"), '"refreshEvery"\' does not exist'),
    "gridPos without its height": (
        _set(lambda b: b["panels"][0], "gridPos", {"x": 0, "y": 0, "w": 12}),
        "Property 'h' is missing",
    ),
    "gridPos width a string": (
        _set(lambda b: b["panels"][0], "gridPos", {"x": 0, "y": 0, "w": "half", "h": 8}),
        "'string' is not assignable to type 'number'",
    ),
    "timeseries legend mode not Grafana's": (
        _set(lambda b: _panel_type(b, "timeseries")["options"]["legend"], "displayMode", "sideways"),
        '"sideways"',
    ),
    "stat option of another panel": (
        _set(lambda b: _panel_type(b, "stat")["options"], "displayMode", "basic"),
        '"displayMode"\' does not exist',
    ),
    "bargauge option missing": (
        lambda b: _panel_type(b, "bargauge")["options"].pop("valueMode"),
        "Property 'valueMode' is missing",
    ),
    "query key misspelt": (
        _set(lambda b: b["panels"][0]["targets"][0], "legend_format", "{{host}}"),
        '"legend_format"\' does not exist',
    ),
    "datasource by name, not a reference": (
        _set(lambda b: b["panels"][0], "datasource", "Prometheus"),
        "Type 'string' has no properties in common",
    ),
    "panel type without a published schema": (_set(lambda b: b["panels"][0], "type", "graph"), '"graph"'),
    "variable type unknown": (_set(lambda b: b["templating"]["list"][0], "type", "lookup"), '"lookup"'),
}


def _as_module(board: Board) -> str:
    # A JSON text is a TypeScript expression; as a literal its strings keep their literal types.
    return (
        "import type { SkyferryDashboard } from './board-type';\n"
        f"export const dashboard: SkyferryDashboard = {json.dumps(board, indent=1)};\n"
    )


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """tsc's errors per file: the dashboard as committed (dashboard.ts) and each broken copy (broken-N.ts),
    checked in one compiler run."""
    node = shutil.which("node")
    assert node, "node not found: run make host (scripts/bootstrap-host.sh installs nodejs)"
    assert (NODE_MODULES / "typescript").is_dir(), f"{NODE_MODULES} is missing: run make venv"
    work = tmp_path_factory.mktemp("dashboard-schema")
    (work / "node_modules").symlink_to(NODE_MODULES)
    shutil.copy(HERE / "board-type.ts", work)
    shutil.copy(HERE / "tsconfig.json", work)
    board = json.loads(BOARD.read_text())
    files = {"dashboard.ts": board}
    for i, (mutate, _) in enumerate(BROKEN.values()):
        broken = copy.deepcopy(board)
        mutate(broken)
        files[f"broken-{i}.ts"] = broken
    for name, content in files.items():
        (work / name).write_text(_as_module(content))
    run = subprocess.run(
        [node, NODE_MODULES / "typescript" / "bin" / "tsc", "-p", "tsconfig.json", "--pretty", "false"],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=300,
    )
    errors: dict[str, list[str]] = {name: [] for name in files}
    for line in run.stdout.splitlines():
        if found := ERROR.match(line):
            errors[found["file"]].append(found["message"])
        elif not line.startswith(" "):  # tsc indents the rest of a multi-line message
            raise AssertionError(f"tsc said what this test cannot place: {line}\n{run.stdout}{run.stderr}")
    assert run.returncode == (2 if any(errors.values()) else 0), run.stdout + run.stderr
    return errors


def test_dashboard_is_what_grafanas_published_types_accept(compiled: dict[str, list[str]]) -> None:
    assert compiled["dashboard.ts"] == []


@pytest.mark.parametrize("case", list(BROKEN), ids=list(BROKEN))
def test_a_broken_copy_is_refused(compiled: dict[str, list[str]], case: str) -> None:
    errors = compiled[f"broken-{list(BROKEN).index(case)}.ts"]
    expected = BROKEN[case][1]
    assert any(expected in e for e in errors), errors


def test_schema_version_is_one_grafana_migrates_from() -> None:
    """Grafana migrates a dashboard of an older schemaVersion up to its own on load; one newer than the
    types it was checked against would be of a model this test does not know."""
    node = shutil.which("node")
    assert node, "node not found: run make host"
    script = "console.log((await import('@grafana/schema')).defaultDashboard.schemaVersion)"
    latest = subprocess.run(
        [node, "--input-type=module", "-e", script],
        cwd=NODE_MODULES.parent,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert 0 < json.loads(BOARD.read_text())["schemaVersion"] <= int(latest)
