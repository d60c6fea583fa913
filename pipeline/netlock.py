"""Keep a frozen container silent: drop all traffic in its netns from checkpoint until confirm or rollback.

CRIU locks the network during a dump but lifts the lock when it leaves the tasks alive, and our source
stays frozen (not killed) until the target confirms. Without this lock the source kernel would keep
ACKing the client's retransmissions into a socket whose state the target no longer shares.
"""

import subprocess

from skyferry.pipeline.errors import SkyferryError

TABLE = "skyferry_lock"
# Priority -400 runs before conntrack and any rule the container might add.
RULESET = f"""table inet {TABLE} {{
  chain in {{ type filter hook input priority -400; policy drop; iifname "lo" accept; }}
  chain out {{ type filter hook output priority -400; policy drop; oifname "lo" accept; }}
}}
"""


def _nft(netns: str, *args: str, script: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", netns, "nft", *args],
        input=script,
        capture_output=True,
        text=True,
        check=False,
    )


def lock(netns: str) -> None:
    if is_locked(netns):
        return
    proc = _nft(netns, "-f", "-", script=RULESET)
    if proc.returncode != 0:
        raise SkyferryError(f"cannot lock the network of {netns}: {proc.stderr.strip()}", hint="is nft installed?")


def unlock(netns: str) -> None:
    if is_locked(netns):
        proc = _nft(netns, "delete", "table", "inet", TABLE)
        if proc.returncode != 0:
            raise SkyferryError(f"cannot unlock the network of {netns}: {proc.stderr.strip()}")


def is_locked(netns: str) -> bool:
    return _nft(netns, "list", "table", "inet", TABLE).returncode == 0
