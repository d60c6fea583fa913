"""What a failed CRIU run says: the first error that names a cause, and the log's tail for the journal.

CRIU logs every error it meets on the way out, so its last lines ("Dumping FAILED.") say only that it
failed; the first `Error (file:line):` usually names the resource and the process it refused.
"""

import re
from pathlib import Path

from skyferry.pipeline.errors import SkyferryError

ERROR = re.compile(r"(?:\((?P<pid>\d+)\)|\b(?P<task>\d+):)?\s*Error \([^)]*\):\s*(?P<what>.+)")
# Summaries and the consequences of an earlier error, never its cause.
NOISE = re.compile(r"FAILED|rlimit|Dump core \(pid: \d+\) failed|Can't dump task|criu failed|exited, status=")
TAIL_LINES = 80


def first_error(text: str) -> str | None:
    """The first error line that is not a summary, without CRIU's timestamp and source location."""
    for line in text.splitlines():
        match = ERROR.search(line)
        if match and not NOISE.search(match["what"]):
            task = match["task"]
            return f"{match['what'].strip()}" + (f" (task {task})" if task else "")
    return None


def tail(text: str, lines: int = TAIL_LINES) -> str:
    return "\n".join(text.splitlines()[-lines:])


def read(log: Path | None) -> str:
    """The log's text, or "" where CRIU wrote none (runc failed before it started CRIU)."""
    try:
        return log.read_text(errors="replace") if log else ""
    except OSError:
        return ""


def failure(what: str, engine: str, output: str, fallback: str, log: Path | None) -> SkyferryError:
    """`what failed: <CRIU's first real error>` (else `fallback`, the engine's own line), carrying the
    engine's output and CRIU's log tail for the journal (`skyferry migrations show ID`)."""
    text = read(log)
    record = f"--- {engine}\n{tail(output)}"
    if text and log:
        record += f"\n--- CRIU {log.name}\n{tail(text)}"
    return SkyferryError(f"{what} failed: {first_error(text) or fallback}", log=record)
