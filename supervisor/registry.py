"""Which handler serves which intercepted system call, per ABI.

The notification carries the raw (arch, nr) pair; 32-bit x86 numbers its calls differently,
and x32 marks them with a high bit. A pair not in the table gets ENOSYS and an audit line.
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from .seccomp.notify import Notification, Response
from .target import Target

if TYPE_CHECKING:
    from .session import Session

AUDIT_ARCH_X86_64: Final = 0xC000003E
AUDIT_ARCH_I386: Final = 0x40000003
AUDIT_ARCH_AARCH64: Final = 0xC00000B7
AUDIT_ARCH_ARM: Final = 0x40000028

NATIVE_ARCH: Final = AUDIT_ARCH_AARCH64 if platform.machine() == "aarch64" else AUDIT_ARCH_X86_64

SYSCALLS: Final[dict[tuple[int, int], str]] = {
    (AUDIT_ARCH_X86_64, 165): "mount",
    (AUDIT_ARCH_X86_64, 166): "umount2",
    (AUDIT_ARCH_X86_64, 16): "ioctl",
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


@dataclass
class Call:
    """One notification being served: what the handler needs, and the audit fields it adds."""

    session: Session
    notif: Notification
    target: Target
    audit: dict[str, Any] = field(default_factory=dict)


Handler = Callable[[Call], Response]


def syscall_name(notif: Notification) -> str | None:
    return SYSCALLS.get((notif.arch, notif.nr))


def arch_name(arch: int) -> str:
    return ARCH_NAMES.get(arch, f"{arch:#x}")


def handlers() -> dict[str, Handler]:
    """The table: syscall name -> handler. Imported late so handler modules may import this one."""
    from .handlers import loop_ioctl, mount, umount

    return {
        "mount": mount.handle,
        "umount2": umount.handle,
        "umount": umount.handle_old,
        "ioctl": loop_ioctl.handle,
    }
