"""Keep a container's network namespace silent during a migration (nftables, inside that netns).

- The **source** is locked both ways from checkpoint until confirm or rollback. CRIU locks the network
  during a dump but lifts the lock when it leaves the tasks alive, and our source stays frozen (not
  killed) until the target is live. Without this lock the source kernel would keep ACKing the client's
  retransmissions into a socket whose state the target no longer shares.
- The **target** is locked inbound only, from prepare until its restore succeeded. Peers may already
  route to it (cutover happens before restore), and an empty netns would answer them with RSTs. Nothing
  in it can send before the restore, and the restored process's first packets must not be dropped:
  a dropped reply makes the restored socket back off for seconds.
"""

import subprocess

from skyferry.netplane.netns import command
from skyferry.pipeline.errors import SkyferryError

TABLE = "skyferry_lock"
# Priority -400 runs before conntrack and any rule the container might add; loopback stays open.
_IN = 'chain in { type filter hook input priority -400; policy drop; iifname "lo" accept; }'
_OUT = 'chain out { type filter hook output priority -400; policy drop; oifname "lo" accept; }'


def _nft(netns: str, *args: str, script: str | None = None) -> subprocess.CompletedProcess[str]:
    # nsenter joins only the netns; `ip netns exec` also builds a mount namespace, ~50 ms we pay in the freeze.
    return subprocess.run(command(netns, ["nft", *args]), input=script, capture_output=True, text=True, check=False)


def lock(netns: str, inbound_only: bool = False) -> None:
    """Drop everything (or only what arrives) in `netns`; idempotent."""
    chains = _IN if inbound_only else f"{_IN}\n{_OUT}"
    if is_locked(netns):
        return
    proc = _nft(netns, "-f", "-", script=f"table inet {TABLE} {{\n{chains}\n}}\n")
    if proc.returncode != 0:
        raise SkyferryError(f"cannot lock the network of {netns}: {proc.stderr.strip()}", hint="is nft installed?")


def unlock(netns: str) -> None:
    """Idempotent, and one nft call: it runs inside the freeze when a restored target opens."""
    proc = _nft(netns, "delete", "table", "inet", TABLE)
    if proc.returncode != 0 and "No such file or directory" not in proc.stderr:
        raise SkyferryError(f"cannot unlock the network of {netns}: {proc.stderr.strip()}")


def is_locked(netns: str) -> bool:
    return _nft(netns, "list", "table", "inet", TABLE).returncode == 0


def clear_criu_lock(netns: str) -> None:
    """Remove the iptables lock a CRIU dump puts on `netns` (criu/net.c). CRIU lifts it only when the
    dump ends by itself; a lazy dump we had to kill leaves it behind, and it would drop the thawed
    source's traffic. Idempotent."""
    for tool in ("iptables", "ip6tables"):
        if subprocess.run(command(netns, [tool, "-w", "-S", "CRIU"]), capture_output=True).returncode != 0:
            continue  # no CRIU chain
        for rule in (["-D", "INPUT", "-j", "CRIU"], ["-D", "OUTPUT", "-j", "CRIU"], ["-F", "CRIU"], ["-X", "CRIU"]):
            subprocess.run(command(netns, [tool, "-w", *rule]), capture_output=True, check=False)
