"""Content-based pre-copy against real processes and real CRIU 4.2.1.

The workload is a Python process in its own network namespace that holds non-trivial memory
(random pages, text pages, explicit zero pages), keeps dirtying a hot part of it, and on SIGUSR1
stops dirtying and writes a sha256 of its buffer. Its memory crosses only as streams: the target
builds its image in its own directory and never reads the source's dump directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from skyferry.pipeline.criu import memimage
from skyferry.pipeline.hostapi.framing import FrameReader, FrameWriter, StreamError
from skyferry.pipeline.memory.pages import FORMAT, encode_pages
from skyferry.pipeline.memory.policy import ConvergencePolicy, RoundStats
from skyferry.pipeline.memory.precopy import SourceEngine
from skyferry.pipeline.memory.procmem import process_tree
from skyferry.pipeline.memory.store import TargetStore

CRIU = "/usr/local/sbin/criu"
# Not imported from conftest.py: with several conftest.py files that module name is ambiguous.
NEEDS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
CLONE_NEWNET = 0x40000000

WORKLOAD = r"""
import hashlib, os, random, signal, sys, time
size_mib, rate, hot_frac, reply = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
PAGE = 4096
n = size_mib * 256
rng = random.Random(7)
if os.fork() == 0:  # a child with memory of its own, so the tree has two processes
    mine = bytearray(rng.randbytes(4 << 20))
    parent = os.getppid()
    while os.getppid() == parent:
        time.sleep(0.05)
    os._exit(0)
buf = bytearray(n * PAGE)
for i in range(n):
    kind = i % 10
    if kind < 4:
        buf[i * PAGE:(i + 1) * PAGE] = rng.randbytes(PAGE)
    elif kind < 8:
        buf[i * PAGE:(i + 1) * PAGE] = ((b"record %08d: value=%d; " % (i, i * 7919)) * 200)[:PAGE]
    elif kind == 8:
        buf[i * PAGE:(i + 1) * PAGE] = bytes(PAGE)  # written, present, all zero
    # kind 9: never touched, not present
paused = False
reports = 0

def report(signum, frame):
    global paused, reports
    paused = True
    reports += 1
    with open(reply + ".tmp", "w") as f:
        f.write(f"{reports} {hashlib.sha256(buf).hexdigest()}\n")
    os.replace(reply + ".tmp", reply)

signal.signal(signal.SIGUSR1, report)
with open(reply + ".tmp", "w") as f:
    f.write("0 ready\n")
os.replace(reply + ".tmp", reply)
hot = max(1, int(n * hot_frac))
acc = 0.0
while True:
    time.sleep(0.01)
    if paused:
        continue
    acc += rate / 100
    while acc >= 1:
        acc -= 1
        off = rng.randrange(hot) * PAGE + rng.randrange(PAGE - 64)
        buf[off:off + 64] = rng.randbytes(64)
"""


@dataclass
class Workload:
    proc: subprocess.Popen[bytes]
    reply: Path
    netns: str

    @property
    def pid(self) -> int:
        return self.proc.pid


def wait_reply(reply: Path, number: int, timeout: float = 30.0) -> str:
    """The workload's numbered report ("0 ready", then "<n> <sha256>")."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if reply.exists():
            n, text = reply.read_text().split()
            if int(n) == number:
                return text
        time.sleep(0.02)
    raise AssertionError(f"workload did not write report {number}")


@pytest.fixture
def netns(run_id: str) -> Iterator[str]:
    name = f"{run_id}-precopy"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture
