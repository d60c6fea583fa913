"""Which containers exist and on which host: the controller's view, updated by run, rm and migrations."""

import json
import time
from dataclasses import dataclass
from pathlib import Path

from skyferry.pipeline.controller import db
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.hostapi.spec import ContainerSpec


@dataclass(frozen=True)
class Entry:
    name: str
    host: str
    ip: str
    spec: ContainerSpec


class Registry:
    def __init__(self, state: Path) -> None:
        self.conn = db.connect(state)

    def get(self, name: str) -> Entry:
        row = self.conn.execute("SELECT * FROM containers WHERE name=?", (name,)).fetchone()
        if row is None:
            known = ", ".join(e.name for e in self.all()) or "none"
            raise SkyferryError(f"unknown container {name!r}", hint=f"known containers: {known}")
        return Entry(row["name"], row["host"], row["ip"], ContainerSpec.from_dict(json.loads(row["spec"])))

    def find(self, name: str) -> Entry | None:
        try:
            return self.get(name)
        except SkyferryError:
            return None

    def all(self) -> list[Entry]:
        rows = self.conn.execute("SELECT * FROM containers ORDER BY name").fetchall()
        return [Entry(r["name"], r["host"], r["ip"], ContainerSpec.from_dict(json.loads(r["spec"]))) for r in rows]

    def add(self, spec: ContainerSpec, host: str) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO containers (name, host, ip, spec, created) VALUES (?,?,?,?,?)",
            (spec.name, host, spec.ip, json.dumps(spec.to_dict()), time.time()),
        )

    def move(self, name: str, host: str) -> None:
        self.conn.execute("UPDATE containers SET host=? WHERE name=?", (host, name))

    def remove(self, name: str) -> None:
        self.conn.execute("DELETE FROM containers WHERE name=?", (name,))
