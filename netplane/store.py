"""The controller's one database, `<state>/skyferry.db`: netplane's tables here, the controller's added by it.

Every read-modify-write runs in a `BEGIN IMMEDIATE` transaction, so concurrent writers (parallel
evacuations publishing routes, `inventory join`, a migration allocating an address) queue on SQLite's
write lock instead of overwriting each other. State files of older versions (`mesh.toml`, `ipam.json`,
`journal.db`) are imported on first use and renamed to `*.migrated`.
"""

import json
import logging
import os
import sqlite3
import tomllib
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager, suppress
from pathlib import Path
from typing import Any

from tenacity import retry, retry_if_exception, stop_after_delay, wait_random

from .errors import NetplaneError

FILE = "skyferry.db"
BUSY_TIMEOUT_S = 30.0
log = logging.getLogger(__name__)

# One mesh per state directory: the document is a single row (id 1); its members and the container
# homes are one row each, so writers of different members or homes never touch the same row.
SCHEMA = """
CREATE TABLE IF NOT EXISTS ipam (
  id INTEGER PRIMARY KEY CHECK (id = 1), cidr TEXT NOT NULL, last TEXT
);
CREATE TABLE IF NOT EXISTS ipam_allocations (ip TEXT PRIMARY KEY, owner TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS mesh (
  id INTEGER PRIMARY KEY CHECK (id = 1), name TEXT NOT NULL, cidr TEXT NOT NULL, mtu INTEGER NOT NULL,
  listen_port INTEGER NOT NULL, backend TEXT NOT NULL, controller TEXT NOT NULL,
  local TEXT, wan TEXT  -- JSON documents, or NULL
);
CREATE TABLE IF NOT EXISTS mesh_hosts (
  name TEXT PRIMARY KEY, overlay_ip TEXT NOT NULL, endpoint TEXT NOT NULL, public_key TEXT NOT NULL,
  interface TEXT NOT NULL, netns TEXT, state_root TEXT NOT NULL, provider TEXT NOT NULL, pid INTEGER
);
CREATE TABLE IF NOT EXISTS mesh_homes (ip TEXT PRIMARY KEY, host TEXT NOT NULL);
"""
MESH_TABLES = ("mesh", "mesh_hosts", "mesh_homes")
IPAM_TABLES = ("ipam", "ipam_allocations")
HOST_COLUMNS = ("name", "overlay_ip", "endpoint", "public_key", "interface", "netns", "state_root", "provider", "pid")
INSERT_HOST = f"INSERT INTO mesh_hosts ({','.join(HOST_COLUMNS)}) VALUES ({','.join('?' * len(HOST_COLUMNS))})"


def connect(state: Path, schema: str = "") -> sqlite3.Connection:
    """Open the database with netplane's schema and `schema` (the caller's tables); autocommit outside
    explicit transactions. Creates the state directory (0700) and the file (0600: only the controller
    reads the mesh's layout and the containers' specs)."""
    state = Path(state)
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = state / FILE
    # Created here so it is 0600 from the start (SQLite gives -wal and -shm the same mode). Never open an
    # existing database outside SQLite: closing that descriptor would drop this process's locks on it.
    with suppress(FileExistsError):
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    conn.row_factory = sqlite3.Row
    _wal(conn)
    conn.execute("PRAGMA synchronous=FULL")  # a committed transition or allocation survives a power cut
    conn.executescript(SCHEMA + schema)
    if any((state / name).exists() for name in _LEGACY):
        _import_legacy(conn, state)
    return conn


def _locked(e: BaseException) -> bool:
    return isinstance(e, sqlite3.OperationalError) and "database is locked" in str(e)


# Switching to WAL needs a lock SQLite's busy timeout does not wait for: writers opening a new database
# at once got "database is locked" at once (the store's concurrency test, 1 run in 10 under load).
@retry(retry=retry_if_exception(_locked), stop=stop_after_delay(BUSY_TIMEOUT_S), wait=wait_random(0.01, 0.1),
       reraise=True)  # fmt: skip
def _wal(conn: sqlite3.Connection) -> None:
    if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
        conn.execute("PRAGMA journal_mode=WAL")


