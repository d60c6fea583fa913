"""Every migration and every stage transition, written before the next step starts.

After a controller crash the journal says exactly which stages ran, so `migrations resume` continues
with the first unfinished stage and `migrations rollback` undoes the started ones in reverse.
"""

import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from skyferry.netplane import store
from skyferry.pipeline.controller import db
from skyferry.pipeline.errors import SkyferryError

# running: a controller is driving it (or crashed while doing so: see `pid`)
# done: the container runs on the target; rolled-back: it runs on the source
# failed: a rollback could not finish; the error says what an operator must check
# abandoned: its hosts were torn down (`hosts down`) while it was unfinished
TERMINAL = ("done", "rolled-back", "abandoned")


@dataclass
class Migration:
    id: str
    container: str
    source: str
    target: str
    mode: str
    state: str
    started: float
    updated: float
    pid: int | None
    error: str | None
    report: dict[str, Any] | None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Journal:
    def __init__(self, state: Path) -> None:
        self.conn = db.connect(state)

    def begin(self, container: str, source: str, target: str, mode: str) -> Migration:
        with store.immediate(self.conn):  # two controllers must not both start moving one container
            active = self.active_for(container)
            if active is not None:
                raise SkyferryError(
                    f"container {container!r} is already in migration {active.id} ({active.state})",
                    hint=f"skyferry migrations resume {active.id}  or  skyferry migrations rollback {active.id}",
                )
            mig_id = time.strftime("m%Y%m%d-%H%M%S-") + secrets.token_hex(2)
            now = time.time()
            self.conn.execute(
                "INSERT INTO migrations (id, container, source, target, mode, state, started, updated, pid)"
                " VALUES (?,?,?,?,?,?,?,?,?)",
                (mig_id, container, source, target, mode, "running", now, now, os.getpid()),
            )
        return self.get(mig_id)

    def get(self, mig_id: str) -> Migration:
        row = self.conn.execute("SELECT * FROM migrations WHERE id=?", (mig_id,)).fetchone()
        if row is None:
            raise SkyferryError(f"unknown migration {mig_id!r}", hint="skyferry migrations ls")
        data = dict(row)
        data["report"] = json.loads(data["report"]) if data["report"] else None
        return Migration(**data)

    def all(self) -> list[Migration]:
        ids = [r["id"] for r in self.conn.execute("SELECT id FROM migrations ORDER BY started")]
        return [self.get(i) for i in ids]

    def active_for(self, container: str) -> Migration | None:
        row = self.conn.execute(
            "SELECT id FROM migrations WHERE container=? AND state NOT IN (?,?,?) ORDER BY started DESC LIMIT 1",
            (container, *TERMINAL),
        ).fetchone()
        return self.get(row["id"]) if row else None

    def claim(self, mig_id: str) -> None:
        """Take over a migration whose controller is gone; refuse if it is still alive."""
        with store.immediate(self.conn):  # of two claimants, the second sees the first's pid
            mig = self.get(mig_id)
            if mig.state == "running" and mig.pid and mig.pid != os.getpid() and pid_alive(mig.pid):
                raise SkyferryError(f"migration {mig_id} is being driven by process {mig.pid}")
            self.conn.execute("UPDATE migrations SET pid=?, updated=? WHERE id=?", (os.getpid(), time.time(), mig_id))

    def set_mode(self, mig_id: str, mode: str) -> None:
        """The migration finishes by another mode than it began with (a pre-copy handed over to hybrid)."""
        with store.immediate(self.conn):
            self.conn.execute("UPDATE migrations SET mode=?, updated=? WHERE id=?", (mode, time.time(), mig_id))

    def transition(self, mig_id: str, stage: str, status: str, detail: Any = None) -> None:
        now = time.time()
        with store.immediate(self.conn):
            self.conn.execute(
                "INSERT INTO transitions (migration, stage, status, at, detail) VALUES (?,?,?,?,?)",
                (mig_id, stage, status, now, json.dumps(detail) if detail is not None else None),
            )
            self.conn.execute("UPDATE migrations SET updated=? WHERE id=?", (now, mig_id))

    def transitions(self, mig_id: str) -> list[dict[str, Any]]:
        rows = self.conn.execute(
            "SELECT stage, status, at, detail FROM transitions WHERE migration=? ORDER BY seq", (mig_id,)
        ).fetchall()
        return [{**dict(r), "detail": json.loads(r["detail"]) if r["detail"] else None} for r in rows]

    def stage_status(self, mig_id: str) -> dict[str, str]:
        """The latest status of every stage that was touched, in the order they were first started."""
        status: dict[str, str] = {}
        for t in self.transitions(mig_id):
            status[t["stage"]] = t["status"]
        return status

    def abandon(self, hosts: list[str]) -> list[str]:
        """Close every unfinished migration that involves one of `hosts` (they no longer exist)."""
        marks = ",".join("?" * len(hosts))
        rows = self.conn.execute(
            f"SELECT id FROM migrations WHERE state NOT IN (?,?,?) AND (source IN ({marks}) OR target IN ({marks}))",
            (*TERMINAL, *hosts, *hosts),
        ).fetchall()
        for row in rows:
            self.finish(row["id"], "abandoned", error=f"hosts torn down: {', '.join(hosts)}")
        return [row["id"] for row in rows]

    def forget(self, mig_id: str) -> None:
        """Remove a migration and its transitions: an estimate that was undone leaves nothing behind."""
        with store.immediate(self.conn):
            self.conn.execute("DELETE FROM transitions WHERE migration=?", (mig_id,))
            self.conn.execute("DELETE FROM migrations WHERE id=?", (mig_id,))

    def finish(self, mig_id: str, state: str, error: str | None = None, report: dict[str, Any] | None = None) -> None:
        self.conn.execute(
            "UPDATE migrations SET state=?, error=?, report=COALESCE(?, report), updated=? WHERE id=?",
            (state, error, json.dumps(report) if report is not None else None, time.time(), mig_id),
        )


def pid_alive(pid: int) -> bool:
    """Whether process `pid` still runs (a migration whose driving controller died is unowned)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
