"""Real hosts that differ from this one, for the compatibility check's positive controls.

Local hosts share one kernel and one CPU, so a pair that differs is made from real parts:

- `richer_cpu_criu`: a `criu` for the *source* agent (`SKYFERRY_CRIU`) whose `cpuinfo dump` is CRIU's
  real image with one instruction-set bit set that this CPU lacks (pycriu's image tools): the source then
  describes a CPU the target does not have, and the target's real `criu cpuinfo check` decides.
- `no_userfaultfd_criu`: a `criu` for the *target* agent run under a seccomp filter that makes
  userfaultfd(2) fail with ENOSYS, which is what a kernel without CONFIG_USERFAULTFD answers (and what
  CRIU's kernel probe reads as "no userfaultfd"). Every other CRIU command runs unchanged.
"""

import ctypes
import errno
import shutil
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
# Instruction-set bits CRIU's default check compares (x86_ins_capability_mask, criu/arch/x86/cpu.c), as
# (capability word, bit), rarest last: AVX512F, AVX512_VBMI2, AVX512_4VNNIW.
CANDIDATE_BITS = ((9, 16), (11, 6), (18, 2))
SYS_USERFAULTFD = 323  # x86_64
CRIU_RUNDIR = "/run/criu"  # scripts/bootstrap-host.sh builds CRIU with RUNDIR here
AUDIT_ARCH_X86_64 = 0xC000003E


def real_criu() -> str:
    found = shutil.which("criu")
    assert found, "criu is not installed"
    return found


def lacking_bit(image: Path) -> tuple[int, int]:
    """A (word, bit) the CPU described by cpuinfo `image` lacks."""
    import pycriu

    with image.open("rb") as f:
        cap = pycriu.images.load(f)["entries"][0]["x86_entry"][0]["capability"]
    for word, bit in CANDIDATE_BITS:
        if not cap[word] >> bit & 1:
            return word, bit
    raise AssertionError("this CPU has every candidate bit; add one it lacks to CANDIDATE_BITS")


def add_cpu_feature(image: Path) -> tuple[int, int]:
    """Rewrite cpuinfo `image` so it claims one instruction set more than it describes; returns which."""
    import pycriu

    word, bit = lacking_bit(image)
    with image.open("rb") as f:
        img = pycriu.images.load(f)
    img["entries"][0]["x86_entry"][0]["capability"][word] |= 1 << bit
    with image.open("wb") as f:
        pycriu.images.dump(img, f)
    return word, bit


def richer_cpu_criu(directory: Path) -> Path:
    path = directory / "criu-richer-cpu"
    path.write_text(f"""#!{sys.executable}
import os, subprocess, sys
sys.path.insert(0, {str(TESTS)!r})
from kit.confine import add_cpu_feature
real, args = {real_criu()!r}, sys.argv[1:]
if args[:2] != ["cpuinfo", "dump"]:
    os.execv(real, [real, *args])
rc = subprocess.call([real, *args])
if rc == 0:
    add_cpu_feature(__import__("pathlib").Path(args[args.index("-D") + 1]) / "cpuinfo.img")
sys.exit(rc)
""")
    path.chmod(0o755)
    return path


def deny_syscall(nr: int, errno: int) -> None:
    """Install a seccomp filter on this process (inherited across exec): syscall `nr` fails with `errno`."""

    class Filter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]

    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(Filter))]

    ld, jeq, ret = 0x20, 0x15, 0x06  # BPF_LD|BPF_W|BPF_ABS, BPF_JMP|BPF_JEQ|BPF_K, BPF_RET|BPF_K
    allow, fail = 0x7FFF0000, 0x00050000 | errno  # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO
    insns = [
        (ld, 0, 0, 4), (jeq, 1, 0, AUDIT_ARCH_X86_64), (ret, 0, 0, allow),  # another arch: leave it alone
        (ld, 0, 0, 0), (jeq, 0, 1, nr), (ret, 0, 0, fail), (ret, 0, 0, allow),
    ]  # fmt: skip
    prog = (Filter * len(insns))(*[Filter(*i) for i in insns])
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
    if libc.prctl(22, 2, ctypes.byref(Prog(len(insns), prog)), 0, 0) != 0:  # PR_SET_SECCOMP, FILTER
        raise OSError(ctypes.get_errno(), "PR_SET_SECCOMP")


def no_userfaultfd_criu(directory: Path) -> Path:
    path = directory / "criu-no-userfaultfd"
    path.write_text(f"""#!{sys.executable}
import os, sys
sys.path.insert(0, {str(TESTS)!r})
from kit.confine import SYS_USERFAULTFD, deny_syscall
deny_syscall(SYS_USERFAULTFD, {errno.ENOSYS})  # ENOSYS
# CRIU reuses its kernel probe from its run directory's cache, written by the unconfined CRIU of the
# other agents: a private empty tmpfs there makes this one probe (and cache) its own kernel view.
os.execv("/usr/bin/unshare", ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         'if [ -d {CRIU_RUNDIR} ]; then mount -t tmpfs -o size=1m none {CRIU_RUNDIR} || exit 1; fi; exec "$0" "$@"',
         {real_criu()!r}, *sys.argv[1:]])
""")
    path.chmod(0o755)
    return path
