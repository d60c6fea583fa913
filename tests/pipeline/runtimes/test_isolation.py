"""Containers see only what they are given: their own rootfs and /etc, Docker's default capabilities and
seccomp profile, no_new_privs, the user asked for; and they still migrate live.

Real runc containers on a real local mesh (agents, CRIU). Each refusal has a positive control on the
same path: the host's root reads the file, a container given the directory reads it too, the syscall
the filter refuses works on the host.
"""

import ctypes
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kit.mesh import local_mesh
from skyferry.netplane.mesh import Mesh
from skyferry.pipeline.controller import agentctl, containers, migration
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.hostapi.spec import HOST_PROGRAMS, ContainerSpec, parse_user
from skyferry.pipeline.runtimes import isolation, runc
from skyferry.pipeline.scenarios import demo as scenario

SKYFERRY = str(Path(sys.executable).parent / "skyferry")
DOCKER_CAPEFF = "00000000a80425fb"  # what `docker run busybox grep CapEff /proc/self/status` prints
KEYCTL = 250  # x86_64; keyctl(KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING, 0) needs no capability
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


# --- the spec and the profile, without running anything ------------------------------------------------


def test_user_parses_and_defaults_the_group_to_the_uid_never_root() -> None:
    assert parse_user("1000") == (1000, 1000)
    assert parse_user("1000:50") == (1000, 50)
    for bad in ("bob", "-1", "1000:", ":5", "4294967295", "1.5"):
        with pytest.raises(ValueError):
            parse_user(bad)


def test_host_dirs_are_checked_at_the_boundary() -> None:
    ok = ContainerSpec(name="a", args=["true"], ip="100.64.0.9", host_dirs=["/usr", "/opt/tools"])
    assert ContainerSpec.from_dict(ok.to_dict()) == ok
    for bad in (["/"], ["usr"], ["/usr/../etc"], ["/proc"], ["/sys/kernel"], ["/dev"], ["/usr", "/usr"], ["/a//b"]):
        with pytest.raises(ValueError):
            ContainerSpec(name="a", args=["true"], ip="100.64.0.9", host_dirs=bad)
    with pytest.raises(ValueError):
        ContainerSpec.from_dict({"name": "a", "args": ["true"], "ip": "100.64.0.9", "uid": -1})
    with pytest.raises(ValueError):
        ContainerSpec(name="a", args=["true"], ip="100.64.0.9", seccomp="off")


def test_the_seccomp_profile_has_dockers_semantics() -> None:
    profile = isolation.seccomp(machine="x86_64")
    assert profile["defaultAction"] == "SCMP_ACT_ERRNO" and profile["defaultErrnoRet"] == 1  # EPERM
    allowed = {
        n for r in profile["syscalls"] if r["action"] == "SCMP_ACT_ALLOW" and "args" not in r for n in r["names"]
    }
    # Positive control: what every program needs is there.
    assert {"read", "write", "openat", "execve", "mmap", "futex", "socketpair", "chroot", "arch_prctl"} <= allowed
    # What moby's default profile denies a container without CAP_SYS_ADMIN, CAP_SYS_MODULE and the like.
    denied = {
        "keyctl", "add_key", "request_key", "mount", "umount2", "unshare", "setns", "pivot_root", "bpf",
        "perf_event_open", "kexec_load", "init_module", "finit_module", "reboot", "swapon", "userfaultfd",
        "open_by_handle_at", "clock_settime", "settimeofday", "acct", "syslog", "iopl", "clone", "clone3",
        "io_uring_setup", "io_uring_enter",
    }  # fmt: skip
    assert not denied & allowed
    by_name = {r["names"][0]: r for r in profile["syscalls"] if len(r["names"]) == 1}
    assert by_name["clone"]["args"] == [{"index": 0, "value": 0x7E020000, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}]
    assert by_name["clone3"] == {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38}
    assert by_name["socket"]["args"][0]["op"] == "SCMP_CMP_NE"  # any family but AF_VSOCK
    assert "chroot" not in {n for r in isolation.seccomp(caps=(), machine="x86_64")["syscalls"] for n in r["names"]}


@needs_root
def test_preparing_a_rootfs_never_writes_through_its_symlinks(tmp_path: Path) -> None:
    """A --rootfs or image may hold links to host files where skyferry writes (/etc/hosts, the log): the
    files outside stay as they were, and a rootfs whose /etc is a link is refused."""
    canary = tmp_path / "canary"
    canary.write_text("host file\n")
    rootfs = tmp_path / "rootfs"
    (rootfs / "etc").mkdir(parents=True)
    for name in ("hosts", "resolv.conf", "hostname"):
        (rootfs / "etc" / name).symlink_to(canary)
    isolation.prepare_rootfs(rootfs, "c", "100.64.0.9", 1000, 1000, [])
    assert not (rootfs / "etc" / "hosts").is_symlink() and "100.64.0.9\tc" in (rootfs / "etc" / "hosts").read_text()
    assert (rootfs / ".skyferry" / "app.log").stat().st_uid == 1000  # the user appends; the dir stays root's
    assert (rootfs / "bin" / "sh").resolve() == (rootfs / "bin" / "busybox").resolve()  # a shell of its own
    # A log the rootfs links to a host file is left alone: not followed, not chowned (and `logs` refuses it).
    (rootfs / ".skyferry" / "app.log").unlink()
    (rootfs / ".skyferry" / "app.log").symlink_to(canary)
    isolation.prepare_rootfs(rootfs, "c", "100.64.0.9", 1000, 1000, [])
    assert (rootfs / ".skyferry" / "app.log").is_symlink()
    assert canary.read_text() == "host file\n" and canary.stat().st_uid == 0
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "etc").symlink_to(tmp_path / "outside-etc")
    with pytest.raises(ValueError, match="symlink"):
        isolation.prepare_rootfs(linked, "c", "100.64.0.9", 0, 0, [])
    assert not (tmp_path / "outside-etc").exists()


