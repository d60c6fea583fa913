"""Log lines for people and for log pipelines: `--log-format text|json` on the agent and the CLI.

JSON is one object per line: time, level, logger, message, and the context bound where the line was
logged: the host (an agent's own, on every line it writes), and inside a migration step its id
(`migration`), `container` and `stage`. The context lives in contextvars, bound by `bound()` around a
step (the agent's) or a stage (the controller's), so every line logged inside carries it, whichever
module logs it. Threads a step starts itself begin without it (Python copies no context into a new
thread).

What is logged never holds secrets: no request body (container specs carry environment values, join
requests their token) is ever logged, only routes, names and errors (docs/observability.md).
"""

import contextlib
import contextvars
import datetime as dt
import json
import logging
import sys
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Any

FORMATS = ("text", "json")
FIELDS = ("host", "migration", "container", "stage")
_context: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar(
    "skyferry_log_context", default=MappingProxyType({})
)
_inside: contextvars.ContextVar[bool] = contextvars.ContextVar("skyferry_log_bound", default=False)
active: str | None = None  # what `configure` set up in this process, if anything


@contextlib.contextmanager
def bound(**fields: str | None) -> Iterator[None]:
    """Every line logged in this block (in this thread or context) carries `fields` (None: left out)."""
    token = _context.set(MappingProxyType({**_context.get(), **{k: v for k, v in fields.items() if v is not None}}))
    inside = _inside.set(True)
    try:
        yield
    finally:
        _inside.reset(inside)
        _context.reset(token)


def tag(**fields: str) -> None:
    """Carry `fields` from here to the end of the enclosing `bound` block (the stage a loop is in). Outside
    any block it does nothing: nothing would end it, and every later line of the thread would carry it."""
    if _inside.get():
        _context.set(MappingProxyType({**_context.get(), **fields}))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: `fixed` fields (the agent's host), the bound context, the record's own."""

    def __init__(self, fixed: Mapping[str, str]) -> None:
        super().__init__()
        self.fixed = dict(fixed)

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            **self.fixed,
            **_context.get(),
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class TextFormatter(logging.Formatter):
    """The classic line, with the bound context in brackets when there is one."""

    def __init__(self, fixed: Mapping[str, str]) -> None:
        super().__init__("%(asctime)s %(name)s %(levelname)s %(message)s")
        self.fixed = dict(fixed)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ctx = {**self.fixed, **_context.get()}
        if not ctx:
            return line
        head, _, rest = line.partition(f" {record.levelname} ")
        tags = " ".join(f"{k}={ctx[k]}" for k in FIELDS if k in ctx)
        return f"{head} {record.levelname} [{tags}] {rest}"


def configure(fmt: str, level: int = logging.INFO, **fixed: str) -> None:
    """Send every log line to stderr in `fmt`, each with the `fixed` fields (the agent: its host), replacing
    handlers configured before."""
    global active
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r}: text or json")
    active = fmt
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(fixed) if fmt == "json" else TextFormatter(fixed))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
