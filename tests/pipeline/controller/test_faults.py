"""The fault matrix: every stage of a pre-copy migration x every fault, on a real mesh. Pre-copy is what the
default mode, auto, picks for the small counter (docs/migration.md, "Auto mode").

Each cell moves a fresh counter container from local-1 to local-2 while a client on local-3 sends
numbered requests on one connection (it fails on any lost or repeated answer), injects one fault at one
stage, finishes the migration the way an operator would (`migrations resume`, `migrations rollback`),
and then checks the same things everywhere:

- the container runs exactly once, on the source (rolled back) or the target (done), unfrozen and
  unlocked, and the registry and routes agree with the journal;
- the journal tells the truth: every stage done, or every started stage undone and no restore;
- the client lost or repeated nothing and still gets answers on its one connection;
- nothing leaks: no netns, image directory or process of the migration, exactly one agent per host.

The outcome of every cell lands in a table printed at the end of the run (and written to
`<pytest basetemp>/fault-matrix.md`); docs/reliability.md holds the table of a real run.
"""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kit.mesh import local_mesh
from skyferry.netplane import netns
from skyferry.netplane.mesh import Mesh
from skyferry.pipeline.agent import netlock
from skyferry.pipeline.agent.host import IMAGES_TMPFS
from skyferry.pipeline.controller import agentctl, containers, migration
from skyferry.pipeline.controller.journal import Journal
from skyferry.pipeline.controller.registry import Registry
from skyferry.pipeline.controller.stages import POINT_OF_NO_RETURN, PRECOPY
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.scenarios import demo as scenario

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]
SKYFERRY = str(Path(sys.executable).parent / "skyferry")
SRC, DST, CLIENT = "local-1", "local-2", "local-3"
STAGES = [s.name for s in PRECOPY]
# From the stage that carries the restore on (the transfer, stages.Transfer.carries): once done, so is the restore.
PONR_FROM = next(s.name for s in PRECOPY if getattr(s, "carries", None) or s.name == POINT_OF_NO_RETURN)
AFTER_PONR = STAGES[STAGES.index(PONR_FROM) :]
OUTAGE_S = 3.0  # a short outage: connect retries (tenacity) and TCP retransmission ride through it
TMPFS_SIZE = "192m"  # the target's image tmpfs in the out-of-space cells: roomy until it is filled

FAULTS = {
    "ctl-resume": "controller killed after the stage, then `migrations resume`",
    "ctl-rollback": "controller killed after the stage, then `migrations rollback`",
    "src-agent": "source agent SIGKILLed (mid-request where the stage calls it), restarted",
    "dst-agent": "target agent SIGKILLed (mid-request where the stage calls it), restarted",
    "link-cut": f"target host's underlay dropped for {OUTAGE_S:.0f} s from the stage's start",
    "dst-enospc": "target's image tmpfs filled to the last byte at the stage's start",
    "corrupt": "one byte flipped in the stream the stage sends (after its checksums)",
}
# The request an agent serves in each stage (faults.check runs on entry): `die:<op>` kills it right there.
SRC_OPS = {"precopy": "precopy", "checkpoint": "checkpoint", "transfer": "transfer", "confirm": "confirm"}
DST_OPS = {
    "prepare": "prepare",
    "precopy": "precopy-reset",
    "transfer": "precopy-final",
    "restore": "restore",
    "cleanup": "cleanup",
}
STREAMS = {"precopy": "precopy-round", "transfer": "precopy-final"}

MATRIX: dict[tuple[str, str], str] = {}


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[tuple[Path, Mesh]]:
    try:
        with local_mesh(tmp_path_factory, prefix="f") as made:
            yield made
    finally:
        _print_matrix(tmp_path_factory.getbasetemp(), request)


def _print_matrix(base: Path, request: pytest.FixtureRequest) -> None:
    if not MATRIX:
        return
    table = matrix_table()
    (base / "fault-matrix.md").write_text(table)
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:
        return
    with capture.global_and_fixture_disabled():  # printed on passing runs too
        reporter.write_line("")
        for line in table.splitlines():
            reporter.write_line(line)
        reporter.write_line(f"(also in {base / 'fault-matrix.md'})")


def _cell_text(stage: str, fault: str) -> str:
    return MATRIX.get((stage, fault)) or NOT_APPLICABLE.get((fault, stage)) or "not run"


