"""The one store: row-level writes, concurrent writers in separate processes, import of old state files."""

import json
import logging
import multiprocessing
import queue
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from contextlib import closing
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import storeworkers
from kit.net import state_left
from skyferry.netplane import store
from skyferry.netplane.errors import NetplaneError
from skyferry.netplane.ipam import Ipam
from skyferry.netplane.mesh import Local, Mesh, MeshHost, Wan

WORKERS, ROUNDS = 4, 6


def _member(name: str, ip: str, pid: int | None = None) -> MeshHost:
    return MeshHost(name, ip, f"198.18.0.{ip.rsplit('.', 1)[1]}:51820", f"key-{name}", f"m-{name}", f"m-{name}",
                    f"/s/{name}", "local", pid)  # fmt: skip


def _mesh(state: Path) -> Mesh:
    mesh = Mesh(
        "m1",
        "100.64.0.0/16",
        _member("controller", "100.64.0.1"),
        {f"local-{k}": _member(f"local-{k}", f"100.64.0.{k + 1}") for k in (1, 2, 3)},
        homes={"100.64.0.9": "local-1"},
    )
    mesh.save(state)
    return mesh


def test_a_stale_writer_changes_only_its_own_rows(tmp_path: Path) -> None:
    _mesh(tmp_path)
    stale, other = Mesh.load(tmp_path), Mesh.load(tmp_path)
    other.set_home("100.64.0.9", "local-2")  # a migration moved the container
    other.remove_host("local-3")  # inventory leave
    other.hosts["local-2"].endpoint = "198.18.0.99:51820"
    other.persist()
    stale.hosts["local-1"].pid = 7  # loaded before all of that, saved after it
    stale.homes["100.64.0.10"] = "local-1"
    stale.save(tmp_path)
    now = Mesh.load(tmp_path)
    assert now.homes == {"100.64.0.9": "local-2", "100.64.0.10": "local-1"}
    assert sorted(now.hosts) == ["local-1", "local-2"] and now.hosts["local-1"].pid == 7
    assert now.hosts["local-2"].endpoint == "198.18.0.99:51820"


def test_home_changes_see_every_other_writer_and_roll_back_on_failure(tmp_path: Path) -> None:
    _mesh(tmp_path)
    stale = Mesh.load(tmp_path)
    Mesh.load(tmp_path).set_home("100.64.0.20", "local-3")
    seen: dict[str, Any] = {}
    previous = stale.set_home("100.64.0.9", "local-2", lambda prev: seen.update(prev=prev, homes=dict(stale.homes)))
    assert previous == seen["prev"] == "local-1"
    assert seen["homes"] == {"100.64.0.9": "local-2", "100.64.0.20": "local-3"}  # the other writer's home too

    def fail(_: str | None) -> None:
        raise RuntimeError("wg set failed")

    with pytest.raises(RuntimeError):
        stale.remove_home("100.64.0.20", then=fail)
    assert Mesh.load(tmp_path).homes == {"100.64.0.9": "local-2", "100.64.0.20": "local-3"}
    assert stale.remove_home("100.64.0.20") == "local-3" and stale.remove_home("100.64.0.20") is None
    assert Mesh.load(tmp_path).homes == {"100.64.0.9": "local-2"}


def test_a_new_mesh_does_not_overwrite_another_and_delete_empties_the_store(tmp_path: Path) -> None:
    _mesh(tmp_path)
    Ipam(tmp_path, "100.64.0.0/16").allocate("host:local-1")
    with pytest.raises(NetplaneError, match="mesh m1 is already recorded"):
        Mesh("m2", "100.64.0.0/16", _member("controller", "100.64.0.1")).save(tmp_path)
    Mesh.delete(tmp_path)
    Ipam.drop(tmp_path)
    assert not Mesh.exists(tmp_path) and Ipam(tmp_path).allocations() == {}
    assert state_left(tmp_path) == []
    assert (tmp_path / store.FILE).stat().st_mode & 0o777 == 0o600


def _run(writer: Callable[..., None], state: Path) -> list[list[str]]:
    """WORKERS processes running `writer` at once; the addresses each was handed, by worker."""
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Barrier(WORKERS), ctx.Queue()
    procs = [ctx.Process(target=writer, args=(str(state), w, ROUNDS, start, out)) for w in range(WORKERS)]
    for p in procs:
        p.start()
    results: dict[int, list[str]] = {}
    while len(results) < WORKERS:
        try:
            worker, got = out.get(timeout=1)
            results[worker] = got
        except queue.Empty:
            assert all(p.exitcode in (None, 0) for p in procs), "a writer failed"
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    return [results[w] for w in range(WORKERS)]


def _lost(hosts: dict[str, str], homes: dict[str, str], results: list[list[str]]) -> list[str]:
    """Every write the workers made that is not there now (hosts by name and address, homes by address)."""
    lost = []
    for worker, got in enumerate(results):
        for i in range(ROUNDS):
            host = storeworkers.names(worker, i)[0]
            host_ip, ip_a, ip_b = got[3 * i : 3 * i + 3]
            lost += [f"host {host}"] if hosts.get(host) != host_ip else []
            lost += [f"home {ip}" for ip in (ip_a, ip_b) if homes.get(ip) != host]
    return lost


