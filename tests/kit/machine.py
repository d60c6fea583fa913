"""A "machine made elsewhere" for join tests: an empty netns on a local mesh's underlay switch, and a way
to run Python in it (as `skyferry join` would run on that machine)."""

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from skyferry.netplane import netns
from skyferry.netplane.mesh import Mesh
from skyferry.netplane.netns import in_netns
from skyferry.providers.local import _veth_to_switch


@contextmanager
def machine_on_underlay(mesh: Mesh, address: str, suffix: str = "jn") -> Iterator[str]:
    """Netns `<mesh>-<suffix>` with `address` on the mesh's underlay; removed whatever happens."""
    assert mesh.local is not None, "needs a local mesh"
    machine = f"{mesh.name}-{suffix}"
    netns.create(machine)
    try:
        _veth_to_switch(mesh.local.switch_netns, machine, suffix, address)
        yield machine
    finally:
        netns.remove(machine)


def run_in(machine: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run `fn` in a thread that sits in netns `machine`; its result, or its exception raised here."""
    out: dict[str, Any] = {}

    def run() -> None:
        with in_netns(machine):
            try:
                out["value"] = fn(*args, **kwargs)
            except BaseException as exc:
                out["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]
