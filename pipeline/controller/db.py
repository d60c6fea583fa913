"""The controller's SQLite database (`<state>/journal.db`): the container registry and the journal."""

import sqlite3
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS containers (
  name TEXT PRIMARY KEY, host TEXT NOT NULL, ip TEXT NOT NULL, spec TEXT NOT NULL, created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS migrations (
  id TEXT PRIMARY KEY, container TEXT NOT NULL, source TEXT NOT NULL, target TEXT NOT NULL,
  mode TEXT NOT NULL, state TEXT NOT NULL, started REAL NOT NULL, updated REAL NOT NULL,
  pid INTEGER, error TEXT, report TEXT
);
CREATE TABLE IF NOT EXISTS transitions (
  seq INTEGER PRIMARY KEY AUTOINCREMENT, migration TEXT NOT NULL REFERENCES migrations(id),
  stage TEXT NOT NULL, status TEXT NOT NULL, at REAL NOT NULL, detail TEXT
);
"""


def connect(state: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(state / "journal.db", timeout=30, isolation_level=None)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")  # a recorded transition survives a power cut
    conn.executescript(SCHEMA)
    return conn
