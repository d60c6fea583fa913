"""CRIU's own zdtm test programs, each in a skyferry container migrated live: the compatibility matrix.

A zdtm static program sets up its state (pipes, sockets, timers, locks…), writes its pidfile, waits for
SIGTERM, then checks that state and writes PASS or FAIL to its outfile. Here each one runs in a container
of its own (static busybox plus the program, statically linked, as a `docker save` archive that every
engine takes), is migrated live from local-1 to local-2, then gets SIGTERM and its verdict is read.

    python -m skyferry.pipeline.scenarios.zdtm --all      # the full matrix; rewrites docs/compatibility.md
    python -m skyferry.pipeline.scenarios.zdtm pipe00 shm # a few programs, runc only, printed

The programs are built from the CRIU source tree the bootstrap fetches ($SKYFERRY_CACHE/criu-4.2.1), in a
copy of its test/zdtm beside it, so the source stays as the bootstrap left it.
"""

import argparse
import ast
import base64
import hashlib
import io
import json
import os
import platform
import re
import secrets
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel
from skyferry.pipeline.controller import containers, migration
from skyferry.pipeline.controller.journal import Journal
from skyferry.pipeline.controller.stages import FREEZE_FROM
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.scenarios import demo as scenario
from skyferry.pipeline.scenarios import matrixdoc

CRIU_VERSION = "4.2.1"
CACHE = Path(os.environ.get("SKYFERRY_CACHE", "/var/cache/skyferry"))
BUSYBOX = Path("/bin/busybox")  # busybox-static (scripts/bootstrap-host.sh)
APPLETS = ("sh", "sleep", "cat", "kill", "ls", "rm", "echo", "true", "tail", "pidof")
WORKDIR = "/zdtm/static"  # as in CRIU's tree: some .desc options name it (inotify_irmap)
SOURCE, TARGET = "local-1", "local-2"
VERDICT_WAIT = 30.0  # seconds for a program to check its state after SIGTERM
START_WAIT = 30.0

# Engine -> the modes the matrix runs in it (Podman and Docker migrate by stop-copy only).
ENGINE_MODES: dict[str, tuple[str, ...]] = {
    "runc": ("precopy", "stop-copy", "hybrid"),
    "podman": ("stop-copy",),
}
# Stages that run before the container is frozen: a failure there is a refusal, the workload never paused.
BEFORE_FREEZE = ("check", "prepare", "precopy")
assert FREEZE_FROM not in BEFORE_FREEZE


@dataclass(frozen=True)
class Program:
    name: str
    holds: str  # what state it sets up, for the table


