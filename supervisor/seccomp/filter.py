"""The filter the container's init loads before exec.

What it does, per ABI (x86-64, and the i386 and x32 ABIs explicitly, so `int 0x80` is no way
around it):

* ``mount(2)`` notifies when the call can create a superblock (no bind, move or propagation
  flag, or the old magic number ``0xC0ED`` in bits 16-31, which the kernel drops with whatever
  flags it seemed to hold) and for every ``MS_REMOUNT``. Remounts may not run natively: the kernel does not lock
  the flags of a mount made after the namespace, so a bare ``MS_REMOUNT|MS_BIND`` from the
  container would strip the ``nosuid,nodev`` the supervisor forced. Binds, moves and
  propagation changes copy flags unchanged and stay native at full speed.
* ``umount2(2)`` (and i386's old ``umount``) notify.
* ``ioctl(2)`` notifies for the loop requests (``0x4C00``-``0x4C0F`` and ``0x4C80``-``0x4C83``)
  the two block size queries and the capability-gated block requests served on the pool's
  devices (and ``FITRIM``), compared under a 32-bit mask: the kernel reads only the
  low 32 bits of the request, so an exact 64-bit comparison could be bypassed with junk in
  the high half.
* ``fsopen``, ``fsconfig``, ``fsmount``, ``fspick``, ``mount_setattr`` and ``open_tree_attr``
  fail with ENOSYS, as on a kernel before 5.2/5.12/6.15: libmount and systemd then fall back
  to ``mount(2)``, which is intercepted. ``mount_setattr`` and ``open_tree_attr`` are refused
  rather than served because both can clear ``nosuid,nodev`` on a supervisor-made mount (the
  latter on the clone it makes). ``open_tree`` and ``move_mount`` stay allowed: they only
  clone and attach existing mounts, which keeps their flags, and blocking them breaks tools
  that use them for plain bind mounts. ``statmount``/``listmount`` only read, and
  ``pivot_root`` acts in the caller's own namespace with the kernel's checks: native.
* Default deny for what the filter was not written for: every number above the last one of
  the syscall tables it knows (Linux 6.18: ``file_setattr``, 469; x32 and arm also have their
  private ranges) answers ENOSYS, as systemd's and the OCI runtimes' default profiles do, so a
  mount call added by a later kernel cannot pass unseen.
* Everything else is allowed by the kernel and never reaches Python.

libseccomp 2.5.4 knows neither ``open_tree_attr`` nor the newest table ends, so the refusals
and the range checks are a short hand-written BPF gate put in front of libseccomp's program
(which keeps the argument-matching rules above): per ABI, refused numbers and numbers outside
the known ranges return ENOSYS; everything else jumps to libseccomp's first instruction.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
from dataclasses import dataclass
from typing import Final

import pyseccomp as sc

from .. import syscalls as sys_
from ..registry import AUDIT_ARCH_AARCH64, AUDIT_ARCH_ARM, AUDIT_ARCH_I386, AUDIT_ARCH_X86_64, X32_SYSCALL_BIT

LOOP_IOCTL_MASKS: Final = ((0xFFFFFFF0, 0x4C00), (0xFFFFFFFC, 0x4C80))
# Size queries a tool makes on the fd it just bound (util-linux checks the size after
# LOOP_CONFIGURE): BLKGETSIZE and BLKGETSIZE64. See supervisor/handlers/loop_ioctl.py.
# BLKGETSIZE64 is 0x80041272 for 32-bit callers (its number encodes sizeof(size_t)).
BLOCK_SIZE_IOCTLS: Final = (0x1260, 0x80081272, 0x80041272)
# The capability-gated block requests served on the pool's devices, and FITRIM on the
# container's mounts (supervisor/handlers/block_ioctl.py): BLKROSET, BLKRRPART, BLKFLSBUF,
# BLKRASET, BLKFRASET, BLKBSZSET (64- and 32-bit numbers), FITRIM.
BLOCK_ADMIN_IOCTLS: Final = (0x125D, 0x125F, 0x1261, 0x1262, 0x1264, 0x40081271, 0x40041271, 0xC0185879)
# Every request notified by its exact number (low 32 bits), in each profile made from this one.
EXACT_IOCTLS: Final = (*BLOCK_SIZE_IOCTLS, *BLOCK_ADMIN_IOCTLS)
# fsopen, fsconfig, fsmount, fspick, mount_setattr, open_tree_attr: the same numbers on every
# ABI since the tables were unified at 424 (x32 adds its bit).
REFUSED_SYSCALLS: Final = {"fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433, "mount_setattr": 442,
                           "open_tree_attr": 467}  # fmt: skip
# What a runtime's profile refuses besides: the calls that attach a mount the supervisor would
# not see. A runtime's container runs before it is adopted, so every mount it makes must pass
# the supervisor, which records the mount table first (see supervisor/sources/).
RUNTIME_REFUSED_SYSCALLS: Final = ("open_tree", "move_mount", *REFUSED_SYSCALLS)
LAST_KNOWN_NR: Final = 469  # file_setattr, the end of Linux 6.18's tables
# A mount(2) with none of these creates a superblock.
NO_NEW_SB: Final = (
    sys_.MS_REMOUNT
    | sys_.MS_BIND
    | sys_.MS_MOVE
    | sys_.MS_SHARED
    | sys_.MS_PRIVATE
    | sys_.MS_SLAVE
    | sys_.MS_UNBINDABLE
)


@dataclass(frozen=True)
class AbiTable:
    """One ABI's syscall numbers as the gate sees them: the ranges it knows, and the bit it adds."""

    name: str
    arch: int
    ranges: tuple[tuple[int, int], ...]  # inclusive
    bit: int = 0  # x32's numbers carry X32_SYSCALL_BIT; the gate tells x32 from x86-64 by it

    def refused(self) -> tuple[int, ...]:
        return tuple(self.bit | nr for nr in REFUSED_SYSCALLS.values())