def matrix_table() -> str:
    head = "| stage | " + " | ".join(FAULTS) + " |"
    rows = [head, "|" + " --- |" * (len(FAULTS) + 1)]
    for stage in STAGES:
        rows.append(f"| {stage} | " + " | ".join(_cell_text(stage, f) for f in FAULTS) + " |")
    legend = "\n".join(f"- **{k}**: {v}" for k, v in FAULTS.items())
    return "\n".join(rows) + "\n\n" + legend + "\n"


@pytest.fixture
def cell(mesh: tuple[Path, Mesh], tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[dict]:
    state, m = mesh
    callspec = getattr(request.node, "callspec", None)
    label = callspec.id if callspec else request.node.name.removeprefix("test_")
    name = "fm-" + re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")[-24:].strip("-")
    info = scenario.start_counter(state, SRC, name, tmp_path)
    client = scenario.CounterClient(m.hosts[CLIENT].netns or "", info["ip"], tmp_path).start()
    try:
        yield {"state": state, "mesh": m, "name": name, "ip": info["ip"], "client": client, "tmp": tmp_path}
    finally:
        client.stop()
        for host in (SRC, DST):
            (Path(m.hosts[host].state_root) / "faults").unlink(missing_ok=True)
        containers.remove(state, name)


# --- faults ------------------------------------------------------------------------------------------


def _agent_pid(state: Path, host: str) -> int:
    return int(json.loads((state / agentctl.PIDS).read_text())[host])


def _dead(pid: int) -> bool:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)  # our child (start_agents ran here): reap it
        return done == pid
    except ChildProcessError:
        return not Path(f"/proc/{pid}").exists()


class Restarter:
    """Watches one host's agent and starts it again whenever it died (as systemd would)."""

    def __init__(self, state: Path, m: Mesh, host: str) -> None:
        self.state, self.m, self.host = state, m, host
        self.restarts = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> "Restarter":
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self._revive()  # whatever happened, the host has its agent again

    def _loop(self) -> None:
        while not self._stop.wait(0.05):
            self._revive()

    def _revive(self) -> None:
        if _dead(_agent_pid(self.state, self.host)):
            agentctl.start_agents(self.m, self.state)
            self.restarts += 1


def kill_agent(state: Path, host: str) -> None:
    pid = _agent_pid(state, host)
    os.kill(pid, signal.SIGKILL)
    while not _dead(pid):
        time.sleep(0.01)


def _nft(ns: str, script: str) -> None:
    subprocess.run(netns.command(ns, ["nft", "-f", "-"]), input=script, text=True, check=True, capture_output=True)


class LinkCut:
    """Drop traffic in a host's netns: everything on its underlay veth, or only what goes to/from one
    overlay address. Our own table (named for the mesh), removed on exit."""

    def __init__(self, m: Mesh, host: str, peer_ip: str | None = None) -> None:
        self.ns = m.hosts[host].netns or ""
        self.table = f"{m.name}_cut"
        self.peer_ip = peer_ip
        self.active = False
        self._lock = threading.Lock()

    def cut(self) -> None:
        if self.peer_ip:
            rules_in, rules_out = f"ip saddr {self.peer_ip} drop", f"ip daddr {self.peer_ip} drop"
        else:
            rules_in, rules_out = 'iifname "ul0" drop', 'oifname "ul0" drop'
        _nft(
            self.ns,
            f"table inet {self.table} {{\n"
            f"  chain i {{ type filter hook input priority -500; {rules_in}; }}\n"
            f"  chain o {{ type filter hook output priority -500; {rules_out}; }}\n"
            "}\n",
        )
        self.active = True

    def restore(self) -> None:
        with self._lock:
            if self.active:
                _nft(self.ns, f"delete table inet {self.table}\n")
                self.active = False


