"""`runc checkpoint --leave-running`, sent to a CRIU worker started ahead instead of through runc.

runc's checkpoint is one CRIU request built from runc's own state file (libcontainer's `Checkpoint`,
runc 1.1) plus `descriptors.json` in the images, which `runc restore` reads back. A dump that leaves the
container running changes nothing runc keeps (its only trace is an empty `checkpoint` marker that runc
never reads back), so sending the same request ourselves keeps runc's state consistent, and `runc
restore` takes the images as its own. What it saves is runc's start, its CRIU version query and CRIU's
own start: 15-20 ms of a tiny container's freeze (docs/migration.md, "Where the freeze goes", item 20).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pycriu import rpc_pb2 as rpc
from skyferry.pipeline.criu import logs
from skyferry.pipeline.criu.worker import Worker
from skyferry.pipeline.errors import SkyferryError

RUNC_CONF = "/etc/criu/runc.conf"  # runc's default CRIU config file, without an `org.criu.config` label
CLONE_NEWNET = 0x40000000
CGROUP2 = Path("/sys/fs/cgroup/cgroup.controllers")  # present only where cgroup v2 is the whole tree


def request(state: dict[str, Any], images: Path, work_fd: int, parent: str | None) -> rpc.criu_req:
    """The DUMP request `runc checkpoint --leave-running --tcp-established --file-locks` would send for
    the container whose runc `state` (state.json) this is; `work_fd`: the work directory, open in this
    process (CRIU opens it through /proc/<our pid>/fd)."""
    config = state["config"]
    pid = int(state["init_process_pid"])
    opts = rpc.criu_opts(
        images_dir_fd=-1,
        images_dir=str(images),
        log_level=4,
        log_file="dump.log",
        work_dir_fd=work_fd,
        root=config["rootfs"],
        manage_cgroups=True,
        pid=pid,
        leave_running=True,
        tcp_established=True,
        file_locks=True,
        orphan_pts_master=True,
        empty_ns=CLONE_NEWNET,  # runc's CLI always asks it: "runc doesn't manage network devices"
    )
    labels = dict(label.split("=", 1) for label in config.get("labels") or [] if "=" in label)
    if labels.get("org.criu.config", RUNC_CONF):
        opts.config_file = labels.get("org.criu.config", RUNC_CONF)
    for ns in config.get("namespaces") or []:
        kind = {"NEWNET": "net", "NEWPID": "pid"}.get(ns["type"])
        if kind and ns.get("path"):  # a namespace given by path is the host's to keep: external
            opts.external.append(f"{kind}[{os.stat(ns['path']).st_ino}]:extRoot{kind.title()}NS")
    unified = CGROUP2.exists()
    freezer = state["cgroup_paths"].get("" if unified else "freezer")
    if freezer:
        opts.freeze_cgroup = freezer
    if parent:
        opts.parent_img, opts.track_mem = parent, True
    cgroupns = any(ns["type"] == "NEWCGROUP" for ns in config.get("namespaces") or [])
    for mount in config.get("mounts") or []:
        if mount["device"] == "bind":
            _external(opts, mount["destination"], mount["destination"])
        elif mount["device"] == "cgroup" and not (unified or cgroupns):
            raise SkyferryError(
                "a cgroup v1 mount without a cgroup namespace: not dumped outside runc",
                hint="give the container a cgroup namespace",
            )
    for path in config.get("mask_paths") or []:  # masked files are /dev/null bound over them
        target = f"/proc/{pid}/root/{path}"
        if os.path.exists(target) and not os.path.isdir(target):
            _external(opts, path, "/dev/null")
    for device in config.get("devices") or []:
        _external(opts, device["path"], device["path"])
    return rpc.criu_req(type=rpc.DUMP, opts=opts)


def dump(worker: Worker, state: dict[str, Any], images: Path, work: Path, parent: str | None) -> None:
    """Dump through `worker`, with runc's `descriptors.json` (the init's stdio, which `runc restore`
    hands back to it). Raises SkyferryError with CRIU's first error if the dump failed or the worker died
    (killed by a freeze watchdog, say)."""
    fds = os.open(images / "descriptors.json", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(fds, "w") as out:
        json.dump(state.get("external_descriptors") or [], out)
    fd = os.open(work, os.O_RDONLY | os.O_DIRECTORY)
    try:
        resp = worker.call(request(state, images, fd, parent))
        failed = None if resp.success else f"CRIU's dump failed (errno {resp.cr_errno})"
    except OSError as exc:
        failed = f"CRIU's worker failed: {exc}"
    finally:
        os.close(fd)
    if failed:
        raise logs.failure("checkpoint", "criu", failed, failed, work / "dump.log")


def _external(opts: rpc.criu_opts, destination: str, value: str) -> None:
    opts.ext_mnt.append(rpc.ext_mount_map(key=destination, val=value))