_BASE: Final = ((0, LAST_KNOWN_NR),)
_X32: Final = (
    (X32_SYSCALL_BIT, X32_SYSCALL_BIT | LAST_KNOWN_NR),
    (X32_SYSCALL_BIT | 512, X32_SYSCALL_BIT | 547),
)  # 512..547: x32's own
_ARM: Final = (*_BASE, (0x0F0001, 0x0F0006))  # arm's private calls: breakpoint, cacheflush, ..., set_tls
ABI_TABLES: Final = {
    "x86_64": (
        AbiTable("x32", AUDIT_ARCH_X86_64, _X32, X32_SYSCALL_BIT),
        AbiTable("x86_64", AUDIT_ARCH_X86_64, _BASE),
        AbiTable("i386", AUDIT_ARCH_I386, _BASE),
    ),
    "aarch64": (AbiTable("aarch64", AUDIT_ARCH_AARCH64, _BASE), AbiTable("arm", AUDIT_ARCH_ARM, _ARM)),
}.get(platform.machine(), ())

# The other ABIs a task on this machine can enter the kernel through.
FOREIGN_ARCHES: Final = {"x86_64": (sc.Arch.X86, sc.Arch.X32), "aarch64": (sc.Arch.ARM,)}.get(platform.machine(), ())

SECCOMP_SET_MODE_FILTER: Final = 1
SECCOMP_FILTER_FLAG_NEW_LISTENER: Final = 1 << 3
SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV: Final = 1 << 5


def build() -> sc.SyscallFilter:
    """The filter as a libseccomp object (not loaded), for `install` and for inspection in tests."""
    f = sc.SyscallFilter(sc.ALLOW)
    for arch in FOREIGN_ARCHES:
        f.add_arch(arch)
    f.add_rule(sc.NOTIFY, "mount", sc.Arg(3, sc.MASKED_EQ, sys_.MS_REMOUNT, sys_.MS_REMOUNT))
    f.add_rule(sc.NOTIFY, "mount", sc.Arg(3, sc.MASKED_EQ, NO_NEW_SB, 0))
    # The old magic number in bits 16-31 is dropped by the kernel (MS_MGC_VAL), taking with it
    # the propagation bits it seems to hold: such a call may make a superblock.
    f.add_rule(sc.NOTIFY, "mount", sc.Arg(3, sc.MASKED_EQ, sys_.MS_MGC_MSK, sys_.MS_MGC_VAL))
    f.add_rule(sc.NOTIFY, "umount2")
    f.add_rule(sc.NOTIFY, "umount")
    for mask, value in LOOP_IOCTL_MASKS:
        f.add_rule(sc.NOTIFY, "ioctl", sc.Arg(1, sc.MASKED_EQ, mask, value))
    for request in EXACT_IOCTLS:
        f.add_rule(sc.NOTIFY, "ioctl", sc.Arg(1, sc.MASKED_EQ, 0xFFFFFFFF, request))
    return f


