"""runc's checkpoint request, sent to a CRIU worker started ahead (pipeline/runtimes/runcdump.py,
pipeline/criu/worker.py), on a real container in a network namespace of its own given by path, as the
agents run them.

The control is runc itself: `runc --debug checkpoint` logs every option it sends CRIU, and the request
built from runc's state file must carry the same ones; `runc restore` must take the images as its own
and `runc state` must then know the restored container."""

import json
import os
import re
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf.descriptor import FieldDescriptor
from kit import runcbundle
from kit.cgroups import remove_tree
from pycriu import rpc_pb2 as rpc
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.runtimes import runcdump
from skyferry.pipeline.runtimes.runc import RUNC, Runc

pytestmark = [pytest.mark.integration, pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]

# Options runc sends that the worker's request sets otherwise on purpose: file descriptors of runc's
# process (the request names the images by path and passes the work directory's fd from the agent), and
# CRIU's notifications, which only runc's hooks and network strategies answer (this engine has neither:
# the agent locks the netns itself and CRIU's own lock is off: runc.CRIU_CONF).
DIFFERENT = {"ImagesDirFd", "WorkDirFd", "NotifyScripts"}


@pytest.fixture
def runc(tmp_path: Path) -> Iterator[tuple[Runc, str]]:
    tag = secrets.token_hex(3)
    prefix, name, netns = f"/sf-runcdump-{tag}", "c1", f"sf-runcdump-{tag}"
    rt = Runc(tmp_path / "host", prefix)
    rt.root.mkdir(parents=True)
    subprocess.run(["ip", "netns", "add", netns], check=True)
    bundle = rt.bundle(name)
    config = runcbundle.sleeper(bundle, rt.cgroup(name))
    config["root"]["readonly"] = False  # CRIU's restore makes a directory in the root (as the agents' bundles allow)
    # Like the agent's bundles (runtimes/isolation.py): no cgroup mount, which runc v1 hosts dump otherwise.
    config["mounts"] = [m for m in config["mounts"] if m["type"] != "cgroup"]
    for ns in config["linux"]["namespaces"]:
        if ns["type"] == "network":
            ns["path"] = f"/run/netns/{netns}"
    (bundle / "criu.conf").write_text("network-lock skip\n")
    config["annotations"] = {"org.criu.config": str(bundle / "criu.conf")}
    runcbundle.save(bundle, config)
    subprocess.run([RUNC, "--root", str(rt.root), "run", "-d", "--bundle", str(bundle), name], check=True,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        yield rt, name
    finally:
        rt.delete(name)
        subprocess.run(["ip", "netns", "delete", netns], check=False)
        remove_tree(prefix)


def _runc_options(rt: Runc, name: str, images: Path, work: Path) -> dict[str, str]:
    """What `runc --debug checkpoint --leave-running --tcp-established --file-locks` told CRIU."""
    argv = [RUNC, "--debug", "--root", str(rt.root), "checkpoint", "--leave-running", "--tcp-established",
            "--file-locks", "--image-path", str(images), "--work-path", str(work), name]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, check=True)
    found = re.findall(r'msg="CRIU option (\w+) with value (.*?)" func=', proc.stderr)
    assert found, proc.stderr
    return dict(found)


def _as_runc_logs(opts: rpc.criu_opts, field: FieldDescriptor) -> str:
    """A request field as runc's debug log prints it (Go's getters: defaults for unset fields)."""
    value = getattr(opts, field.name)
    if field.label == FieldDescriptor.LABEL_REPEATED:
        return "[]" if not value else "(set)"
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return "<nil>" if not opts.HasField(field.name) else "(set)"
    if field.type == FieldDescriptor.TYPE_ENUM:
        return field.enum_type.values_by_number[value].name
    return str(value).lower() if isinstance(value, bool) else str(value)


def test_the_request_carries_every_option_runc_sends(runc: tuple[Runc, str], tmp_path: Path) -> None:
    rt, name = runc
    theirs = _runc_options(rt, name, tmp_path / "runc-images", tmp_path / "runc-work")
    state = json.loads((rt.root / name / "state.json").read_text())
    req = runcdump.request(state, tmp_path / "images", 99, None)
    fields = {"".join(p.title() for p in f.name.split("_")): f for f in req.opts.DESCRIPTOR.fields}
    assert set(theirs) <= set(fields), "runc sends nothing pycriu's schema lacks"
    for go_name, value in theirs.items():
        if go_name not in DIFFERENT | {"ExtMnt", "External"}:
            assert _as_runc_logs(req.opts, fields[go_name]) == value, go_name
    assert theirs["EmptyNs"] == str(1 << 30), "runc's CLI always sends CLONE_NEWNET: our copy checks it"
    mounts = re.findall(r'key:\\?"([^"\\]*)\\?"\s+val:\\?"([^"\\]*)\\?"', theirs["ExtMnt"])
    assert mounts and sorted(mounts) == sorted((m.key, m.val) for m in req.opts.ext_mnt)
    assert theirs["External"].strip("[]") == " ".join(req.opts.external)
    assert re.fullmatch(r"net\[\d+\]:extRootNetNS", req.opts.external[0])
    assert json.loads((tmp_path / "runc-images" / "descriptors.json").read_text()) == state["external_descriptors"]


def test_a_dump_through_the_worker_started_ahead_restores_with_runc(runc: tuple[Runc, str], tmp_path: Path) -> None:
    rt, name = runc
    rt.checkpoint_ahead(name)
    rt.checkpoint_ahead(name)  # idempotent: one worker
    (worker,) = rt._ahead.values()
    rt.pause(name)
    images, work = tmp_path / "images", tmp_path / "work"
    rt.checkpoint(name, images, work)
    assert worker.proc.returncode is not None and rt._ahead == {}, "the worker started ahead dumped, and is done"
    assert "Dumping finished successfully" in (work / "dump.log").read_text()
    assert rt.state(name)["status"] == "paused", "left as it was: frozen"
    subprocess.run([RUNC, "--root", str(rt.root), "delete", "--force", name], check=True)
    rt.restore(name, images, tmp_path / "restore-work")
    said = json.loads(subprocess.run([RUNC, "--root", str(rt.root), "state", name], capture_output=True,
                                     text=True, check=True).stdout)  # fmt: skip
    assert said["status"] == "running" and rt.state(name)["status"] == "running"
    assert Path(f"/proc/{said['pid']}/cmdline").read_bytes() == b"sleep\x00600\x00"


def test_an_unused_worker_is_ended(runc: tuple[Runc, str]) -> None:
    rt, name = runc
    rt.checkpoint_ahead(name)
    (worker,) = rt._ahead.values()
    assert worker.alive()
    rt.checkpoint_ahead(name, ready=False)
    assert worker.proc.returncode is not None and rt._ahead == {}


def test_a_failed_dump_names_criu_s_error(runc: tuple[Runc, str], tmp_path: Path) -> None:
    rt, name = runc
    subprocess.run([RUNC, "--root", str(rt.root), "kill", name, "KILL"], check=True)
    state = json.loads((rt.root / name / "state.json").read_text())
    while Path(f"/proc/{state['init_process_pid']}").exists():  # gone: CRIU has nothing to seize
        subprocess.run(["sleep", "0.05"], check=True)
    with pytest.raises(SkyferryError, match="checkpoint failed") as failed:
        rt.checkpoint(name, tmp_path / "images", tmp_path / "work")
    assert failed.value.log and "CRIU dump.log" in failed.value.log