PROGRAMS: tuple[Program, ...] = (
    Program("pipe00", "pipe"),
    Program("pipe01", "pipe with data in flight"),
    Program("pipe02", "pipe shared by two processes"),
    Program("fifo", "FIFO"),
    Program("fifo_wronly", "FIFO open write-only"),
    Program("fifo-ghost", "FIFO deleted while open"),
    Program("unlink_fifo", "unlinked FIFO"),
    Program("sockets00", "UNIX stream sockets, bound"),
    Program("sockets01", "UNIX sockets, queued data"),
    Program("sockets02", "UNIX socketpair, shut down"),
    Program("sockets_spair", "UNIX socketpair"),
    Program("sockets_dgram", "UNIX datagram sockets"),
    Program("sk-unix-unconn", "UNIX socket, unconnected"),
    Program("scm00", "fd passed over SCM_RIGHTS, in flight"),
    Program("socket_queues", "UNIX socket receive queues"),
    Program("del_standalone_un", "UNIX socket, file deleted"),
    Program("deleted_unix_sock", "UNIX socket, path deleted"),
    Program("socket-tcp", "TCP, established"),
    Program("socket-tcp-local", "TCP over loopback, both ends"),
    Program("socket-tcpbuf-local", "TCP loopback, full buffers"),
    Program("socket-tcp-closed", "TCP, half-closed"),
    Program("socket_listen", "TCP listening socket"),
    Program("socket_udp", "UDP sockets"),
    Program("socket_aio", "TCP + POSIX AIO"),
    Program("shm", "SysV shared memory"),
    Program("shm-mp", "SysV shm, several processes"),
    Program("sem", "SysV semaphores"),
    Program("msgque", "SysV message queue"),
    Program("maps00", "many mmap kinds"),
    Program("maps01", "large shared mappings"),
    Program("mprotect00", "mprotect'ed mappings"),
    Program("cow00", "copy-on-write pages after fork"),
    Program("memfd00", "memfd"),
    Program("unlink_mmap00", "mmap of a deleted file"),
    Program("timers", "itimers"),
    Program("posix_timers", "POSIX timers"),
    Program("timerfd", "timerfd"),
    Program("pthread_timers", "POSIX timers in threads"),
    Program("sigaltstack", "alternate signal stack"),
    Program("sigpending", "pending signals"),
    Program("signalfd00", "signalfd"),
    Program("pdeath_sig", "parent-death signal"),
    Program("pthread00", "threads"),
    Program("pthread01", "threads, per-thread state"),
    Program("futex", "futexes between threads"),
    Program("file_locks00", "POSIX and flock locks"),
    Program("file_locks01", "locks held by several files"),
    Program("file_lease00", "file lease"),
    Program("inotify00", "inotify"),
    Program("inotify_irmap", "inotify on a path found by scan"),
    Program("fanotify00", "fanotify"),
    Program("eventfs00", "eventfd"),
    Program("epoll", "epoll"),
    Program("epoll01", "epoll with nested targets"),
    Program("pty00", "pseudo-terminal"),
    Program("pty01", "pseudo-terminals, several"),
    Program("tty00", "controlling terminal"),
    Program("cwd00", "working directory"),
    Program("cwd01", "deleted working directory"),
    Program("rmdir_open", "open deleted directory"),
    Program("unlink_fstat00", "open deleted file"),
    Program("unlink_regular00", "deleted file, link-remap"),
    Program("session00", "sessions and process groups"),
    Program("session01", "sessions, orphaned groups"),
    Program("pstree", "process tree"),
    Program("zombie00", "zombie processes"),
    Program("stopped", "stopped (SIGSTOP) task"),
    Program("child_subreaper", "child subreaper"),
    Program("pidfd_self", "pidfd"),
    Program("env00", "environment"),
    Program("umask00", "umask"),
    Program("rlimits00", "rlimits"),
    Program("fpu00", "FPU state"),
    Program("vdso01", "vDSO calls"),
    Program("fd", "many fds"),
    Program("write_read00", "file with data"),
    Program("sleeping00", "sleeping processes"),
)
BY_NAME = {p.name: p for p in PROGRAMS}
# The CI subset (tests/pipeline/scenarios/test_zdtm.py): a few minutes, passes and refusals both.
FAST = ("pipe00", "fifo", "sockets00", "shm", "posix_timers", "file_locks00")
# Arguments that CRIU's static/Makefile gives single programs beyond pidfile/outfile/filename/dirname.
EXTRA_ARGS = {"env00": ["--envname=ENV_00_TEST"], "umask00": ["--mask=0345"]}

Outcome = Literal["pass", "refused", "failed", "hang", "no-start"]
MIGRATE_WAIT = 240.0  # seconds before a migration counts as hung (the container then stays frozen)


class Cell(BaseModel):
    """One program in one engine and mode."""

    program: str
    engine: str
    mode: str
    outcome: Outcome
    stage: str | None = None  # where it stopped: a migration stage, "verify" (the program's FAIL) or "start"
    reason: str = ""
    migration: str | None = None
    rolled_back: bool | None = None  # after a failed migration: running once, on the source, and still PASSing
    seconds: float = 0.0


class Matrix(matrixdoc.Header):
    cells: list[Cell]


# --- building the programs ---------------------------------------------------------------------------


def build_dir() -> Path:
    return CACHE / f"zdtm-{CRIU_VERSION}"


def build(names: Iterable[str]) -> dict[str, Path]:
    """Static binaries of `names` (those that build; the rest are missing from the result)."""
    src = CACHE / f"criu-{CRIU_VERSION}" / "test" / "zdtm"
    if not (src / "static").is_dir():
        raise SkyferryError(f"no zdtm sources at {src}", hint="make host (scripts/bootstrap-host.sh fetches CRIU)")
    tree = build_dir()
    if not (tree / "static").is_dir():
        shutil.copytree(src, tree, symlinks=True)
    names = list(names)
    _make(tree / "lib", ["libzdtmtst.a"])
    missing = [n for n in names if not (tree / "static" / n).exists()]
    if missing:
        _make(tree / "static", ["-k", "LDFLAGS=-static", *missing], check=False)
    return {n: tree / "static" / n for n in names if (tree / "static" / n).exists()}


