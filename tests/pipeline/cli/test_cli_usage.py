"""Usage errors look like every CLI users know: one line naming the problem, the usage line, exit 2.

Walks the real command tree, so a command added later is covered without touching this file."""

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from skyferry.pipeline.cli import app, main

SKYFERRY = str(Path(sys.executable).with_name("skyferry"))


def _walk(command: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    yield path, command
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        if not sub.hidden:
            yield from _walk(sub, (*path, name))


COMMANDS = list(_walk(typer.main.get_command(app)))
NEEDS_ARGS = [(path, cmd) for path, cmd in COMMANDS if any(p.required for p in cmd.params)]


def _run(argv: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["skyferry", *argv])
    with pytest.raises(SystemExit) as exited:
        main()  # anything but SystemExit (a traceback for the user) fails the test here
    captured = capsys.readouterr()
    return exited.value.code, captured.out + captured.err


def test_the_walk_finds_the_commands() -> None:
    names = {" ".join(path) for path, _ in COMMANDS}
    assert {"migrate", "hosts up", "migrations show", "provision"} <= names  # positive control for the walk
    assert NEEDS_ARGS, "some command takes a required argument"


@pytest.mark.parametrize("path", [p for p, _ in COMMANDS], ids=lambda p: " ".join(p) or "skyferry")
def test_unknown_option_is_a_usage_error(
    path: tuple[str, ...], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out = _run([*path, "--no-such-flag"], capsys, monkeypatch)
    assert code == 2
    assert "Traceback" not in out
    lines = out.strip().splitlines()
    if path == ("hosts", "exec"):  # passes unknown options on to the command, so the command is what is missing
        assert lines[0] == "error: Missing argument 'command'.", out
    else:
        assert lines[0] == "error: No such option: --no-such-flag", out
    assert lines[1].startswith("hint: usage: skyferry"), out
    assert len(lines) == 2, out


@pytest.mark.parametrize("path", [p for p, _ in NEEDS_ARGS], ids=lambda p: " ".join(p))
def test_missing_argument_is_a_usage_error(
    path: tuple[str, ...], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out = _run(list(path), capsys, monkeypatch)
    assert code == 2
    assert "Traceback" not in out
    first = out.strip().splitlines()[0]
    assert first.startswith("error: Missing "), out


def test_mistyped_option_from_the_shell_suggests_the_right_one() -> None:
    """The issue's own example, through the installed entry point."""
    result = subprocess.run([SKYFERRY, "migrate", "web", "--too", "local-2"], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.splitlines()[0] == "error: No such option: --too (did you mean --to?)"
    assert "Traceback" not in result.stderr

    result = subprocess.run([SKYFERRY, "migrate", "--json", "web", "--too", "x"], capture_output=True, text=True)
    assert result.returncode == 2
    body = json.loads(result.stdout)
    assert set(body) == {"error", "hint"}
    assert body["error"].startswith("No such option: --too")
    assert body["hint"].startswith("usage: skyferry migrate")


def test_bad_value_is_a_usage_error(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    code, out = _run(["hosts", "up", "--local", "--count", "many"], capsys, monkeypatch)
    assert code == 2
    assert out.startswith("error: Invalid value for '--count'"), out
