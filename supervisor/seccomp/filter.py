"""The filter the container's init loads before exec.

What it does, per ABI (x86-64, and the i386 and x32 ABIs explicitly, so `int 0x80` is no way
around it):

* ``mount(2)`` notifies when the call can create a superblock (no bind, move or propagation
  flag) and for every ``MS_REMOUNT``. Remounts may not run natively: the kernel does not lock
  the flags of a mount made after the namespace, so a bare ``MS_REMOUNT|MS_BIND`` from the
  container would strip the ``nosuid,nodev`` the supervisor forced. Binds, moves and
  propagation changes copy flags unchanged and stay native at full speed.
* ``umount2(2)`` (and i386's old ``umount``) notify.
* ``ioctl(2)`` notifies for the loop requests (``0x4C00``-``0x4C0F`` and ``0x4C80``-``0x4C83``)
  and the two block size queries, compared under a 32-bit mask: the kernel reads only the
  low 32 bits of the request, so an exact 64-bit comparison could be bypassed with junk in
  the high half.
* ``fsopen``, ``fsconfig``, ``fsmount``, ``fspick`` and ``mount_setattr`` fail with ENOSYS, as on a
  kernel before 5.2/5.12: libmount and systemd then fall back to ``mount(2)``, which is
  intercepted. ``mount_setattr`` is refused rather than served because it can clear
  ``nosuid,nodev`` on a supervisor-made mount. ``open_tree`` and ``move_mount`` stay allowed:
  they only clone and attach existing mounts, which keeps their flags, and blocking them
  breaks tools that use them for plain bind mounts.
* Everything else is allowed by the kernel and never reaches Python.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
from typing import Final

import pyseccomp as sc

from .. import syscalls as sys_

LOOP_IOCTL_MASKS: Final = ((0xFFFFFFF0, 0x4C00), (0xFFFFFFFC, 0x4C80))
# Size queries a tool makes on the fd it just bound (util-linux checks the size after
# LOOP_CONFIGURE): BLKGETSIZE and BLKGETSIZE64. See supervisor/handlers/loop_ioctl.py.
BLOCK_SIZE_IOCTLS: Final = (0x1260, 0x80081272)
NEW_MOUNT_API_SYSCALLS: Final = ("fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr")
# A mount(2) with none of these creates a superblock.
_NO_NEW_SB: Final = (
    sys_.MS_REMOUNT
    | sys_.MS_BIND
    | sys_.MS_MOVE
    | sys_.MS_SHARED
    | sys_.MS_PRIVATE
    | sys_.MS_SLAVE
    | sys_.MS_UNBINDABLE
)
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
    f.add_rule(sc.NOTIFY, "mount", sc.Arg(3, sc.MASKED_EQ, _NO_NEW_SB, 0))
    f.add_rule(sc.NOTIFY, "umount2")
    f.add_rule(sc.NOTIFY, "umount")
    for mask, value in LOOP_IOCTL_MASKS:
        f.add_rule(sc.NOTIFY, "ioctl", sc.Arg(1, sc.MASKED_EQ, mask, value))
    for request in BLOCK_SIZE_IOCTLS:
        f.add_rule(sc.NOTIFY, "ioctl", sc.Arg(1, sc.MASKED_EQ, 0xFFFFFFFF, request))
    for name in NEW_MOUNT_API_SYSCALLS:
        f.add_rule(sc.ERRNO(errno.ENOSYS), name)
    return f


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
    read_end, write_end = os.pipe()
    try:
        with os.fdopen(write_end, "wb", closefd=True) as w:
            build().export_bpf(w)
        program = b""
        while chunk := os.read(read_end, 65536):
            program += chunk
    finally:
        os.close(read_end)
    buf = ctypes.create_string_buffer(program, len(program))
    prog = _SockFprog(len(program) // 8, ctypes.addressof(buf))
    flags = SECCOMP_FILTER_FLAG_NEW_LISTENER | SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV
    return sys_.seccomp(SECCOMP_SET_MODE_FILTER, flags, ctypes.c_void_p(ctypes.addressof(prog)))
