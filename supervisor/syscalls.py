"""Thin ctypes wrappers, one per system call Python's os module lacks.

Each wrapper raises KernelError naming the call, so a failure deep inside a handler still
reaches the container as the kernel's own errno.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import platform
from typing import Final

from .errors import KernelError

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long

# The mount-API and pidfd calls share numbers on every architecture but alpha; the older
# ones (pivot_root, seccomp) do not.
_ARCH_NR: Final = {
    "x86_64": {"pivot_root": 155, "seccomp": 317, "setgroups": 116},
    "aarch64": {"pivot_root": 41, "seccomp": 277, "setgroups": 159},
}[platform.machine()]
NR_OPEN_TREE: Final = 428
NR_MOVE_MOUNT: Final = 429
NR_FSOPEN: Final = 430
NR_FSCONFIG: Final = 431
NR_FSMOUNT: Final = 432
NR_FSPICK: Final = 433
NR_PIDFD_OPEN: Final = 434
NR_PIDFD_GETFD: Final = 438
NR_MOUNT_SETATTR: Final = 442

CLONE_NEWNS: Final = 0x00020000
CLONE_NEWUTS: Final = 0x04000000
CLONE_NEWIPC: Final = 0x08000000
CLONE_NEWUSER: Final = 0x10000000
CLONE_NEWPID: Final = 0x20000000
CLONE_NEWNET: Final = 0x40000000

MS_RDONLY: Final = 0x1
MS_NOSUID: Final = 0x2
MS_NODEV: Final = 0x4
MS_NOEXEC: Final = 0x8
MS_SYNCHRONOUS: Final = 0x10
MS_REMOUNT: Final = 0x20
MS_MANDLOCK: Final = 0x40
MS_DIRSYNC: Final = 0x80
MS_NOSYMFOLLOW: Final = 0x100
MS_NOATIME: Final = 0x400
MS_NODIRATIME: Final = 0x800
MS_BIND: Final = 0x1000
MS_MOVE: Final = 0x2000
MS_REC: Final = 0x4000
MS_SILENT: Final = 0x8000
MS_UNBINDABLE: Final = 1 << 17
MS_PRIVATE: Final = 1 << 18
MS_SLAVE: Final = 1 << 19
MS_SHARED: Final = 1 << 20
MS_RELATIME: Final = 1 << 21
MS_STRICTATIME: Final = 1 << 24
MS_LAZYTIME: Final = 1 << 25
MS_MGC_VAL: Final = 0xC0ED0000
MS_MGC_MSK: Final = 0xFFFF0000

MNT_FORCE: Final = 1
MNT_DETACH: Final = 2
MNT_EXPIRE: Final = 4
UMOUNT_NOFOLLOW: Final = 8

FSCONFIG_SET_FLAG: Final = 0
FSCONFIG_SET_STRING: Final = 1
FSCONFIG_CMD_CREATE: Final = 6
FSCONFIG_CMD_RECONFIGURE: Final = 7
FSPICK_CLOEXEC: Final = 1
FSPICK_EMPTY_PATH: Final = 8
FSOPEN_CLOEXEC: Final = 1
FSMOUNT_CLOEXEC: Final = 1
MOUNT_ATTR_RDONLY: Final = 0x1
MOUNT_ATTR_NOSUID: Final = 0x2
MOUNT_ATTR_NODEV: Final = 0x4
MOUNT_ATTR_NOEXEC: Final = 0x8
MOUNT_ATTR_RELATIME: Final = 0x0
MOUNT_ATTR_NOATIME: Final = 0x10
MOUNT_ATTR_STRICTATIME: Final = 0x20
MOUNT_ATTR__ATIME: Final = 0x70
MOUNT_ATTR_NODIRATIME: Final = 0x80
MOUNT_ATTR_IDMAP: Final = 0x00100000
MOUNT_ATTR_NOSYMFOLLOW: Final = 0x00200000
MOVE_MOUNT_F_EMPTY_PATH: Final = 0x4
MOVE_MOUNT_T_EMPTY_PATH: Final = 0x40
AT_EMPTY_PATH: Final = 0x1000
AT_RECURSIVE: Final = 0x8000

PR_SET_PDEATHSIG: Final = 1
PR_SET_CHILD_SUBREAPER: Final = 36
PR_SET_NO_NEW_PRIVS: Final = 38
PIDFD_THREAD: Final = os.O_EXCL


def _check(ret: int, what: str, path: str | None = None) -> int:
    if ret < 0:
        raise KernelError(ctypes.get_errno(), what, path)
    return ret


def _syscall(nr: int, *args: int | bytes | None | ctypes.c_void_p, what: str, path: str | None = None) -> int:
    # Variadic arguments: widen ints to long so no register keeps stale upper bits.
    wide = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
    return _check(_libc.syscall(ctypes.c_long(nr), *wide), what, path)


def _enc(path: str | bytes) -> bytes:
    return os.fsencode(path)


def unshare(flags: int) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare")


def setns(fd: int, nstype: int) -> None:
    _check(_libc.setns(ctypes.c_int(fd), ctypes.c_int(nstype)), "setns")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(
        _libc.mount(
            None if source is None else _enc(source),
            _enc(target),
            None if fstype is None else _enc(fstype),
            ctypes.c_ulong(flags),
            None if data is None else _enc(data),
        ),
        "mount",
        target,
    )


def umount2(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(_enc(target), ctypes.c_int(flags)), "umount2", target)


def pivot_root(new_root: str, put_old: str) -> None:
    _syscall(_ARCH_NR["pivot_root"], _enc(new_root), _enc(put_old), what="pivot_root", path=new_root)


def prctl(option: int, arg: int) -> None:
    _check(_libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg), 0, 0, 0), "prctl")


def seccomp(op: int, flags: int, args: ctypes.c_void_p | int) -> int:
    return _syscall(_ARCH_NR["seccomp"], ctypes.c_uint(op).value, ctypes.c_uint(flags).value, args, what="seccomp")


def pidfd_open(pid: int, flags: int = 0) -> int:
    return _syscall(NR_PIDFD_OPEN, pid, flags, what="pidfd_open")


def pidfd_getfd(pidfd: int, targetfd: int) -> int:
    return _syscall(NR_PIDFD_GETFD, pidfd, targetfd, 0, what="pidfd_getfd")


def fsopen(fstype: str) -> int:
    return _syscall(NR_FSOPEN, _enc(fstype), FSOPEN_CLOEXEC, what="fsopen", path=fstype)


def fspick(fd: int) -> int:
    """An fs context to reconfigure the superblock of the mount whose root `fd` is (EINVAL elsewhere)."""
    return _syscall(NR_FSPICK, fd, b"", FSPICK_CLOEXEC | FSPICK_EMPTY_PATH, what="fspick")


def fsconfig(fsfd: int, cmd: int, key: str | None = None, value: str | None = None) -> None:
    _syscall(
        NR_FSCONFIG,
        fsfd,
        cmd,
        None if key is None else _enc(key),
        None if value is None else _enc(value),
        0,
        what="fsconfig",
        path=key if value is None else f"{key}={value}",
    )


def fsmount(fsfd: int, attr_flags: int) -> int:
    return _syscall(NR_FSMOUNT, fsfd, FSMOUNT_CLOEXEC, attr_flags, what="fsmount")


def move_mount(from_fd: int, to_fd: int) -> None:
    """Attach a detached mount onto the object to_fd refers to; both by fd, so no path is re-resolved."""
    _syscall(
        NR_MOVE_MOUNT,
        from_fd,
        b"",
        to_fd,
        b"",
        MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH,
        what="move_mount",
    )


class MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def mount_setattr(fd: int, attr_set: int, attr_clr: int, userns_fd: int = 0, propagation: int = 0) -> None:
    """Change the attributes of the mount `fd` refers to; `userns_fd` with MOUNT_ATTR_IDMAP,
    `propagation` one of MS_PRIVATE, MS_SLAVE, MS_SHARED, MS_UNBINDABLE (0 leaves it)."""
    attr = MountAttr(attr_set, attr_clr, propagation, userns_fd)
    _syscall(
        NR_MOUNT_SETATTR,
        fd,
        b"",
        AT_EMPTY_PATH,
        ctypes.c_void_p(ctypes.addressof(attr)),
        ctypes.sizeof(attr),
        what="mount_setattr",
    )


def setfsuid(uid: int) -> int:
    """Switch the filesystem uid; returns the previous one. Leaving 0 drops CAP_DAC_* (see setfsuid(2))."""
    return int(_libc.setfsuid(ctypes.c_uint(uid)))


def setgroups_thread(groups: list[int]) -> None:
    """setgroups for the calling thread alone: glibc's wrapper changes every thread of the
    process (setxid), and the supervisor's workers act for different containers at once."""
    array = (ctypes.c_uint * max(len(groups), 1))(*groups)
    _syscall(_ARCH_NR["setgroups"], len(groups), ctypes.c_void_p(ctypes.addressof(array)), what="setgroups")


