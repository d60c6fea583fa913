"""Keep the kernel's perf hooks on while a migration may freeze on this host.

CRIU stops a task on its way out of the parasite (dump) and of the restorer (restore) with a hardware
breakpoint set through ptrace, which the kernel makes a task-bound perf event. When no task-bound event
exists on the machine, the kernel first turns its perf scheduling hooks on and waits out an RCU grace
period (perf_event_alloc -> synchronize_rcu): 11 ms of a dump's freeze here, found with
`perf record -g -e sched:sched_switch` (docs/migration.md, "Where the freeze goes"). Each migration side
holds one disabled dummy event on the agent from its first call to its last, so the wait falls there,
outside the freeze, and CRIU's breakpoints find the hooks on. A kernel that refuses the event (no perf
events, a seccomp filter) leaves CRIU to pay as before.
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct

_libc = ctypes.CDLL(None, use_errno=True)
_PERF_EVENT_OPEN = {"x86_64": 298, "aarch64": 241}.get(platform.machine())
# perf_event_attr, its first version (PERF_ATTR_SIZE_VER0): type, size, config, sample_period,
# sample_type, read_format, flags (bit 0: disabled), wakeup_events, bp_type, config1.
_ATTR = struct.Struct("<IIQQQQQIIQ")
PERF_TYPE_SOFTWARE, PERF_COUNT_SW_DUMMY, PERF_FLAG_FD_CLOEXEC = 1, 9, 8


class PerfHooks:
    """One disabled software dummy event on this process while held: it counts nothing and samples
    nothing; its existence keeps the kernel's perf scheduling hooks on."""

    def __init__(self) -> None:
        self.fd: int | None = None

    def hold(self) -> bool:
        """Open the event (idempotent); whether one is held."""
        if self.fd is None and _PERF_EVENT_OPEN is not None:
            fields = (PERF_TYPE_SOFTWARE, _ATTR.size, PERF_COUNT_SW_DUMMY, 0, 0, 0, 1, 0, 0, 0)
            attr = ctypes.create_string_buffer(_ATTR.pack(*fields))
            # pid: the process's main thread, which lives as long as the agent; any CPU; no group.
            fd = _libc.syscall(_PERF_EVENT_OPEN, attr, os.getpid(), -1, -1, PERF_FLAG_FD_CLOEXEC)
            self.fd = fd if fd >= 0 else None
        return self.fd is not None

    def release(self) -> None:
        """Close the event (idempotent); the kernel turns its hooks off a second after the last one goes."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
