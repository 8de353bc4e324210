"""Which system call a notification is, per ABI.

The notification carries the raw (arch, nr) pair; 32-bit x86 numbers its calls differently,
and x32 shares x86-64's audit arch but marks its numbers with bit 30 (and has its own ioctl
entry point, compat_sys_ioctl at 514). A pair not in the table gets ENOSYS and an audit line.
Each ABI also names the struct layouts its callers use (see supervisor/loop/abi.py).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import platform
from typing import Final

from .errors import KernelError
from .loop.abi import COMPAT32, NATIVE64, Layouts
from .seccomp.notify import Notification

AUDIT_ARCH_X86_64: Final = 0xC000003E
AUDIT_ARCH_I386: Final = 0x40000003
AUDIT_ARCH_AARCH64: Final = 0xC00000B7
AUDIT_ARCH_ARM: Final = 0x40000028

NATIVE_ARCH: Final = AUDIT_ARCH_AARCH64 if platform.machine() == "aarch64" else AUDIT_ARCH_X86_64
X32_SYSCALL_BIT: Final = 0x40000000
_X32_NR_GETPID: Final = X32_SYSCALL_BIT | 39

SYSCALLS: Final[dict[tuple[int, int], str]] = {
    (AUDIT_ARCH_X86_64, 165): "mount",
    (AUDIT_ARCH_X86_64, 166): "umount2",
    (AUDIT_ARCH_X86_64, 16): "ioctl",
    (AUDIT_ARCH_X86_64, X32_SYSCALL_BIT | 165): "mount",
    (AUDIT_ARCH_X86_64, X32_SYSCALL_BIT | 166): "umount2",
    (AUDIT_ARCH_X86_64, X32_SYSCALL_BIT | 514): "ioctl",
    (AUDIT_ARCH_I386, 21): "mount",
    (AUDIT_ARCH_I386, 22): "umount",
    (AUDIT_ARCH_I386, 52): "umount2",
    (AUDIT_ARCH_I386, 54): "ioctl",
    (AUDIT_ARCH_AARCH64, 40): "mount",
    (AUDIT_ARCH_AARCH64, 39): "umount2",
    (AUDIT_ARCH_AARCH64, 29): "ioctl",
    (AUDIT_ARCH_ARM, 21): "mount",
    (AUDIT_ARCH_ARM, 52): "umount2",
    (AUDIT_ARCH_ARM, 54): "ioctl",
}
ARCH_NAMES: Final = {
    AUDIT_ARCH_X86_64: "x86_64",
    AUDIT_ARCH_I386: "i386",
    AUDIT_ARCH_AARCH64: "aarch64",
    AUDIT_ARCH_ARM: "arm",
}
LAYOUTS: Final[dict[str, Layouts]] = {
    "x86_64": NATIVE64,
    "aarch64": NATIVE64,
    "i386": COMPAT32,
    "x32": COMPAT32,
    "arm": COMPAT32,
}


def syscall_name(notif: Notification) -> str | None:
    return SYSCALLS.get((notif.arch, notif.nr))


def arch_name(arch: int) -> str:
    return ARCH_NAMES.get(arch, f"{arch:#x}")


def abi_name(notif: Notification) -> str:
    """The ABI the call came in through: the audit arch, and x32 told apart from x86-64 by its bit."""
    if notif.arch == AUDIT_ARCH_X86_64 and notif.nr & X32_SYSCALL_BIT:
        return "x32"
    return arch_name(notif.arch)


def layouts(notif: Notification) -> Layouts:
    """The struct layouts of the caller's ABI."""
    return LAYOUTS.get(abi_name(notif), NATIVE64)


@functools.cache
def kernel_has_x32() -> bool:
    """Whether this kernel runs x32 calls (CONFIG_X86_X32_ABI): an x32 getpid answers ENOSYS otherwise."""
    if platform.machine() != "x86_64":
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return bool(libc.syscall(ctypes.c_long(_X32_NR_GETPID)) >= 0)


def check_served(notif: Notification) -> None:
    """Refuse, as the kernel would, a call on an ABI this kernel does not run.

    The filter notifies x32 calls whatever the kernel; where it has no x32 ABI the kernel
    answers them ENOSYS after the filter, so serving one would do what the kernel cannot.
    """
    if abi_name(notif) == "x32" and not kernel_has_x32():
        raise KernelError(errno.ENOSYS, "this kernel has no x32 ABI (CONFIG_X86_X32_ABI is not set)")