def setfsgid(gid: int) -> int:
    return int(_libc.setfsgid(ctypes.c_uint(gid)))


STATX_MNT_ID: Final = 0x1000
STATX_MNT_ID_UNIQUE: Final = 0x4000  # Linux 6.8: a 64-bit id never given to another mount
_STATX_SIZE: Final = 256
_STATX_MNT_ID_OFFSET: Final = 0x90


def mount_id(fd: int, *, unique: bool = False) -> int:
    """The id of the mount `fd` is on (statx STATX_MNT_ID); works without a /proc of our own.

    The default is the id mountinfo shows, which the kernel reuses once the mount is freed;
    `unique` asks for the one it never reuses (not shown in mountinfo).
    """
    want = STATX_MNT_ID_UNIQUE if unique else STATX_MNT_ID
    buf = ctypes.create_string_buffer(_STATX_SIZE)
    _check(_libc.statx(ctypes.c_int(fd), b"", ctypes.c_int(AT_EMPTY_PATH), ctypes.c_uint(want), buf), "statx")
    mask = int.from_bytes(buf.raw[0:4], "little")
    if not mask & want:
        raise KernelError(38, "statx does not report mount ids on this kernel")
    return int.from_bytes(buf.raw[_STATX_MNT_ID_OFFSET : _STATX_MNT_ID_OFFSET + 8], "little")