def _assert_unique(state: Path, results: list[list[str]], seeded: dict[str, str] | None = None) -> None:
    handed = [ip for got in results for ip in got]
    assert len(handed) == WORKERS * ROUNDS * 3 and len(set(handed)) == len(handed), "an address was handed out twice"
    assert not set(handed) & set(seeded or {}), "an address held before was handed out"
    assert sorted(Ipam(state).allocations()) == sorted([*handed, *(seeded or {})])


def test_concurrent_processes_lose_no_update(tmp_path: Path) -> None:
    ipam = Ipam(tmp_path)
    mesh = Mesh(
        "m1",
        ipam.cidr,
        _member("controller", ipam.allocate("host:controller")),
        {"local-1": _member("local-1", ipam.allocate("host:local-1"))},
        homes={ipam.allocate("container:seed"): "local-1"},
    )
    mesh.save(tmp_path)
    seeded = ipam.allocations()
    results = _run(storeworkers.store_writer, tmp_path)
    now = Mesh.load(tmp_path)
    assert _lost({n: h.overlay_ip for n, h in now.hosts.items()}, now.homes, results) == []
    assert len(now.hosts) == len(mesh.hosts) + WORKERS * ROUNDS
    assert len(now.homes) == len(mesh.homes) + 2 * WORKERS * ROUNDS
    _assert_unique(tmp_path, results, seeded)


def test_positive_control_whole_document_saves_lose_updates(tmp_path: Path) -> None:
    """The same writers and checks with the old persistence (whole document read, changed, replaced):
    the check above would have caught the lost updates."""
    (tmp_path / "old-mesh.json").write_text(json.dumps({"hosts": {}, "homes": {}}))
    results = _run(storeworkers.whole_document_writer, tmp_path)
    doc = json.loads((tmp_path / "old-mesh.json").read_text())
    assert _lost(doc["hosts"], doc["homes"], results) != []
    _assert_unique(tmp_path, results)  # IPAM was locked then too: its losses were the mesh's


# --- state files of the previous version, written as it wrote them ---------------------------------

OLD_MESH_TOML = """\
name = "m1"
cidr = "100.64.0.0/16"
mtu = 1420
listen_port = 51820
backend = "kernel"

[local]
switch_netns = "m1-wan"
underlay = "198.18.0.0/24"

[wan]
rate = "1gbit"
rtt = "30ms"
relay_address = "198.18.0.1"
relay_pid = 4242

[wan.relay_ports]
"local-1,local-2" = 40000

[controller]
name = "controller"
overlay_ip = "100.64.0.1"
endpoint = "198.18.0.2:51820"
public_key = "key-controller"
interface = "m1-wg0"
netns = "m1-ctl"
state_root = "/s/controller"
provider = "local"
pid = 100

[hosts.local-1]
name = "local-1"
overlay_ip = "100.64.0.2"
endpoint = "198.18.0.11:51820"
public_key = "key-local-1"
interface = "m1-wg1"
netns = "m1-local-1"
state_root = "/s/local-1"
provider = "local"
pid = 101

[hosts.aws-1]
name = "aws-1"
overlay_ip = "100.64.0.3"
endpoint = "203.0.113.7:51820"
public_key = "key-aws-1"
interface = "wg0"
state_root = "/var/lib/skyferry-host"
provider = "aws"

[homes]
"100.64.0.4" = "aws-1"
"""
OLD_IPAM = {
    "allocations": {"100.64.0.1": "host:controller", "100.64.0.2": "host:local-1", "100.64.0.3": "host:aws-1",
                    "100.64.0.4": "container:web"},
    "cidr": "100.64.0.0/16",
    "last": "100.64.0.4",
}  # fmt: skip
OLD_JOURNAL_SCHEMA = """
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
CREATE TABLE IF NOT EXISTS exit_progress (
  plan TEXT NOT NULL, step TEXT NOT NULL, status TEXT NOT NULL, detail TEXT, updated REAL NOT NULL,
  PRIMARY KEY (plan, step)
);
"""
SPEC = {"name": "web", "args": ["/bin/sleep", "1000"], "ip": "100.64.0.4", "rootfs": "/r/web", "env": {}}


def _old_state(state: Path) -> None:
    """A state directory as the previous version left it: mesh.toml, ipam.json, journal.db."""
    (state / "mesh.toml").write_text(OLD_MESH_TOML)
    (state / "ipam.json").write_text(json.dumps(OLD_IPAM, indent=2, sort_keys=True))
    with closing(sqlite3.connect(state / "journal.db", isolation_level=None)) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(OLD_JOURNAL_SCHEMA)
        conn.execute("INSERT INTO containers VALUES ('web', 'aws-1', '100.64.0.4', ?, 1.0)", (json.dumps(SPEC),))
        conn.execute(
            "INSERT INTO migrations VALUES ('m1', 'web', 'local-1', 'aws-1', 'precopy', 'done', 1.0, 2.0, 1, NULL, ?)",
            (json.dumps({"downtime_ms": 80}),),
        )
        for stage in ("checkpoint", "restore"):
            conn.execute("INSERT INTO transitions (migration, stage, status, at) VALUES ('m1',?,'done',1.5)", (stage,))
        conn.execute("INSERT INTO exit_progress VALUES ('leave-a', 'provision', 'done', 'null', 3.0)")