# Classic BPF (linux/filter.h, linux/seccomp.h)
_INSN: Final = struct.Struct("<HBBI")
_LD_W_ABS: Final = 0x20
_JEQ_K: Final = 0x15
_JGT_K: Final = 0x25
_JGE_K: Final = 0x35
_JA: Final = 0x05
_RET_K: Final = 0x06
_OFF_NR: Final = 0
_OFF_ARCH: Final = 4
SECCOMP_RET_ERRNO: Final = 0x00050000
_ENOSYS: Final = "enosys"
_BODY: Final = "body"


def _assemble(code: list[tuple[int, str | int, str | int, int] | str]) -> list[bytes]:
    """Resolve labels (strings in the list mark positions; jump targets name them) to offsets."""
    where: dict[str, int] = {}
    insns: list[tuple[int, str | int, str | int, int]] = []
    for item in code:
        if isinstance(item, str):
            where[item] = len(insns)
        else:
            insns.append(item)
    where.setdefault(_BODY, len(insns))

    def rel(target: str | int, i: int) -> int:
        return target if isinstance(target, int) else where[target] - i - 1

    out = []
    for i, (op, jt, jf, k) in enumerate(insns):
        if op == _JA:
            out.append(_INSN.pack(op, 0, 0, rel(jt, i)))
        else:
            out.append(_INSN.pack(op, rel(jt, i), rel(jf, i), k))
    return out


def gate(tables: tuple[AbiTable, ...] = ABI_TABLES) -> bytes:
    """The BPF prologue: ENOSYS for refused and unknown numbers per ABI, else on to `_BODY`.

    The body (libseccomp's program) is appended right after it; an arch the gate does not
    know goes there too, and libseccomp's own bad-arch action decides.
    """
    code: list[tuple[int, str | int, str | int, int] | str] = [(_LD_W_ABS, 0, 0, _OFF_ARCH)]
    for arch in dict.fromkeys(t.arch for t in tables):
        code.append((_JEQ_K, f"arch{arch}", 0, arch))
    code += [(_JA, _BODY, 0, 0)]
    for arch in dict.fromkeys(t.arch for t in tables):
        abis = [t for t in tables if t.arch == arch]
        # -1 is how a tracer skips a call (and sets its result): leave its result alone
        code += [f"arch{arch}", (_LD_W_ABS, 0, 0, _OFF_NR), (_JEQ_K, _BODY, 0, 0xFFFFFFFF)]
        if len(abis) == 2:  # x32 and x86-64: x32's numbers are the ones with its bit
            marked, plain = abis
            code.append((_JGE_K, f"abi{marked.name}", f"abi{plain.name}", marked.bit))
        for t in abis:
            code.append(f"abi{t.name}")
            code += [(_JEQ_K, _ENOSYS, 0, nr) for nr in t.refused()]
            for n, (lo, hi) in enumerate(t.ranges):
                nxt = f"{t.name}-range{n + 1}" if n + 1 < len(t.ranges) else _ENOSYS
                code += [(_JGE_K, 0, nxt, lo), (_JGT_K, nxt, _BODY, hi), f"{t.name}-range{n + 1}"]
    code += [_ENOSYS, (_RET_K, 0, 0, SECCOMP_RET_ERRNO | errno.ENOSYS)]
    return b"".join(_assemble(code))


def program() -> bytes:
    """The whole filter as loaded: the gate, then libseccomp's program."""
    read_end, write_end = os.pipe()
    try:
        with os.fdopen(write_end, "wb", closefd=True) as w:
            build().export_bpf(w)
        body = b""
        while chunk := os.read(read_end, 65536):
            body += chunk
    finally:
        os.close(read_end)
    return gate() + body


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install() -> int:
    """Load the filter into the calling thread and return the listener fd.

    Loaded with a raw seccomp(2) rather than libseccomp's loader because libseccomp 2.5 cannot
    ask for WAIT_KILLABLE_RECV (5.19+): without it a signal to the caller turns a notification
    the supervisor is serving into a fresh one after SA_RESTART, and the mount would happen
    twice. The caller needs CAP_SYS_ADMIN in its user namespace (container root has it), so
    no_new_privs is not set and setuid programs keep working inside.
    """
    code = program()
    buf = ctypes.create_string_buffer(code, len(code))
    prog = _SockFprog(len(code) // 8, ctypes.addressof(buf))
    flags = SECCOMP_FILTER_FLAG_NEW_LISTENER | SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV
    return sys_.seccomp(SECCOMP_SET_MODE_FILTER, flags, ctypes.c_void_p(ctypes.addressof(prog)))