def shm(run_id: str) -> Iterator[Path]:
    """A directory on tmpfs, where the agents keep dumps and images."""
    path = Path(tempfile.mkdtemp(prefix=f"skyferry-{run_id}-", dir="/dev/shm"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def spawn(tmp_path: Path, netns: str) -> Iterator:
    """Start workloads (size MiB, dirty pages/s, hot fraction); kills every one, restored ones too."""
    started: list[int] = []
    script = tmp_path / "workload.py"
    script.write_text(WORKLOAD)

    def enter_netns() -> None:
        import ctypes

        fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
        if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
            os._exit(97)
        os.close(fd)

    def start(size_mib: int, rate: float, hot: float = 0.25) -> Workload:
        reply = tmp_path / f"reply-{len(started)}"
        proc = subprocess.Popen(
            ["/usr/bin/python3", str(script), str(size_mib), str(rate), str(hot), str(reply)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            close_fds=True,
            cwd=tmp_path,
            start_new_session=True,
            preexec_fn=enter_netns,
        )
        started.append(proc.pid)
        w = Workload(proc, reply, netns)
        wait_reply(reply, 0, timeout=60)
        return w

    start.adopt = started.append  # type: ignore[attr-defined]
    try:
        yield start
    finally:
        for pid in started:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            for _ in range(100):
                with contextlib.suppress(ChildProcessError):  # a restored process is init's child
                    os.waitpid(pid, os.WNOHANG)
                if not Path(f"/proc/{pid}").exists() or _state(pid) == "Z":
                    break
                time.sleep(0.05)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return "gone"


def criu_dump(w: Workload, dump_dir: Path) -> float:
    """Freeze with SIGSTOP, dump to dump_dir (the process is killed), reap it; returns seconds."""
    os.kill(w.pid, signal.SIGSTOP)
    ino = os.stat(f"/run/netns/{w.netns}").st_ino
    dump_dir.mkdir()
    external = ["--external", f"net[{ino}]:extnet"]
    t = time.monotonic()
    r = subprocess.run(
        [CRIU, "dump", "-t", str(w.pid), "-D", str(dump_dir), "-o", "dump.log", "-v2", *external],
        capture_output=True,
        text=True,
    )
    took = time.monotonic() - t
    assert r.returncode == 0, (dump_dir / "dump.log").read_text()[-3000:]
    w.proc.wait(timeout=10)
    return took


def criu_restore(image_dir: Path, netns: str) -> tuple[int, float]:
    """Restore detached with the netns passed in; retries while the old pid is still being reaped."""
    fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    inherit = ["--inherit-fd", f"fd[{fd}]:extnet", "--pidfile", str(image_dir / "restored.pid")]
    try:
        for _ in range(40):
            t = time.monotonic()
            r = subprocess.run(
                [CRIU, "restore", "-D", str(image_dir), "-d", "-o", "restore.log", "-v2", *inherit],
                capture_output=True,
                text=True,
                pass_fds=(fd,),
            )
            took = time.monotonic() - t
            if r.returncode == 0:
                return int((image_dir / "restored.pid").read_text()), took
            log = (image_dir / "restore.log").read_text()
            if "File exists" not in log:
                raise AssertionError(log[-3000:])
            time.sleep(0.25)
        raise AssertionError("restore kept failing with 'File exists'")
    finally:
        os.close(fd)


def run_rounds(engine: SourceEngine, store: TargetStore, policy: ConvergencePolicy) -> str:
    """Pre-copy rounds until the policy stops them; returns the reason."""
    while True:
        store.apply(engine.round())
        decision = policy.decide(engine.history)
        if decision.stop:
            return decision.reason


def image_digest(image_dir: Path) -> dict[int, str]:
    """sha256 over (vaddr, bytes) of every page each task would get from the image."""
    out = {}
    for pid in memimage.task_pagemaps(image_dir):
        h = hashlib.sha256()
        for vaddr, data in memimage.image_pages(image_dir, pid):
            for i in range(0, len(data), 4096):  # per page: the two images split runs differently
                h.update((vaddr + i).to_bytes(8, "little"))
                h.update(data[i : i + 4096])
        out[pid] = h.hexdigest()
    return out


def flip(chunks: list[bytes], at: int) -> list[bytes]:
    blob = bytearray(b"".join(chunks))
    blob[at] ^= 0x40
    return [bytes(blob)]


# --- pure pieces -----------------------------------------------------------------------------------


def stats(seq: int, started: float, bytes_out: int) -> RoundStats:
    return RoundStats("round", seq, started, duration=0.5, bytes_out=bytes_out)


def test_policy_reasons() -> None:
    p = ConvergencePolicy(max_delta_bytes=100_000, max_rounds=4, bandwidth=10e6, growth=0.1)
    assert p.decide([]).reason == "continue"
    assert p.decide([stats(1, 0, 50_000_000)]).reason == "continue"
    assert p.decide([stats(1, 0, 50_000_000), stats(2, 5, 80_000)]).reason == "converged"
    # 9 MB dirtied in 1 s on a 10 MB/s link: rounds will not shrink
    assert p.decide([stats(1, 0, 50_000_000), stats(2, 1, 9_000_000)]).reason == "not-converging"
    assert p.decide([stats(1, 0, 50e6), stats(2, 5, 2e6), stats(3, 10, 3e6)]).reason == "growing"
    rounds = [stats(1, 0, 50e6), stats(2, 5, 4e6), stats(3, 10, 3e6), stats(4, 15, 2e6)]
    assert p.decide(rounds).reason == "round-limit"
    assert ConvergencePolicy(max_seconds=8).decide(rounds[:3]).reason == "time-limit"
    # No bandwidth given: round 1 moved 50 MB in 0.5 s, so 100 MB/s is what the streams carry.
    unknown = ConvergencePolicy(max_delta_bytes=100_000)
    assert unknown.decide([stats(1, 0, 50e6), stats(2, 1, 90e6)]).reason == "not-converging"
    assert unknown.decide([stats(1, 0, 50e6), stats(2, 1, 5e6)]).reason == "continue"


def test_policy_auto_converge_and_completion_timeout() -> None:
    p = ConvergencePolicy(max_delta_bytes=100_000, max_rounds=4, bandwidth=10e6, throttle=True)
    # 6 MB dirtied in 1 s on a 10 MB/s link: >= QEMU's 50 % trigger asks for a throttle step, not a stop
    behind = [stats(1, 0, 50e6), stats(2, 1, 6e6)]
    plateau = [stats(1, 0, 50e6), stats(2, 5, 4e6), stats(3, 10, 3.9e6)]  # slow, but the delta did not halve
    assert p.decide(plateau).reason == "throttle"
    assert p.decide(behind).reason == "throttle" and not p.decide(behind).stop
    assert p.decide(behind, throttled=0.5).reason == "throttle"
    at_cap = p.decide(behind, throttled=0.99)
    assert (at_cap.stop, at_cap.reason) == (False, "continue")  # at the cap, 60 % is below dirty_ratio's 80 %
    faster = [stats(1, 0, 50e6), stats(2, 1, 9e6)]
    assert (
        p.decide(faster, throttled=0.99).reason == "not-converging"
        and "99% CPU throttle" in p.decide(faster, throttled=0.99).detail
    )
    assert p.decide([stats(1, 0, 50e6), stats(2, 5, 2e6), stats(3, 10, 3e6)]).reason == "throttle"  # growing
    # While the throttle can still step, no round limit cuts the steps short; at the cap it applies again.
    rounds = [stats(1, 0, 50e6), stats(2, 5, 4e6), stats(3, 10, 1.9e6), stats(4, 15, 0.9e6)]  # halving
    assert p.decide(rounds).reason == "round-limit" and p.decide(rounds, throttled=0.3).reason == "continue"
    assert p.decide(rounds, throttled=0.99).reason == "round-limit"
    # The completion timeout ends the rounds whatever they do, but a converged round still wins.
    timed = ConvergencePolicy(max_delta_bytes=100_000, bandwidth=10e6, throttle=True, completion_seconds=10)
    assert timed.decide(rounds[:3]).reason == "completion-timeout" and timed.decide(rounds[:3]).stop
    assert timed.decide([*rounds[:3], stats(4, 15, 50_000)]).reason == "converged"
    assert timed.decide(behind).reason == "throttle"  # 1.5 s of rounds < 10 s
    # Without auto-converge nothing changes: the same rounds stop as before.
    assert ConvergencePolicy(bandwidth=10e6).decide(faster).reason == "not-converging"


def read_frames(chunks: Iterable[bytes]) -> list[tuple[bytes, bytes]]:
    """The body frames of a memory stream, after its HEAD."""
    reader = FrameReader(chunks, FORMAT)
    reader.head()
    return list(reader)


def test_stream_survives_any_chunking_and_rejects_damage() -> None:
    w = FrameWriter(FORMAT)
    frames = [w.head("round", session="s1", seq=1), w.frame(b"PAGE", os.urandom(5000)), w.frame(b"PAGE", b"x" * 9000)]
    frames.append(w.end({}))
    blob = b"".join(frames)
    for size in (1, 7, 4096, len(blob)):
        got = list(read_frames(blob[i : i + size] for i in range(0, len(blob), size)))
        assert [t for t, _ in got] == [b"PAGE", b"PAGE"]
        assert got[1][1] == b"x" * 9000
    with pytest.raises(StreamError, match="truncated"):
        list(read_frames([blob[:-5]]))
    with pytest.raises(StreamError, match="out of order"):
        list(read_frames([frames[0] + frames[2] + frames[1] + frames[3]]))
    for at in (3, 30, len(frames[0]) + 30, len(blob) - 10):
        with pytest.raises(StreamError):
            list(read_frames(flip(frames, at)))


def round_stream(session: str, seq: int, vpid: int, pages: dict[int, bytes]) -> list[bytes]:
    """A round stream as a source would send it: pages by page number, b"" meaning a zero page."""
    w = FrameWriter(FORMAT)
    data = sorted(v for v, p in pages.items() if p)
    zero = np.array(sorted(v for v, p in pages.items() if not p), np.uint64)
    body = np.frombuffer(b"".join(pages[v] for v in data), np.uint8).reshape(-1, 4096)
    frame = encode_pages(vpid, np.array(data, np.uint64), body, zero)
    return [w.head("round", session=session, seq=seq), w.frame(b"PAGE", frame), w.end({})]


def test_store_is_a_parent_image_across_new_mappings(tmp_path: Path) -> None:
    """Pages land in 1 GiB slabs; a slab below the others moves the rest; CRIU's view stays right."""
    store = TargetStore(tmp_path / "store")
    high, low, mid = 0x7F0000000, 0x55000, 0x7E0000000  # page numbers in three different slabs
    want = {high: os.urandom(4096), high + 1: b"", high + 2: os.urandom(4096), low: os.urandom(4096)}
    store.apply(round_stream("s", 1, 42, {high: want[high], high + 1: b"", high + 2: want[high + 2]}))
    store.apply(round_stream("s", 2, 42, {low: want[low], mid: os.urandom(4096)}))
    want[mid] = os.urandom(4096)
    store.apply(round_stream("s", 3, 42, {mid: want[mid], high + 2: b""}))
    want[high + 2] = b""
    img = memimage.PageImage(store.dir, 42)
    assert [e.vaddr >> 30 for e in img.entries] == sorted({v >> 18 for v in want})
    for vpn, page in want.items():
        assert img.read(vpn << 12, 1) == (page or bytes(4096))
    with pytest.raises(StreamError, match="expected round 4"):
        store.apply(round_stream("s", 2, 42, {low: b""}))
    with pytest.raises(StreamError, match="another migration"):
        store.apply(round_stream("t", 4, 42, {low: b""}))
    assert memimage.PageImage(store.dir, 42).read(low << 12, 1) == want[low]  # refused streams change nothing


# --- real processes --------------------------------------------------------------------------------


@NEEDS_ROOT
@pytest.mark.integration
def test_processes_are_named_by_their_pid_inside_the_container() -> None:
    """In a new pid namespace the tree's processes get CRIU's names: 1, 2, ... as seen inside."""
    code = "import os, time\nif os.fork() == 0:\n    time.sleep(30)\ntime.sleep(30)"
    proc = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--kill-child", "/usr/bin/python3", "-c", code],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        close_fds=True,
    )
    try:
        deadline = time.monotonic() + 10
        while len(tree := process_tree(proc.pid)) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [p.vpid for p in tree] == [proc.pid, 1, 2]
        assert tree[0].pid == proc.pid and tree[1].pid != 1
    finally:
        proc.kill()
        proc.wait()


@NEEDS_ROOT
@pytest.mark.integration
def test_rounds_converge_on_modest_dirty_rate(spawn, tmp_path: Path) -> None:
    w = spawn(64, rate=100)
    engine, store = SourceEngine(w.pid), TargetStore(tmp_path / "store")
    policy = ConvergencePolicy(max_delta_bytes=256 << 10, max_rounds=8, bandwidth=100e6)
    reason = run_rounds(engine, store, policy)
    rounds = engine.history
    print(json.dumps([r.as_dict() for r in rounds], indent=1))
    assert reason == "converged"
    assert len(rounds) >= 2
    assert rounds[-1].pages_changed < rounds[0].pages_changed / 20
    assert rounds[0].pages_scanned >= 64 * 256 * 8 // 10  # 80% of the buffer is present
    assert rounds[0].pages_zero >= 64 * 256 // 10 * 9 // 10  # the written zero pages travel as runs
    assert rounds[0].bytes_out < rounds[0].pages_scanned * 4096  # compressed and zero-elided


@NEEDS_ROOT
@pytest.mark.integration
def test_policy_sees_dirtying_faster_than_the_link(spawn, tmp_path: Path) -> None:
    w = spawn(32, rate=4000, hot=0.5)
    engine, store = SourceEngine(w.pid), TargetStore(tmp_path / "store")
    policy = ConvergencePolicy(max_delta_bytes=64 << 10, max_rounds=8, bandwidth=1e6)
    reason = run_rounds(engine, store, policy)
    print(json.dumps([r.as_dict() for r in engine.history], indent=1))
    assert reason == "not-converging"
    assert len(engine.history) == 2


@NEEDS_ROOT
@pytest.mark.integration
@pytest.mark.slow
def test_end_to_end_restore_is_byte_identical(spawn, shm: Path) -> None:
    # Size and dirty rate can be raised to measure (docs/precopy.md); the defaults keep CI quick.
    mib = int(os.environ.get("SKYFERRY_PRECOPY_MIB", "96"))
    w = spawn(mib, rate=float(os.environ.get("SKYFERRY_PRECOPY_RATE", "300")))
    engine, store = SourceEngine(w.pid), TargetStore(shm / "target" / "store")
    reason = run_rounds(engine, store, ConvergencePolicy(max_delta_bytes=256 << 10, max_rounds=6))
    before = wait_reply_after_signal(w, 1)

    dump_dir = shm / "source" / "dump"
    dump_dir.parent.mkdir()
    t_dump = criu_dump(w, dump_dir)
    t = time.monotonic()
    final = engine.final(dump_dir)
    chunks = list(final)
    t_final = time.monotonic() - t
    image_dir = shm / "target" / "image"
    t = time.monotonic()
    built = store.build_image(iter(chunks), image_dir)
    t_build = time.monotonic() - t

    # Every page the restore will write equals the plain dump's page, parents resolved.
    assert image_digest(image_dir) == image_digest(dump_dir)
    dump_pages = sum(p.stat().st_size for p in dump_dir.glob("pages-*.img"))
    final_bytes = sum(map(len, chunks))
    assert final_bytes < dump_pages / 10
    assert len(memimage.task_pagemaps(image_dir)) == 2 and engine.history[-1].processes == 2
    assert built.pages_parent > 0.9 * final.stats.pages_scanned

    pid, t_restore = criu_restore(image_dir, w.netns)
    spawn.adopt(pid)
    os.kill(pid, signal.SIGUSR1)
    os.kill(pid, signal.SIGCONT)
    after = wait_reply(w.reply, 2)
    assert after == before
    report = {
        "stop_reason": reason,
        "rounds": [r.as_dict() for r in engine.history],
        "final": final.stats.as_dict(),
        "dump_pages_bytes": dump_pages,
        "dump_s": t_dump,
        "final_stream_s": t_final,
        "build_image_s": t_build,
        "restore_s": t_restore,
        "freeze_without_network_s": t_dump + t_final + t_build + t_restore,
        "final_bytes": final_bytes,
        "all_streams_bytes": sum(r.bytes_out for r in engine.history) + final_bytes,
    }
    print(json.dumps(report, indent=1))


def wait_reply_after_signal(w: Workload, number: int) -> str:
    os.kill(w.pid, signal.SIGUSR1)
    return wait_reply(w.reply, number)


@NEEDS_ROOT
@pytest.mark.integration
def test_corrupted_streams_are_rejected_before_restore(spawn, tmp_path: Path) -> None:
    w = spawn(16, rate=2000)
    engine, store = SourceEngine(w.pid), TargetStore(tmp_path / "store")
    good = list(engine.round())
    with pytest.raises(StreamError, match=r"checksum|damaged"):
        store.apply(flip(good, len(good[0]) + 100))
    assert store.session is None and not list(store.dir.iterdir())  # the store dropped everything
    with pytest.raises(StreamError, match=r"another migration|round 1"):
        store.apply(engine.round())  # the source still thinks round 1 landed
    engine.reset()
    store.apply(engine.round())
    store.apply(engine.round())

    dump_dir = tmp_path / "dump"
    criu_dump(w, dump_dir)  # frozen mid-dirtying: the final delta holds what changed since round 2
    chunks = list(engine.final(dump_dir))
    image_dir = tmp_path / "image"
    for at in (len(chunks[0]) + 10, sum(map(len, chunks)) // 2, sum(map(len, chunks)) - 30):
        with pytest.raises(StreamError):
            store.build_image(flip(chunks, at), image_dir)
        assert not image_dir.exists()
    with pytest.raises(StreamError, match="truncated"):
        store.build_image(chunks[:-1], image_dir)
    assert not image_dir.exists()
    store.build_image(iter(chunks), image_dir)
    assert image_digest(image_dir) == image_digest(dump_dir)
