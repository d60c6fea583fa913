"""Keep a container's network namespace silent during a migration (nftables, inside that netns).

- The **source** is locked both ways from checkpoint until confirm or rollback. CRIU locks the network
  during a dump but lifts the lock when it leaves the tasks alive, and our source stays frozen (not
  killed) until the target is live. Without this lock the source kernel would keep ACKing the client's
  retransmissions into a socket whose state the target no longer shares.
- The **target** is locked inbound only, from prepare until its restore succeeded. Peers may already
  route to it (cutover happens before restore), and an empty netns would answer them with RSTs. Nothing
  in it can send before the restore, and the restored process's first packets must not be dropped:
  a dropped reply makes the restored socket back off for seconds.

Rules go in through libnftables (the library behind `nft`) from a thread switched into the netns: lock
and unlock sit inside the freeze, where spawning `nsenter nft` cost 20-50 ms a call on a loaded host.
"""

import ctypes
import functools
import subprocess
import threading

from skyferry.netplane.netns import command, in_netns
from skyferry.pipeline.errors import SkyferryError

TABLE = "skyferry_lock"
# Priority -400 runs before conntrack and any rule the container might add; loopback stays open.
_IN = 'chain in { type filter hook input priority -400; policy drop; iifname "lo" accept; }'
_OUT = 'chain out { type filter hook output priority -400; policy drop; oifname "lo" accept; }'


@functools.cache
def _lib() -> ctypes.CDLL:
    """libnftables, loaded on first use so that a host without it gets an error it can act on."""
    try:
        lib = ctypes.CDLL("libnftables.so.1", use_errno=True)
    except OSError:
        raise SkyferryError(
            "libnftables.so.1 is missing: containers cannot be locked during a migration",
            hint="apt-get install nftables (scripts/bootstrap-host.sh does)",
        ) from None
    lib.nft_ctx_new.restype = ctypes.c_void_p
    lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
    lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
    lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
    lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    return lib


def _nft(netns: str | None, script: str) -> tuple[int, str]:
    """Run an nft script in `netns` (None: this agent's own); (status, error text)."""
    lib = _lib()
    with in_netns(netns):  # the context's netlink socket is opened, and stays, in this netns
        ctx = lib.nft_ctx_new(0)
        try:
            lib.nft_ctx_buffer_output(ctx)
            lib.nft_ctx_buffer_error(ctx)
            rc = lib.nft_run_cmd_from_buffer(ctx, script.encode())
            return rc, (lib.nft_ctx_get_error_buffer(ctx) or b"").decode(errors="replace").strip()
        finally:
            # nft_ctx_free took 7-23 ms here, 20 times the command itself (its netlink socket's close, we
            # think): off the freeze's path, in a thread of its own.
            threading.Thread(target=lib.nft_ctx_free, args=(ctx,), name="nft-free", daemon=True).start()


def lock(netns: str, inbound_only: bool = False) -> None:
    """Drop everything (or only what arrives) in `netns`; idempotent, one transaction."""
    chains = _IN if inbound_only else f"{_IN}\n{_OUT}"
    # Declaring the table first makes the delete valid on a fresh netns; the whole script is one
    # transaction, so the netns is never unlocked in between and ends with exactly these chains.
    rc, err = _nft(netns, f"table inet {TABLE} {{}}\ndelete table inet {TABLE}\ntable inet {TABLE} {{\n{chains}\n}}\n")
    if rc != 0:
        raise SkyferryError(f"cannot lock the network of {netns}: {err}", hint="is nftables installed?")


def unlock(netns: str) -> None:
    """Idempotent: it runs inside the freeze when a restored target opens."""
    rc, err = _nft(netns, f"delete table inet {TABLE}")
    if rc != 0 and "No such file or directory" not in err:
        raise SkyferryError(f"cannot unlock the network of {netns}: {err}")


def is_locked(netns: str) -> bool:
    return _nft(netns, f"list table inet {TABLE}")[0] == 0


def loopback_only(port: int) -> None:
    """Drop TCP to `port` in this agent's own netns unless it comes over loopback. For CRIU's lazy page
    server: runc hands CRIU the address, but CRIU's lazy dump binds its page server to every address
    (only the port counts), so without this any host could read the frozen memory. Idempotent."""
    table = f"{TABLE}_ps{port}"
    rule = f'chain pages {{ type filter hook input priority -300; iifname != "lo" tcp dport {port} drop; }}'
    rc, err = _nft(None, f"table inet {table} {{}}\ndelete table inet {table}\ntable inet {table} {{\n{rule}\n}}\n")
    if rc != 0:
        raise SkyferryError(f"cannot keep the page server on port {port} to loopback: {err}")


def release_port(port: int) -> None:
    """Undo `loopback_only` (idempotent)."""
    _nft(None, f"delete table inet {TABLE}_ps{port}")


def clear_criu_lock(netns: str) -> None:
    """Remove the iptables lock a CRIU dump puts on `netns` (criu/net.c). CRIU lifts it only when the
    dump ends by itself; a lazy dump we had to kill leaves it behind, and it would drop the thawed
    source's traffic. Idempotent."""
    for tool in ("iptables", "ip6tables"):
        if subprocess.run(command(netns, [tool, "-w", "-S", "CRIU"]), capture_output=True).returncode != 0:
            continue  # no CRIU chain
        for rule in (["-D", "INPUT", "-j", "CRIU"], ["-D", "OUTPUT", "-j", "CRIU"], ["-F", "CRIU"], ["-X", "CRIU"]):
            subprocess.run(command(netns, [tool, "-w", *rule]), capture_output=True, check=False)
