"""Writers for the store's concurrency test, run in separate processes (spawned: nothing inherited).

Each round adds a host and homes a container the way callers do: addresses from Ipam, the host and
one home through load-change-save (inventory join), another home through set_home (routes.publish).
`whole_document_writer` does the same with the old persistence, the whole mesh read and replaced.
"""

import json
import os
import time
from multiprocessing.synchronize import Barrier
from pathlib import Path
from queue import Queue

from skyferry.netplane.ipam import Ipam
from skyferry.netplane.mesh import Mesh, MeshHost

Result = tuple[int, list[str]]  # worker number, the addresses it was handed
PAUSE_S = 0.01  # between load and save: the window in which another writer can slip in


def member(name: str, ip: str) -> MeshHost:
    return MeshHost(name, ip, "203.0.113.1:51820", f"key-{name}", "wg0", None, "/var/lib/skyferry-host", "inventory")


def names(worker: int, i: int) -> tuple[str, str, str]:
    return f"w{worker}-{i}", f"container:w{worker}-{i}-a", f"container:w{worker}-{i}-b"


def store_writer(state: str, worker: int, rounds: int, start: Barrier, out: "Queue[Result]") -> None:
    start.wait()
    got = []
    for i in range(rounds):
        host, a, b = names(worker, i)
        host_ip, ip_a, ip_b = (Ipam(Path(state)).allocate(owner) for owner in (f"host:{host}", a, b))
        mesh = Mesh.load(Path(state))
        mesh.hosts[host] = member(host, host_ip)
        mesh.homes[ip_a] = host
        time.sleep(PAUSE_S)
        mesh.save(Path(state))
        mesh.set_home(ip_b, host)
        got += [host_ip, ip_a, ip_b]
    out.put((worker, got))


def whole_document_writer(state: str, worker: int, rounds: int, start: Barrier, out: "Queue[Result]") -> None:
    """The old way: read the whole description, change it, write it back whole (atomically, like mesh.toml)."""
    path = Path(state) / "old-mesh.json"
    start.wait()
    got = []
    for i in range(rounds):
        host, a, b = names(worker, i)
        host_ip, ip_a, ip_b = (Ipam(Path(state)).allocate(owner) for owner in (f"host:{host}", a, b))
        for change in ({"hosts": {host: host_ip}, "homes": {ip_a: host}}, {"homes": {ip_b: host}}):
            doc = json.loads(path.read_text())
            for key, rows in change.items():
                doc[key].update(rows)
            time.sleep(PAUSE_S)
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            tmp.write_text(json.dumps(doc))
            tmp.replace(path)
        got += [host_ip, ip_a, ip_b]
    out.put((worker, got))
