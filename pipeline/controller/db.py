"""The controller's tables in the one store (`<state>/skyferry.db`, opened by netplane.store).

Every schema the controller owns is here: the container registry, the journal, join tokens, the
certificates the mesh CA signed (and which are revoked), the cloud-exit plans' progress and the freezes'
fixed costs per host pair (freezecost.py). netplane's own tables (IPAM, the mesh) live in the same file,
defined in netplane.store.
"""

import sqlite3
from pathlib import Path

from skyferry.netplane import store

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
CREATE TABLE IF NOT EXISTS join_tokens (
  id TEXT PRIMARY KEY, secret_sha256 TEXT NOT NULL, host TEXT NOT NULL, provider TEXT NOT NULL,
  created REAL NOT NULL, expires REAL NOT NULL, used REAL
);
CREATE TABLE IF NOT EXISTS joins (
  host TEXT PRIMARY KEY, kernel TEXT NOT NULL, wireguard TEXT NOT NULL, at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS certs (
  serial TEXT PRIMARY KEY, subject TEXT NOT NULL, not_after REAL NOT NULL, issued REAL NOT NULL, revoked REAL
);
CREATE TABLE IF NOT EXISTS freeze_costs (
  source TEXT NOT NULL, target TEXT NOT NULL, mode TEXT NOT NULL, fixed_ms REAL NOT NULL, samples INTEGER NOT NULL,
  updated REAL NOT NULL, PRIMARY KEY (source, target, mode)
);
CREATE TABLE IF NOT EXISTS exit_progress (
  plan TEXT NOT NULL, step TEXT NOT NULL, status TEXT NOT NULL, detail TEXT, updated REAL NOT NULL,
  PRIMARY KEY (plan, step)
);
"""


def connect(state: Path) -> sqlite3.Connection:
    """A connection to the store with the controller's tables; autocommit, `store.immediate` to write
    after reading."""
    return store.connect(state, SCHEMA)