class Filled:
    """A small tmpfs over the target's image directory, filled to the last byte on demand."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.filler = path / ".filler"

    def __enter__(self) -> "Filled":
        self.path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0700", "sf-enospc", str(self.path)],
                       check=True)  # fmt: skip
        return self

    def fill(self) -> None:
        with open(self.filler, "wb", buffering=0) as f:
            # The source's final deltas may be writing here at this very moment (they leave as the checkpoint
            # answers): space they take after statvfs fails that allocation, and the next one asks for less.
            for _ in range(5):
                st = os.statvfs(self.path)
                try:
                    os.posix_fallocate(f.fileno(), os.fstat(f.fileno()).st_size, st.f_bavail * st.f_frsize)
                    break
                except OSError:
                    continue
            f.seek(0, os.SEEK_END)
            with contextlib.suppress(OSError):  # ENOSPC: full to the last byte
                while True:
                    f.write(b"\0" * 512)

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)

    def leftovers(self) -> list[str]:
        return sorted(p.name for p in self.path.iterdir() if p != self.filler)

    def __exit__(self, *_: object) -> None:
        self.free()
        subprocess.run(["umount", str(self.path)], check=False)


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SKYFERRY, *args], capture_output=True, text=True, env={**os.environ, **(env or {})})


# --- recovery and the checks every cell makes ----------------------------------------------------------


def finish(state: Path, mig_id: str) -> str:
    """What an operator does next, from what the journal says: '' if nothing was needed."""
    mig = Journal(state).get(mig_id)
    if mig.state == "running":  # failed after the point of no return (or a controller died)
        migration.resume(state, mig_id)
        return "resume → "
    if mig.state == "failed":  # a rollback stopped half way
        migration.rollback(state, mig_id)
        return "rollback → "
    return ""


def settle(c: dict, mig_id: str) -> str:
    """Assert every invariant of a finished cell; returns where the container ended ('done'/'rolled back')."""
    state, m, name, ip = c["state"], c["mesh"], c["name"], c["ip"]
    journal = Journal(state)
    mig = journal.get(mig_id)
    assert mig.state in ("done", "rolled-back"), (mig.state, mig.error)
    statuses = journal.stage_status(mig_id)
    if mig.state == "done":
        assert [s for s in STAGES if statuses.get(s) != "done"] == [], statuses
        owner, other = DST, SRC
    else:
        assert all(v == "undone" for v in statuses.values()), statuses
        assert "restore" not in statuses or statuses["restore"] == "undone"
        if _failed_stage(state, mig_id):  # an automatic rollback says why (an operator's needs no reason)
            assert mig.error, "a rollback after a failure records why"
        owner, other = SRC, DST
    # Exactly once: one running, unfrozen copy, where the journal, registry and routes say.
    found = {h: [x for x in agentctl.client(state, m, h).call("GET", "/v1/containers") if x["name"] == name]
             for h in (SRC, DST)}  # fmt: skip
    assert found[other] == [], f"a copy was left on {other}: {found[other]}"
    assert len(found[owner]) == 1, found
    assert found[owner][0]["state"] == "running" and not found[owner][0]["frozen_for_migration"], found[owner]
    assert Registry(state).get(name).host == owner
    assert Mesh.load(state).homes[ip] == owner
    # Nothing leaks: netns, lock table, images, processes of this migration, extra agents.
    own_ns, other_ns = f"{m.name}-{owner}-{name}", f"{m.name}-{other}-{name}"
    assert netns.exists(own_ns) and not netns.exists(other_ns)
    assert not netlock.is_locked(own_ns), "the surviving copy's netns still carries the lock table"
    for host in (SRC, DST):
        assert not (IMAGES_TMPFS / m.name / host / mig_id).exists(), f"images of {mig_id} left on {host}"
    assert _procs_mentioning(mig_id) == [], "a process of the migration outlived it"
    agents = _procs_mentioning(f"--mesh {m.name} ")
    assert len(agents) == len(m.hosts), agents
    # No acknowledged request lost or repeated, and the one connection still works.
    client = c["client"]
    client.wait_for(client.progress() + 3)
    seen = client.stop()
    assert seen["survived"], seen["errors"]
    return "done" if mig.state == "done" else "rolled back"


def _procs_mentioning(text: str) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd + " ":
            found.append(f"{proc.name}: {cmd[:120]}")
    return found


def never_asked_to_restore(state: Path, mig_id: str) -> bool:
    """No restore began, or the one the transfer carried was journalled as started, then as never asked
    (the transfer failed before the target restored)."""
    restore = [t for t in Journal(state).transitions(mig_id) if t["stage"] == "restore"]
    if not restore:
        return True
    return [t["status"] for t in restore] == ["started", "undone"] and "never asked" in restore[1]["detail"]["error"]


def _failed_stage(state: Path, mig_id: str) -> str | None:
    failed = [t["stage"] for t in Journal(state).transitions(mig_id) if t["status"] == "failed"]
    return failed[0] if failed else None


def _describe(state: Path, mig_id: str, recovery: str, end: str) -> str:
    failed = _failed_stage(state, mig_id)
    return f"{recovery}{end}" + (f" (failed at {failed})" if failed else "")


# --- the matrix --------------------------------------------------------------------------------------


def _migrate_with(c: dict, at: str, inject: Callable[[], None]) -> str:
    """Migrate in-process, calling `inject` as stage `at` begins; returns the migration id."""

    def progress(step: str) -> None:
        if step == at:
            inject()

    with contextlib.suppress(SkyferryError):  # the journal says what happened; the cell judges it
        migration.migrate(c["state"], c["name"], DST, c.get("mode"), progress=progress)
    mig = Journal(c["state"]).all()[-1]
    assert mig.container == c["name"]
    return mig.id


def run_controller_cell(c: dict, stage: str, then: str) -> str:
    mode = ["--mode", c["mode"]] if c.get("mode") else []
    proc = cli("migrate", c["name"], "--to", DST, *mode, "--json", env={"SKYFERRY_CRASH_AFTER": stage})
    assert proc.returncode == 137, proc.stderr
    mig = Journal(c["state"]).active_for(c["name"])
    assert mig is not None and mig.state == "running", "the journal shows the dead controller's migration"
    assert Journal(c["state"]).stage_status(mig.id)[stage] == "done"
    if then == "rollback":
        undone = cli("migrations", "rollback", mig.id, "--json")
        if stage in AFTER_PONR:
            assert undone.returncode == 2 and "point of no return" in undone.stdout, undone.stdout + undone.stderr
            assert cli("migrations", "resume", mig.id).returncode == 0
            return f"rollback refused (past restore) → resume → {settle(c, mig.id)}"
        assert undone.returncode == 0, undone.stderr
        return f"rollback → {settle(c, mig.id)}"
    resumed = cli("migrations", "resume", mig.id, "--json")
    assert resumed.returncode == 0, resumed.stderr
    return f"resume → {settle(c, mig.id)}"


def run_agent_cell(c: dict, stage: str, host: str, ops: dict[str, str]) -> str:
    state, m = c["state"], c["mesh"]
    faults = Path(m.hosts[host].state_root) / "faults"
    with Restarter(state, m, host) as restarter:
        if stage in ops:
            faults.write_text(f"die:{ops[stage]}\n")
            mig_id = _migrate_with(c, stage, lambda: None)
        else:  # this agent serves no request of its own in this stage: kill it as the stage begins
            mig_id = _migrate_with(c, stage, lambda: kill_agent(state, host))
    assert restarter.restarts >= 1, "the fault never fired"
    how = "mid-request" if stage in ops else "at stage start"
    recovery = finish(state, mig_id)
    return f"{how}: " + _describe(state, mig_id, recovery, settle(c, mig_id))


def run_link_cell(c: dict, stage: str) -> str:
    state, m = c["state"], c["mesh"]
    link = LinkCut(m, DST)
    timer = threading.Timer(OUTAGE_S, link.restore)

    def cut() -> None:
        link.cut()
        timer.start()

    try:
        mig_id = _migrate_with(c, stage, cut)
    finally:
        timer.cancel()
        link.restore()
    recovery = finish(state, mig_id)
    return _describe(state, mig_id, recovery, settle(c, mig_id))


def run_enospc_cell(c: dict, stage: str) -> str:
    state, m = c["state"], c["mesh"]
    with Filled(IMAGES_TMPFS / m.name / DST) as disk:
        mig_id = _migrate_with(c, stage, disk.fill)
        disk.free()  # the operator makes room, then finishes
        recovery = finish(state, mig_id)
        end = settle(c, mig_id)
        assert disk.leftovers() == [], f"image files left on the full tmpfs: {disk.leftovers()}"
    return _describe(state, mig_id, recovery, end)


def run_corrupt_cell(c: dict, stage: str, streams: dict[str, str]) -> str:
    state, m = c["state"], c["mesh"]
    faults = Path(m.hosts[SRC].state_root) / "faults"
    faults.write_text(f"corrupt:{streams[stage]}\n")
    mig_id = _migrate_with(c, stage, lambda: None)
    assert f"corrupt:{streams[stage]}" not in faults.read_text(), "the corruption was never applied"
    assert never_asked_to_restore(state, mig_id), "a corrupted stream must be caught before anything is restored"
    recovery = finish(state, mig_id)
    return _describe(state, mig_id, recovery, settle(c, mig_id))


# Cells with nothing to inject are not generated (a skip would hide a cell CI never runs); the table says so.
NOT_APPLICABLE = {("corrupt", s): "n/a: the stage sends no stream" for s in STAGES if s not in STREAMS}
CELLS = [(f, s) for f in FAULTS for s in STAGES if (f, s) not in NOT_APPLICABLE]


@pytest.mark.parametrize(("fault", "stage"), CELLS)
def test_fault_matrix(cell: dict, fault: str, stage: str) -> None:
    MATRIX[(stage, fault)] = "FAILED"  # overwritten when the cell's checks all pass
    MATRIX[(stage, fault)] = run_cell(cell, fault, stage)


def run_cell(c: dict, fault: str, stage: str) -> str:
    """One cell. In hybrid mode the transfer sends (and the target serves) the lazy final instead."""
    final = "lazy-final" if c.get("mode") == "hybrid" else STREAMS["transfer"]
    match fault:
        case "ctl-resume" | "ctl-rollback":
            return run_controller_cell(c, stage, fault.removeprefix("ctl-"))
        case "src-agent":
            return run_agent_cell(c, stage, SRC, SRC_OPS)
        case "dst-agent":
            return run_agent_cell(c, stage, DST, {**DST_OPS, "transfer": final})
        case "link-cut":
            return run_link_cell(c, stage)
        case "dst-enospc":
            return run_enospc_cell(c, stage)
        case "corrupt":
            return run_corrupt_cell(c, stage, {**STREAMS, "transfer": final})
    raise ValueError(f"unknown fault {fault}")


# Hybrid's own machinery before the point of no return: a lazy dump whose page server must outlive a
# failed target (--leave-running), a pager started during the transfer, a lazy final stream. Each of these
# must roll back to a running source, exactly once.
HYBRID_CELLS = [
    ("ctl-rollback", "checkpoint"),
    ("ctl-rollback", "transfer"),
    ("ctl-resume", "transfer"),
    ("src-agent", "checkpoint"),
    ("dst-agent", "transfer"),
    ("dst-agent", "restore"),
    ("link-cut", "transfer"),
    ("corrupt", "transfer"),
]


@pytest.mark.parametrize(("fault", "stage"), HYBRID_CELLS)
def test_hybrid_faults(cell: dict, fault: str, stage: str) -> None:
    cell["mode"] = "hybrid"
    outcome = run_cell(cell, fault, stage)
    assert "rolled back" in outcome or "done" in outcome, outcome  # settle() checked every invariant


# --- network faults beyond the matrix -------------------------------------------------------------------------


@pytest.mark.timeout(150)
def test_a_link_that_stays_cut_fails_within_a_bounded_time_and_rolls_back(cell: dict) -> None:
    """Source and target lose each other for good as the transfer begins (the controller still reaches
    both). The stalled stream must fail within the transport's bounded budget (not hang for TCP's
    15-minute default), and the migration roll back cleanly to the source."""
    state, m = cell["state"], cell["mesh"]
    link = LinkCut(m, DST, peer_ip=m.hosts[SRC].overlay_ip)
    try:
        mig_id = _migrate_with(cell, "transfer", link.cut)
    finally:
        link.restore()
    mig = Journal(state).get(mig_id)
    assert mig.state == "rolled-back" and _failed_stage(state, mig_id) == "transfer", (mig.state, mig.error)
    assert "connection" in (mig.error or ""), mig.error
    assert settle(cell, mig_id) == "rolled back"


def test_a_corrupted_stop_copy_image_is_never_restored(cell: dict) -> None:
    """Stop-copy sends the whole image as one zstd tar; a byte flipped on the way fails zstd's frame
    checksum or the SHA-256 both ends compare, before the restore stage starts."""
    state, m = cell["state"], cell["mesh"]
    faults = Path(m.hosts[SRC].state_root) / "faults"
    faults.write_text("corrupt:receive\n")
    with pytest.raises(SkyferryError, match=r"failed at transfer.*Rolled back"):
        migration.migrate(state, cell["name"], DST, mode="stop-copy")
    assert "corrupt:receive" not in faults.read_text(), "the corruption was never applied"
    mig = Journal(state).all()[-1]
    assert never_asked_to_restore(state, mig.id)
    assert "corrupt" in (mig.error or "") or "digest" in (mig.error or ""), mig.error
    assert settle(cell, mig.id) == "rolled back"