@pytest.mark.parametrize("first", ["netplane", "controller"])
def test_old_state_files_are_imported_once_and_renamed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, first: str
) -> None:
    from skyferry.pipeline.controller.journal import Journal
    from skyferry.pipeline.controller.registry import Registry
    from skyferry.pipeline.runbooks.exitplan import Steps

    _old_state(tmp_path)
    caplog.set_level(logging.WARNING, logger=store.__name__)
    if first == "netplane":  # netplane's files now; journal.db waits for the controller's schema
        mesh = Mesh.load(tmp_path)
        assert sorted(p.name for p in tmp_path.iterdir()) == [
            "ipam.json.migrated", "journal.db", "mesh.toml.migrated", store.FILE
        ]  # fmt: skip
    journal = Journal(tmp_path)  # the controller's first open: whatever is left, in one transaction
    mesh = Mesh.load(tmp_path)
    assert "imported old state" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(f"{store.FILE}-")) == [
        "ipam.json.migrated", "journal.db.migrated", "mesh.toml.migrated", store.FILE
    ]  # fmt: skip

    assert mesh == Mesh(
        name="m1",
        cidr="100.64.0.0/16",
        backend="kernel",
        controller=replace(
            _member("controller", "100.64.0.1", 100), endpoint="198.18.0.2:51820", interface="m1-wg0", netns="m1-ctl"
        ),
        hosts={
            "local-1": replace(_member("local-1", "100.64.0.2", 101), endpoint="198.18.0.11:51820",
                               interface="m1-wg1", netns="m1-local-1"),
            "aws-1": MeshHost("aws-1", "100.64.0.3", "203.0.113.7:51820", "key-aws-1", "wg0", None,
                              "/var/lib/skyferry-host", "aws"),
        },
        homes={"100.64.0.4": "aws-1"},
        local=Local("m1-wan", "198.18.0.0/24"),
        wan=Wan("1gbit", "30ms", "198.18.0.1", 4242, {"local-1,local-2": 40000}),
    )  # fmt: skip
    ipam = Ipam(tmp_path)
    assert ipam.cidr == "100.64.0.0/16" and ipam.allocations() == OLD_IPAM["allocations"]
    assert ipam.allocate("container:new") == "100.64.0.5"  # walks on from the imported `last`

    assert Registry(tmp_path).get("web").host == "aws-1"
    assert journal.get("m1").report == {"downtime_ms": 80}
    journal.transition("m1", "verify", "done")
    assert [t["stage"] for t in journal.transitions("m1")] == ["checkpoint", "restore", "verify"]
    assert Steps(tmp_path, "leave-a").get("provision")["status"] == "done"  # type: ignore[index]

    caplog.clear()  # a later open imports nothing again, even if an old file reappears
    (tmp_path / "ipam.json").write_text(json.dumps({**OLD_IPAM, "allocations": {}}))
    assert Ipam(tmp_path).lookup("container:new") == "100.64.0.5"
    assert "not imported" in caplog.text
    assert json.loads((tmp_path / "ipam.json.migrated").read_text()) == OLD_IPAM  # the first one is kept
    assert json.loads((tmp_path / "ipam.json.migrated.1").read_text())["allocations"] == {}


def test_opening_the_store_again_keeps_this_process_locks(tmp_path: Path) -> None:
    """A process holds a long-lived connection (Registry, Journal) and opens short ones (Mesh, Ipam).
    If opening touched the file outside SQLite, closing that descriptor would drop the process's locks:
    another process closing its last connection would then delete the WAL under the long-lived one,
    whose later writes other processes would never see (so it failed before the fix)."""
    held = store.connect(tmp_path)
    held.execute("INSERT INTO mesh_homes VALUES ('100.64.0.5', 'local-1')")
    Ipam(tmp_path).allocate("container:x")  # a short-lived connection in this process
    _other_process(tmp_path, "Ipam(state).allocate('container:other')")
    held.execute("INSERT INTO mesh_homes VALUES ('100.64.0.6', 'local-1')")
    homes = _other_process(
        tmp_path, "print(sorted(r[0] for r in store.connect(state).execute('SELECT ip FROM mesh_homes')))"
    )
    assert homes == str(["100.64.0.5", "100.64.0.6"])
    held.close()


def _other_process(state: Path, code: str) -> str:
    prelude = (
        "import sys\nfrom pathlib import Path\nfrom skyferry.netplane import store\n"
        "from skyferry.netplane.ipam import Ipam\nstate = Path(sys.argv[1])\nHOMES = 'SELECT ip FROM mesh_homes'\n"
    )
    done = subprocess.run([sys.executable, "-c", prelude + code, str(state)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()