@contextmanager
def immediate(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """A write transaction that takes the write lock up front: what it reads cannot change under it."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


@contextmanager
def transaction(state: Path, write: bool = True) -> Iterator[sqlite3.Connection]:
    """A short-lived connection in one transaction: IMMEDIATE to write, a consistent snapshot to read."""
    with closing(connect(state)) as conn:
        if write:
            with immediate(conn):
                yield conn
        else:
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                conn.execute("COMMIT")


# --- state files of older versions -------------------------------------------------------------------


def _import_legacy(conn: sqlite3.Connection, state: Path) -> None:
    """Import what old files hold, once, in one transaction; the files become `*.migrated`.

    A file is imported only if the database has its tables and holds none of its data yet; journal.db
    waits for the controller's first open, which brings the controller's schema."""
    moved: list[Path] = []
    with immediate(conn):
        for name, (tables_of, load) in _LEGACY.items():
            path = state / name
            if not path.exists():  # checked under the write lock: another process may have imported it
                continue
            tables = tables_of(path)
            if not _has_tables(conn, tables):
                continue
            if _empty(conn, tables):
                load(conn, path)
            else:
                log.warning("%s not imported: %s already holds that data", path, FILE)
            moved.append(path)
        for path in moved:
            path.rename(_unused(path.with_name(path.name + ".migrated")))
    if moved:
        log.warning("imported old state into %s; renamed %s", state / FILE, ", ".join(p.name for p in moved))


def _unused(path: Path) -> Path:
    """`path`, or `path.N` if it exists: an earlier import's file is never overwritten."""
    n = 0
    while (candidate := path.with_name(f"{path.name}.{n}") if n else path).exists():
        n += 1
    return candidate


def _has_tables(conn: sqlite3.Connection, tables: tuple[str, ...]) -> bool:
    have = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    return set(tables) <= have


def _empty(conn: sqlite3.Connection, tables: tuple[str, ...]) -> bool:
    return all(conn.execute(f"SELECT 1 FROM {t} LIMIT 1").fetchone() is None for t in tables)


def _import_mesh(conn: sqlite3.Connection, path: Path) -> None:
    """mesh.toml: top-level settings, [local], [wan], [controller], [hosts.NAME], [homes]."""
    try:
        data = tomllib.loads(path.read_text())
        members = [data["controller"], *data.get("hosts", {}).values()]
        conn.execute(
            "INSERT INTO mesh (id, name, cidr, mtu, listen_port, backend, controller, local, wan)"
            " VALUES (1,?,?,?,?,?,?,?,?)",
            (
                data["name"], data["cidr"], data.get("mtu", 1420), data.get("listen_port", 51820),
                data.get("backend", "wireguard-go"), data["controller"]["name"],
                json.dumps(data["local"]) if "local" in data else None,
                json.dumps(data["wan"]) if "wan" in data else None,
            ),
        )  # fmt: skip
        conn.executemany(INSERT_HOST, [tuple(m.get(c) for c in HOST_COLUMNS) for m in members])
        conn.executemany("INSERT INTO mesh_homes (ip, host) VALUES (?,?)", data.get("homes", {}).items())
    except (tomllib.TOMLDecodeError, KeyError, TypeError, sqlite3.IntegrityError) as exc:
        raise NetplaneError(f"cannot import {path}: {exc}", hint="fix or move the file away") from None


def _import_ipam(conn: sqlite3.Connection, path: Path) -> None:
    """ipam.json: {"cidr": ..., "last": ip or null, "allocations": {ip: owner}}."""
    try:
        data: dict[str, Any] = json.loads(path.read_text())
        conn.execute("INSERT INTO ipam (id, cidr, last) VALUES (1,?,?)", (data["cidr"], data.get("last")))
        conn.executemany("INSERT INTO ipam_allocations (ip, owner) VALUES (?,?)", data["allocations"].items())
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, sqlite3.IntegrityError) as exc:
        raise NetplaneError(f"cannot import {path}: {exc}", hint="fix or move the file away") from None


def _open_old(path: Path) -> sqlite3.Connection:
    """Read-write, so closing it folds a leftover -wal into the file and removes it: one file to rename."""
    return sqlite3.connect(path)


def _journal_tables(path: Path) -> tuple[str, ...]:
    """The old journal.db's tables: the controller's, which this module copies without knowing them."""
    with closing(_open_old(path)) as old:
        rows = old.execute("SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%'")
        return tuple(sorted(r[0] for r in rows))


def _import_journal(conn: sqlite3.Connection, path: Path) -> None:
    """Copy every table row for row, ids and sequence numbers included."""
    with closing(_open_old(path)) as old:
        for table in _journal_tables(path):
            columns = [r[1] for r in old.execute(f"PRAGMA table_info({table})")]
            rows = old.execute(f"SELECT {','.join(columns)} FROM {table}").fetchall()
            marks = ",".join("?" * len(columns))
            conn.executemany(f"INSERT INTO {table} ({','.join(columns)}) VALUES ({marks})", rows)


def _netplane_tables(tables: tuple[str, ...]) -> Callable[[Path], tuple[str, ...]]:
    return lambda path: tables


_LEGACY: dict[str, tuple[Callable[[Path], tuple[str, ...]], Callable[[sqlite3.Connection, Path], None]]] = {
    "mesh.toml": (_netplane_tables(MESH_TABLES), _import_mesh),
    "ipam.json": (_netplane_tables(IPAM_TABLES), _import_ipam),
    "journal.db": (_journal_tables, _import_journal),
}
