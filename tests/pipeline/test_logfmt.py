"""--log-format: the context a line carries, in JSON and in text (pipeline/logfmt.py)."""

import json
import logging
import threading

from skyferry.pipeline import logfmt


def _line(formatter: logging.Formatter, message: str = "restore started") -> str:
    return formatter.format(logging.LogRecord("skyferry.t", logging.INFO, __file__, 1, message, None, None))


def test_a_json_line_carries_the_bound_context_and_only_inside_its_block() -> None:
    formatter = logfmt.JsonFormatter({"host": "local-2"})
    with logfmt.bound(migration="m1", container="web"):
        logfmt.tag(stage="restore")
        inside = json.loads(_line(formatter))
    after = json.loads(_line(formatter))
    assert inside["migration"] == "m1" and inside["container"] == "web" and inside["stage"] == "restore"
    assert inside["host"] == "local-2" and inside["message"] == "restore started" and inside["level"] == "info"
    assert "migration" not in after and "stage" not in after and after["host"] == "local-2"


def test_a_text_line_names_the_context_in_brackets() -> None:
    formatter = logfmt.TextFormatter({})
    with logfmt.bound(migration="m1", stage="check"):
        line = _line(formatter, "check done")
    assert " INFO [migration=m1 stage=check] check done" in line
    assert "[" not in _line(formatter)


def test_a_thread_started_inside_a_step_does_not_inherit_its_context() -> None:
    """As documented: Python copies no context into a new thread."""
    formatter = logfmt.JsonFormatter({})
    seen: list[dict[str, str]] = []
    with logfmt.bound(migration="m1"):
        t = threading.Thread(target=lambda: seen.append(json.loads(_line(formatter))))
        t.start()
        t.join()
        assert json.loads(_line(formatter))["migration"] == "m1"
    assert "migration" not in seen[0]


def test_a_tag_outside_any_block_is_dropped() -> None:
    """Nothing would end it: it would label every later line of the thread."""
    formatter = logfmt.JsonFormatter({})
    logfmt.tag(stage="restore")
    assert "stage" not in json.loads(_line(formatter))
    with logfmt.bound(migration="m1"):  # positive control: inside a block the tag is carried
        logfmt.tag(stage="restore")
        assert json.loads(_line(formatter))["stage"] == "restore"