# --- real containers -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Mesh]]:
    with local_mesh(tmp_path_factory, prefix="i") as made:
        yield made


def _output(state: Path, name: str, args: list[str], **kw: object) -> str:
    """Run `args` then `echo END` in a new container, which then sleeps (`run` fails a command that exits
    at once); its output once END appears. Removed afterwards."""
    script = '"$@"; echo END; exec sleep 100000'
    containers.run(state, "local-1", name, ["/bin/sh", "-c", script, "sh", *args], **kw)  # type: ignore[arg-type]
    try:
        return _wait_for_end(state, name)
    finally:
        containers.remove(state, name)


def _wait_for_end(state: Path, name: str) -> str:
    deadline = time.monotonic() + 60
    while "END" not in (out := containers.logs(state, name).decode(errors="replace")):
        assert time.monotonic() < deadline, f"{name} never finished: {out!r}"
        time.sleep(0.2)
    return out


def _status(text: str) -> dict[str, str]:
    """The `Key:\tvalue` lines of a /proc/PID/status text (other lines are left out)."""
    fields = (line.partition(":") for line in text.splitlines())
    return {key.strip(): value.strip() for key, sep, value in fields if sep}


def _masked(pid: int) -> dict[str, tuple[tuple[str, ...], bool]]:
    """Each masked directory as container `pid` sees it: (its entries, whether it is read-only). Positive
    control: the host's own /sys/firmware has entries."""
    seen = {}
    for path in isolation.MASKED:
        if os.path.isdir(path):
            inside = f"/proc/{pid}/root{path}"
            seen[path] = (tuple(sorted(os.listdir(inside))), bool(os.statvfs(inside).f_flag & os.ST_RDONLY))
    assert os.listdir("/sys/firmware"), "control: the host's /sys/firmware has entries"
    return seen


def _root_line() -> str:
    """Positive control: the host's /etc/shadow exists and root on the host reads its root entry."""
    shadow = Path("/etc/shadow")
    assert shadow.is_file()
    root = next(ln for ln in shadow.read_text().splitlines() if ln.startswith("root:"))
    assert len(root) > len("root:"), root
    return root


@pytest.mark.integration
@needs_root
@pytest.mark.parametrize("given", ["nothing", "host-programs"])
def test_a_container_cannot_read_the_hosts_shadow(mesh: tuple[Path, Mesh], given: str) -> None:
    state, _ = mesh
    root = _root_line()
    dirs = list(HOST_PROGRAMS) if given == "host-programs" else []
    out = _output(state, f"shadow-{given}", ["cat", "/etc/shadow", "/etc/hosts"], host_dirs=dirs)
    assert root not in out and "root:" not in out, out
    assert "/etc/shadow" in out and "No such file" in out, out  # its own /etc, without a shadow file
    assert "localhost" in out, out  # ... and with its own hosts file


@pytest.mark.integration
@needs_root
def test_a_container_given_the_hosts_etc_reads_it(mesh: tuple[Path, Mesh]) -> None:
    """The control for the test above: the same command, the directory bound on purpose."""
    state, _ = mesh
    root = _root_line()
    assert root in _output(state, "shadow-bound", ["cat", "/etc/shadow"], host_dirs=["/etc"])


@pytest.mark.integration
@needs_root
def test_a_default_container_has_dockers_capabilities_no_new_privs_and_seccomp(mesh: tuple[Path, Mesh]) -> None:
    state, _ = mesh
    inside = _status(_output(state, "status", ["cat", "/proc/self/status"]))
    assert inside["CapEff"] == inside["CapPrm"] == inside["CapBnd"] == DOCKER_CAPEFF, inside
    assert inside["CapInh"] == inside["CapAmb"] == "0000000000000000", inside
    assert inside["NoNewPrivs"] == "1" and inside["Seccomp"] == "2", inside
    # Control: the same fields of this test, on the host, differ, so the reading above is the container's.
    host = _status(Path("/proc/self/status").read_text())
    assert host["CapEff"] != DOCKER_CAPEFF and host["Seccomp"] == "0", host