def _make(where: Path, args: list[str], check: bool = True) -> None:
    proc = subprocess.run(["make", "-j2", "-C", str(where), *args], capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise SkyferryError(f"building zdtm in {where} failed: {proc.stderr.strip()[-500:]}")


def _program_kinds(static: Path) -> dict[str, str]:
    """static/Makefile's TST_FILE / TST_DIR / TST_DIR_FILE lists: which take --filename, --dirname."""
    text = (static / "Makefile").read_text().replace("\\\n", " ")
    kinds: dict[str, str] = {}
    for line in text.splitlines():
        match = re.match(r"(TST_FILE|TST_DIR|TST_DIR_FILE)\s*\+?=(.*)", line)
        if match:
            kinds.update(dict.fromkeys(match[2].split(), match[1]))
    return kinds


def desc(name: str) -> dict[str, str]:
    """The program's .desc (zdtm.py's flags, CRIU options, required features), {} where it has none."""
    path = build_dir() / "static" / f"{name}.desc"
    if not path.exists():
        return {}
    text = "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))
    value = ast.literal_eval(text.strip() or "{}")
    return {k: v for k, v in value.items() if isinstance(v, str)}


def command(name: str) -> list[str]:
    """The container's command: start the program as CRIU's Makefile does, then stay alive as init (the
    program daemonizes; the shell's loop reaps it when it ends)."""
    kind = _program_kinds(build_dir() / "static").get(name)
    args = [f"--pidfile={name}.pid", f"--outfile={name}.out"]
    if kind == "TST_FILE":
        args.append(f"--filename={name}.test")
    elif kind == "TST_DIR":
        args.append(f"--dirname={name}.test")
    elif kind == "TST_DIR_FILE":
        args += [f"--dirname={name}.dir.test", f"--filename={name}.test"]
    args += EXTRA_ARGS.get(name, [])
    script = f"cd {WORKDIR} && ./{name} {' '.join(args)}; while :; do sleep 1; done"
    return ["/bin/sh", "-c", script]


def image(binary: Path, dest: Path) -> Path:
    """A `docker save` archive (one layer: static busybox, its applets, the program): runc unpacks it,
    Podman and Docker load it. Nothing of the host is needed inside."""
    if not BUSYBOX.exists() or b"ld-linux" in BUSYBOX.read_bytes()[:4096]:
        raise SkyferryError(f"{BUSYBOX} is missing or not static", hint="apt-get install busybox-static")
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as tar:
        for d in ("bin", "tmp", "proc", "sys", "dev", "etc", "zdtm", WORKDIR.lstrip("/")):
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if d == "tmp" else 0o755
            tar.addfile(info)
        tar.add(BUSYBOX, arcname="bin/busybox")
        for applet in APPLETS:
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type, link.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(link)
        tar.add(binary, arcname=f"{WORKDIR.lstrip('/')}/{binary.name}")
    data = layer.getvalue()
    diff_id = "sha256:" + hashlib.sha256(data).hexdigest()
    config = json.dumps({
        "architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    }).encode()  # fmt: skip
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    tag = f"localhost/skyferry/zdtm-{binary.name.lower()}:{diff_id[7:19]}"
    manifest = json.dumps([{"Config": config_name, "RepoTags": [tag], "Layers": ["layer.tar"]}]).encode()
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(dest, "w") as tar:
        for member, blob in (("layer.tar", data), (config_name, config), ("manifest.json", manifest)):
            info = tarfile.TarInfo(member)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return dest


# --- one cell ------------------------------------------------------------------------------------------


def container_name(program: str, engine: str, mode: str) -> str:
    short = {"precopy": "pc", "stop-copy": "sc", "hybrid": "hy", "postcopy": "po"}[mode]
    clean = re.sub(r"[^a-z0-9]+", "-", program.lower()).strip("-")
    return f"z-{clean}-{engine[:2]}{short}"[:40]


def run_cell(state: Path, program: str, engine: str, mode: str, archive: Path) -> Cell:
    """Start `program` on local-1, migrate it live to local-2 in `mode`, SIGTERM it, read its verdict."""
    started = time.monotonic()
    name = container_name(program, engine, mode)
    containers.remove(state, name)  # a leftover of an interrupted run
    cell = Cell(program=program, engine=engine, mode=mode, outcome="pass")
    try:
        containers.run(state, SOURCE, f"{engine}:{name}", command(program), image=archive)
        pid = _wait_started(state, name, program)
        if isinstance(pid, str):
            cell = cell.model_copy(update={"outcome": "no-start", "stage": "start", "reason": pid})
        else:
            cell = _migrate_and_verify(state, name, program, cell, pid)
    except SkyferryError as exc:
        cell = cell.model_copy(update={"outcome": "no-start", "stage": "start", "reason": _one_line(str(exc))})
    finally:
        containers.remove(state, name)
    return cell.model_copy(update={"seconds": round(time.monotonic() - started, 1)})


def _migrate(state: Path, name: str, mode: str) -> dict:
    """migration.migrate, given up on after MIGRATE_WAIT: a hung CRIU must not stall the whole matrix."""
    pool = ThreadPoolExecutor(max_workers=1)
    future = pool.submit(migration.migrate, state, name, TARGET, mode=mode)
    try:
        return future.result(timeout=MIGRATE_WAIT)
    except FutureTimeout:
        raise MigrationHung(f"no result {MIGRATE_WAIT:.0f} s after the migration started") from None
    finally:
        pool.shutdown(wait=False)


class MigrationHung(Exception):
    pass


def _migrate_and_verify(state: Path, name: str, program: str, cell: Cell, pid: int) -> Cell:
    try:
        report = _migrate(state, name, cell.mode)
    except MigrationHung as exc:
        mig = Journal(state).all()[-1]
        stage = next(iter(reversed(Journal(state).stage_status(mig.id))), "check")
        return cell.model_copy(update={"outcome": "hang", "stage": stage, "reason": str(exc), "migration": mig.id})
    except SkyferryError as exc:
        mig = Journal(state).all()[-1]
        failed = [t["stage"] for t in Journal(state).transitions(mig.id) if t["status"] == "failed"]
        stage = failed[0] if failed else "check"
        row = {r["name"]: r for r in containers.live(state)}.get(name, {})
        once_on_source = (row.get("host"), row.get("state")) == (SOURCE, "running")
        source_verdict = _verdict(state, name, program, pid) if once_on_source else "not running on the source"
        outcome: Outcome = "refused" if stage in BEFORE_FREEZE else "failed"
        return cell.model_copy(update={
            "outcome": outcome, "stage": stage, "reason": _one_line(mig.error or str(exc)), "migration": mig.id,
            "rolled_back": once_on_source and source_verdict == "PASS",
        })  # fmt: skip
    verdict = _verdict(state, name, program, pid)
    update = {"migration": report["id"]} if "id" in report else {}
    if verdict != "PASS":
        update |= {"outcome": "failed", "stage": "verify", "reason": verdict}
    return cell.model_copy(update=update)


def _sh(state: Path, name: str, script: str) -> tuple[int, str]:
    result = containers.exec_(state, name, ["/bin/sh", "-c", script], timeout=20)
    return result.exit_code, base64.b64decode(result.stdout).decode(errors="replace")


def _wait_started(state: Path, name: str, program: str) -> int | str:
    """The program's pid (in the container) once its pidfile exists; or why it never started."""
    deadline = time.monotonic() + START_WAIT
    while time.monotonic() < deadline:
        # Started (outfile made) but no process left and no pidfile: its set-up failed.
        script = f"cd {WORKDIR}; cat {program}.pid 2>/dev/null; [ -e {program}.out ] && ! pidof {program} >/dev/null"
        _, out = _sh(state, name, script + " && echo GONE")
        if out.split() and out.split()[0].isdigit():
            return int(out.split()[0])
        if "GONE" in out:
            break
        time.sleep(0.3)
    _, out = _sh(state, name, f"tail -n 5 {WORKDIR}/{program}.out 2>/dev/null")
    return "did not start in the container: " + (_one_line(out) or "no pidfile, no output")


def _verdict(state: Path, name: str, program: str, pid: int) -> str:
    """SIGTERM the program, then its outfile's verdict: "PASS", or the FAIL/ERR line, or what went wrong."""
    code, out = _sh(state, name, f"kill -TERM {pid}")
    if code != 0:
        return f"the program was gone after the move (kill -TERM {pid}: {_one_line(out) or 'no such process'})"
    deadline = time.monotonic() + VERDICT_WAIT
    while time.monotonic() < deadline:
        _, out = _sh(state, name, f"cat {WORKDIR}/{program}.out; kill -0 {pid} 2>/dev/null && echo ALIVE")
        lines = out.splitlines()
        if any(line.split()[-1:] == ["PASS"] for line in lines):  # "19:27:52.996: 7: PASS"
            return "PASS"
        bad = [line for line in lines if "FAIL" in line or "ERR" in line]
        if "ALIVE" not in lines:
            return _one_line(bad[0] if bad else "the program ended without a verdict: " + " ".join(lines[-3:]))
        time.sleep(0.3)
    return f"no verdict {VERDICT_WAIT:.0f} s after SIGTERM"


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- the matrix ------------------------------------------------------------------------------------------


def run_matrix(
    programs: list[str],
    engine_modes: dict[str, tuple[str, ...]],
    progress: Callable[[str], None] = print,
    save: Path | None = None,
) -> Matrix:
    """Every program, engine and mode on a private two-host mesh, torn down afterwards."""
    binaries = build(programs)
    cells: list[Cell] = []
    old_env = os.environ.get("SKYFERRY_STATE")
    state = Path(tempfile.mkdtemp(prefix="skyferry-zdtm-"))
    state.chmod(0o700)
    os.environ["SKYFERRY_STATE"] = str(state)  # the agents and what they start use this state
    try:
        scenario.mesh_up(state, 2, name="zd" + secrets.token_hex(2))
        archives: dict[str, Path] = {}
        # Column by column, each engine's first mode first: a run cut short has whole columns, every engine.
        width = max((len(m) for m in engine_modes.values()), default=0)
        columns = [(e, m[i]) for i in range(width) for e, m in engine_modes.items() if i < len(m)]
        for engine, mode in columns:
            for program in programs:
                binary = binaries.get(program)
                if binary is None:
                    cell = Cell(program=program, engine=engine, mode=mode, outcome="no-start", stage="build",
                                reason="did not build statically from CRIU's tree")  # fmt: skip
                else:
                    if program not in archives:
                        archives[program] = image(binary, state / "images" / f"{program}.tar")
                    cell = run_cell(state, program, engine, mode, archives[program])
                progress(f"{program:22} {engine:7} {mode:10} {cell.outcome:9} {cell.stage or ''} {cell.reason}")
                cells.append(cell)
                if save:  # a long run keeps what it has so far
                    save.write_text(_matrix(cells).model_dump_json(indent=1) + "\n")
    finally:
        scenario.mesh_down(state)
        _remove_tree(state)
        if old_env is None:
            os.environ.pop("SKYFERRY_STATE", None)
        else:
            os.environ["SKYFERRY_STATE"] = old_env
    return _matrix(cells)


def _matrix(cells: list[Cell]) -> Matrix:
    return Matrix(when=datetime.now(UTC).strftime("%Y-%m-%d"), kernel=platform.release(), criu=CRIU_VERSION,
                  cells=cells)  # fmt: skip


def _remove_tree(path: Path) -> None:
    """The bench state, with whatever an engine left mounted below it (Podman's overlay and shm)."""
    mounts = Path("/proc/self/mounts").read_text().splitlines()
    below = [m.split()[1] for m in mounts if m.split()[1].startswith(str(path) + "/")]
    for mount in sorted(below, key=len, reverse=True):
        subprocess.run(["umount", "-l", mount], capture_output=True, check=False)
    shutil.rmtree(path, ignore_errors=True)


# --- docs/compatibility.md -----------------------------------------------------------------------------

RESULTS = Path(__file__).resolve().parents[2] / "docs" / "zdtm-results.json"
DOC = RESULTS.with_name("compatibility.md")
SECTION = matrixdoc.Section(
    "zdtm", "<!-- zdtm-table: generated by `make compat-zdtm`, do not edit -->", "<!-- zdtm-table end -->"
)


def render(matrix: Matrix) -> str:
    """The generated part of the `## zdtm` section: the table, then why each cell that did not pass (one
    note for the cells of a program that stopped the same way)."""
    columns = [(e, m) for e, modes in ENGINE_MODES.items() for m in modes]
    columns = [c for c in columns if any((x.engine, x.mode) == c for x in matrix.cells)]
    by_key = {(c.program, c.engine, c.mode): c for c in matrix.cells}
    programs = list(dict.fromkeys(c.program for c in matrix.cells))
    notes: dict[tuple[str, str], list[str]] = {}  # (program, what happened) -> the columns it happened in
    lines = [
        f"Run {matrix.when} on kernel {matrix.kernel}, CRIU {matrix.criu}: {len(programs)} programs, "
        f"{len(matrix.cells)} cells, {sum(c.outcome == 'pass' for c in matrix.cells)} passed.",
        "",
        "| program | holds | zdtm runs it with | " + " | ".join(f"{e} {m}" for e, m in columns) + " |",
        "| --- | --- | --- | " + " | ".join("---" for _ in columns) + " |",
    ]
    for program in programs:
        d = desc(program) if build_dir().exists() else {}
        wants = ", ".join(f"{k} `{v}`" for k, v in d.items() if k in ("opts", "flags", "feature") and v)
        row = [f"`{program}`", BY_NAME[program].holds if program in BY_NAME else "", wants]
        for engine, mode in columns:
            cell = by_key.get((program, engine, mode))
            if cell is None:
                row.append("not run")
            elif cell.outcome == "pass":
                row.append("pass")
            else:
                reason = STAMP.sub("", cell.reason).rstrip(".")
                what = f"{cell.outcome} at {cell.stage}: {reason}." + _rollback_note(cell)
                notes.setdefault((program, what), []).append(f"{engine} {mode}")
                row.append(f"{cell.outcome} ({cell.stage}) [{list(notes).index((program, what)) + 1}]")
        lines.append("| " + " | ".join(row) + " |")
    if notes:
        lines += ["", "Why:", ""]
        lines += [f"{i}. `{p}`, {', '.join(cols)}: {what}" for i, ((p, what), cols) in enumerate(notes.items(), 1)]
    return "\n".join(lines)


STAMP = re.compile(r"\d\d:\d\d:\d\d\.\d+: \d+: ")  # zdtm's "19:47:39.822: 7: " before each line


def _rollback_note(cell: Cell) -> str:
    if cell.rolled_back is None:
        return ""
    if cell.rolled_back:
        return " Rolled back: the source copy ran on and PASSed."
    return " **Rollback not clean**: the source copy did not PASS afterwards."


def write_doc(matrix: Matrix, doc: Path = DOC, results: Path = RESULTS) -> None:
    """Save the cells as JSON (the CI test's expected outcomes) and replace the table in `## zdtm`."""
    matrixdoc.write_doc(matrix, render(matrix), SECTION, doc, results)


def recorded() -> Matrix:
    return Matrix.model_validate_json(RESULTS.read_text())


def merge(old: Matrix, new: Matrix) -> Matrix:
    """`old` with the cells `new` ran again replaced in place (a rerun of some cells after a fix)."""
    return matrixdoc.merge(old, new, key=lambda c: (c.program, c.engine, c.mode))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("programs", nargs="*", help="zdtm programs (default: the CI subset)")
    parser.add_argument("--all", action="store_true", help="every program, engine and mode; rewrite the docs")
    parser.add_argument("--engine", action="append", choices=list(ENGINE_MODES), help="only these engines")
    parser.add_argument("--mode", action="append", help="only these modes")
    parser.add_argument("--out", type=Path, help="also write the cells as JSON here")
    parser.add_argument("--render", type=Path, help="only rewrite the docs from cells saved by --out")
    parser.add_argument("--merge", action="store_true", help="merge the cells run into the recorded matrix, rewrite")
    args = parser.parse_args(argv)
    if args.render:
        write_doc(Matrix.model_validate_json(args.render.read_text()))
        return 0
    programs = [p.name for p in PROGRAMS] if args.all else (args.programs or list(FAST))
    engines = {e: tuple(m for m in modes if m in (args.mode or modes)) for e, modes in ENGINE_MODES.items()
               if e in (args.engine or ENGINE_MODES)}  # fmt: skip
    matrix = run_matrix(programs, engines, save=args.out)
    if args.all or args.merge:
        write_doc(merge(recorded(), matrix) if args.merge else matrix)
        print(f"wrote {DOC} and {RESULTS}")
    return 0 if all(c.outcome == "pass" for c in matrix.cells) else 1


if __name__ == "__main__":
    sys.exit(main())
