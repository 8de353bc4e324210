"""Which handler serves which intercepted system call, per ABI.

The notification carries the raw (arch, nr) pair; 32-bit x86 numbers its calls differently,
and x32 shares x86-64's audit arch but marks its numbers with bit 30 (and has its own ioctl
entry point, compat_sys_ioctl at 514). A pair not in the table gets ENOSYS and an audit line.
Each ABI also names the struct layouts its callers use (see supervisor/loop/abi.py).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from .errors import KernelError
from .loop.abi import COMPAT32, NATIVE64, Layouts
from .seccomp.notify import Notification, Response
from .target import CAP_SYS_ADMIN, Target

if TYPE_CHECKING:
    from .session import Session

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


@dataclass
class Call:
    """One notification being served: what the handler needs, and the audit fields it adds."""

    session: Session
    notif: Notification
    target: Target
    audit: dict[str, Any] = field(default_factory=dict)
    caller: str | None = None  # "fuse-daemon": a FUSE daemon of the session's, not the container itself

    def require_admin(self, doing: str) -> None:
        """EPERM unless the caller may do mount work in the container's own mount namespace.

        The supervisor acts only there, so the caller must be in it (a mount namespace the
        container made of its own is not served: a user who unshares one owns it, but owns
        nothing of the container's) and hold CAP_SYS_ADMIN over it, as the kernel would ask.
        """
        t = self.target
        st = os.fstat(t.mntns)
        if (st.st_dev, st.st_ino) != self.session.mntns:
            raise KernelError(errno.EPERM, f"{doing} is served only in the container's own mount namespace")
        if not t.creds or not t.creds.has_cap(CAP_SYS_ADMIN):
            raise KernelError(errno.EPERM, f"{doing} needs CAP_SYS_ADMIN in the container")


Handler = Callable[[Call], Response]


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


def handlers() -> dict[str, Handler]:
    """The table: syscall name -> handler. Imported late so handler modules may import this one."""
    from .handlers import loop_ioctl, mount, umount

    return {
        "mount": mount.handle,
        "umount2": umount.handle,
        "umount": umount.handle_old,
        "ioctl": loop_ioctl.handle,
    }