@pytest.mark.integration
@needs_root
def test_the_seccomp_filter_refuses_what_dockers_refuses(mesh: tuple[Path, Mesh]) -> None:
    state, _ = mesh
    probe = f"import ctypes; libc = ctypes.CDLL(None, use_errno=True); r = libc.syscall({KEYCTL}, 0, -3, 0); "
    probe += "print('keyctl', r, ctypes.get_errno())"
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.syscall(KEYCTL, 0, -3, 0) >= 0, "control: keyctl works on the host"
    out = _output(state, "keyctl", [scenario.PYTHON, "-c", probe], host_dirs=list(HOST_PROGRAMS))
    assert "keyctl -1 1\n" in out, out  # EPERM, from the filter: keyctl needs no capability
    # The control inside: the same container asked to run without a filter (`--seccomp unconfined`).
    unconfined = _output(state, "keyctl-free", [scenario.PYTHON, "-c", probe], host_dirs=list(HOST_PROGRAMS),
                         seccomp="unconfined")  # fmt: skip
    assert "keyctl -1" not in unconfined and "keyctl " in unconfined, unconfined


@pytest.mark.integration
@needs_root
def test_user_runs_the_command_as_that_user(mesh: tuple[Path, Mesh]) -> None:
    state, _ = mesh
    script = "id -u; id -g; grep -E '^(CapEff|NoNewPrivs|Seccomp):' /proc/self/status; echo END; exec sleep 100000"
    argv = [SKYFERRY, "run", "--host", "local-1", "--name", "user", "--user", "1000", "--json"]
    proc = subprocess.run([*argv, "--", "/bin/sh", "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    try:
        out = _wait_for_end(state, "user")
        # `skyferry exec` runs as the container's user too, under its filter (runc exec reads config.json).
        probe = ["/bin/sh", "-c", "id -u; grep Seccomp: /proc/self/status"]
        inside = subprocess.run([SKYFERRY, "exec", "user", "--", *probe], capture_output=True, text=True)
        assert inside.returncode == 0 and inside.stdout.split() == ["1000", "Seccomp:", "2"], inside
    finally:
        containers.remove(state, "user")
    lines = out.splitlines()
    assert lines[:2] == ["1000", "1000"], out
    status = _status(out)
    assert status["CapEff"] == "0000000000000000" and status["NoNewPrivs"] == "1" and status["Seccomp"] == "2", out
    bad = subprocess.run([*argv[:6], "--user", "bob", "--", "true"], capture_output=True, text=True)
    assert bad.returncode == 2 and "UID[:GID]" in bad.stdout + bad.stderr


@pytest.mark.integration
@needs_root
@pytest.mark.parametrize("uid", [0, 1000])
def test_a_confined_container_migrates_live(mesh: tuple[Path, Mesh], tmp_path: Path, uid: int) -> None:
    """CRIU dumps and restores the user, the capabilities, no_new_privs and the seccomp filter; the
    client's connection survives. Where the source's root lacks CAP_SYS_RESOURCE (this sandbox), CRIU
    cannot dump another user's task, and the check refuses a --user container before anything freezes."""
    state, m = mesh
    name = f"confined{uid}"
    args = [scenario.PYTHON, "/app/counter.py", "serve", str(scenario.PORT)]
    rootfs = scenario.counter_rootfs(tmp_path)
    info = containers.run(state, "local-1", name, args, rootfs=rootfs, user=(uid, uid), host_dirs=list(HOST_PROGRAMS))
    client = scenario.CounterClient(m.hosts["local-3"].netns or "", info["ip"], tmp_path).start()
    try:
        before = _status(Path(f"/proc/{info['pid']}/status").read_text())
        assert before["Uid"].split() == [str(uid)] * 4 and before["Seccomp"] == "2", before
        masked = _masked(info["pid"])
        assert masked and set(masked.values()) == {((), True)}, masked
        can_dump = agentctl.client(state, m, "local-1").call("GET", "/v1/facts")["dumps_other_users"]
        if uid and not can_dump:
            with pytest.raises(SkyferryError, match="failed at check: CRIU on local-1 cannot dump"):
                migration.migrate(state, name, "local-2")
            where = {r["name"]: r for r in containers.live(state)}[name]
            assert where["host"] == "local-1" and where["state"] == "running", where
            client.wait_for(client.progress() + 3)
        else:
            report = migration.migrate(state, name, "local-2")
            assert report["state"] == "done", json.dumps(report)
            client.wait_for(client.progress() + 5)
            where = {r["name"]: r for r in containers.live(state)}[name]
            assert where["host"] == "local-2" and where["state"] == "running", where
            after = _status(Path(f"/proc/{where['pid']}/status").read_text())
            for key in ("Uid", "Gid", "CapEff", "CapBnd", "NoNewPrivs", "Seccomp", "Seccomp_filters"):
                assert after[key] == before[key], (key, before[key], after[key])
            # Masked directories moved as CRIU-external mounts, not tarred: still empty and read-only.
            assert _masked(where["pid"]) == masked
            dump = (Path(m.hosts["local-1"].state_root) / "logs" / report["id"] / "work-dump.log").read_text()
            assert f"Found {runc.MASK_KEY} mapping for ./proc/acpi" in dump
        result = client.stop()
        assert result["survived"] and not result["errors"], result
    finally:
        client.stop()
        containers.remove(state, name)
