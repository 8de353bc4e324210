"""File operations that never act by a path the container can change.

The supervisor works in trees the container shares (its /dev, the /sys views). A name walked
again later, a dirfd on the container's own mount (lookups from it still cross the
container's overmounts), or a chown by name each let the container put a host file of its
choosing in the supervisor's way. These helpers give the two tools that avoid it: a private
detached clone of a mount (no child mounts the container could add), and openat2 walks that
refuse to cross mounts or follow symlinks.
"""

from __future__ import annotations

import ctypes
import os
import struct
from typing import Final

from .errors import KernelError
from .syscalls import AT_EMPTY_PATH, NR_OPEN_TREE

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

NR_OPENAT2: Final = 437
NR_FCHMODAT2: Final = 452
OPEN_TREE_CLONE: Final = 1
AT_RECURSIVE: Final = 0x8000
AT_FDCWD: Final = -100
RESOLVE_NO_XDEV: Final = 0x01
RESOLVE_NO_MAGICLINKS: Final = 0x02
RESOLVE_NO_SYMLINKS: Final = 0x04
RESOLVE_BENEATH: Final = 0x08
RESOLVE_STRICT: Final = RESOLVE_NO_XDEV | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_SYMLINKS | RESOLVE_BENEATH
SAFE_OPEN: Final = os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def _check(ret: int, what: str, path: str) -> int:
    if ret < 0:
        raise KernelError(ctypes.get_errno(), what, path)
    return ret


def clone_tree(dir_fd: int, path: str, *, recursive: bool = True, empty_path: bool = False) -> int:
    """A detached copy of the mount at `path` (and, `recursive`, the mounts below it as they are now).

    OPEN_TREE_CLONE alone is refused (EINVAL) for a mount with locked children, such as the
    container's /dev with its /dev/shm, so the copy is recursive by default; mounts added
    later in the original tree never appear in the copy.
    """
    flags = OPEN_TREE_CLONE | os.O_CLOEXEC | (AT_RECURSIVE if recursive else 0) | (AT_EMPTY_PATH if empty_path else 0)
    return _check(
        _libc.syscall(ctypes.c_long(NR_OPEN_TREE), ctypes.c_long(dir_fd), os.fsencode(path), ctypes.c_long(flags)),
        "open_tree",
        path,
    )


def open_beneath(dir_fd: int, path: str, flags: int, mode: int = 0) -> int:
    """openat2 of `path` under `dir_fd`: no mount crossed, no symlink followed, no escape, never blocking."""
    # openat2 refuses O_PATH with anything but these (EINVAL), where openat ignored the rest.
    extra = os.O_CLOEXEC | os.O_NOFOLLOW if flags & os.O_PATH else SAFE_OPEN
    return openat2(dir_fd, path, flags | extra, RESOLVE_STRICT, mode)


def openat2(dir_fd: int, path: str, flags: int, resolve: int, mode: int = 0) -> int:
    """openat2(2): `path` under `dir_fd`, walked as `resolve` (RESOLVE_*) says."""
    how = _OpenHow(flags | os.O_CLOEXEC, mode, resolve)
    ret = _libc.syscall(
        ctypes.c_long(NR_OPENAT2),
        ctypes.c_long(dir_fd),
        os.fsencode(path),
        ctypes.byref(how),
        ctypes.c_size_t(ctypes.sizeof(how)),
    )
    return _check(ret, "openat2", path)


def set_owner(fd: int, uid: int, gid: int, mode: int) -> None:
    """chown and chmod the very inode `fd` refers to (O_PATH fds included), never a name."""
    # fchown/fchmod refuse O_PATH fds (EBADF); the *at calls take them with AT_EMPTY_PATH
    # (fchmodat2 only: fchmodat has no flags), and need no procfs, which in a helper that
    # entered the container's mount namespace would be the container's.
    _check(_libc.fchownat(fd, b"", uid, gid, AT_EMPTY_PATH), "fchownat", "")
    _check(_libc.syscall(NR_FCHMODAT2, fd, b"", mode, AT_EMPTY_PATH), "fchmodat2", "")


def disown(fd: int) -> None:
    """Make a device node host root's with no access bits: whoever still holds it (an O_PATH fd,
    a bind, a hard link) can no longer open it, whatever device its number later names."""
    set_owner(fd, 0, 0, 0)


def identity(fd: int) -> tuple[int, int]:
    """(mount id, device) of what `fd` is on. statx with an empty mask: a FUSE mount of another
    user namespace refuses every other attribute to host root (EACCES), not these two."""
    buf = ctypes.create_string_buffer(256)
    if _libc.statx(fd, b"", AT_EMPTY_PATH | _AT_SYMLINK_NOFOLLOW, 0, buf) != 0:
        raise KernelError(ctypes.get_errno(), "statx")
    major, minor = struct.unpack_from("<II", buf.raw, 0x88)
    (mnt_id,) = struct.unpack_from("<Q", buf.raw, 0x90)
    return mnt_id, os.makedev(major, minor)


_AT_SYMLINK_NOFOLLOW: Final = 0x100