SFD_NONBLOCK: Final = os.O_NONBLOCK
SFD_CLOEXEC: Final = os.O_CLOEXEC
SI_KERNEL: Final = 0x80


def signalfd(signals: list[int]) -> int:
    """A signal fd for `signals` (which the caller must block), so the event loop can read them
    with their si_code: a terminal's SIGINT (SI_KERNEL) already reached the container itself."""
    mask = (ctypes.c_uint64 * 16)()
    for sig in signals:
        mask[(sig - 1) // 64] |= 1 << ((sig - 1) % 64)
    return _check(_libc.signalfd(-1, ctypes.byref(mask), SFD_NONBLOCK | SFD_CLOEXEC), "signalfd")


def read_signal(fd: int) -> tuple[int, int] | None:
    """(signo, si_code) of one pending signal from a signalfd, or None."""
    try:
        data = os.read(fd, 128)
    except BlockingIOError:
        return None
    return int.from_bytes(data[0:4], "little"), int.from_bytes(data[8:12], "little", signed=True)


class _IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


_libc.process_vm_readv.restype = ctypes.c_ssize_t


def process_vm_readv(pid: int, addr: int, size: int) -> bytes:
    """Up to `size` bytes at `addr` in task `pid`, with copy_from_user's rules: no FOLL_FORCE, so a
    PROT_NONE or unmapped page ends the read (short, or EFAULT at its first byte)."""
    buf = ctypes.create_string_buffer(size)
    local, remote = _IoVec(ctypes.addressof(buf), size), _IoVec(addr, size)
    n = _check(_libc.process_vm_readv(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0), "process_vm_readv")
    return buf.raw[:n]


NS_GET_USERNS: Final = 0xB701
NS_GET_PARENT: Final = 0xB702
NS_GET_OWNER_UID: Final = 0xB704


def _ns_ioctl(fd: int, request: int, what: str) -> int:
    try:
        return fcntl.ioctl(fd, request)
    except OSError as exc:
        raise KernelError(exc.errno or errno.EPERM, what) from None


def ns_get_userns(ns_fd: int) -> int:
    """An fd on the user namespace that owns the namespace `ns_fd` refers to."""
    return _ns_ioctl(ns_fd, NS_GET_USERNS, "NS_GET_USERNS")


def ns_get_parent(userns_fd: int) -> int:
    """An fd on the parent user namespace; EPERM at the top of the supervisor's view."""
    return _ns_ioctl(userns_fd, NS_GET_PARENT, "NS_GET_PARENT")


def ns_get_owner_uid(userns_fd: int) -> int:
    """The uid that created the user namespace, as the supervisor's namespace sees it."""
    buf = bytearray(4)
    try:
        fcntl.ioctl(userns_fd, NS_GET_OWNER_UID, buf, True)
    except OSError as exc:
        raise KernelError(exc.errno or errno.EINVAL, "NS_GET_OWNER_UID") from None
    return int.from_bytes(buf, "little")
