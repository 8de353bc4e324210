"""Landing the supervisor's mounts by way of the staging namespace, so the kernel locks their flags.

A mount the namespace helper attaches in the container's own mount namespace is the
container's to change: its root can clear nosuid, nodev, noexec or ro with a raw
MS_REMOUNT|MS_BIND from any process the filter does not see (kernel-facts §10). A mount that
reaches the container's namespace by propagation from a namespace of a more privileged user
namespace arrives with those flags locked (MNT_LOCK_*), for every process, and a clone of it
keeps them.

`run` arranges that: the waiter's staging namespace (host user namespace) keeps its tree
shared, and the init's copy of it, made from the container's user namespace, has every
mount as a slave of its staging original. The waiter leaves one directory for this in the
container's /dev, the landing (`LANDING`: host root's, mode 0700, so no process of the
container can enter it or mount on anything in it). Each mount lands in three steps:

1. the stager, a helper in the staging namespace, makes a fresh directory in the landing and
   attaches the detached mount there (its forced flags already set); the kernel propagates a
   copy into the container's /dev, its flags locked;
2. the namespace helper clones that copy (by its fd on the container's landing, opened before
   the container's command ran), makes the clone private and attaches it on the target; the
   clone keeps the locks, and its root is not MNT_LOCKED, so the container can unmount it;
3. the stager detaches the staging mount and removes the directory; umount propagation takes
   the copy in the container's landing with it.

So every target the container can name gets locked flags, also one on a tmpfs the container
mounted itself, and nothing stays in staging once the mount is in place. Sessions without a
staging namespace (containers `run` did not make) have the helper attach directly, and the
audit record says `flags_locked: false`.
"""

from __future__ import annotations

import errno
import os
from typing import Any, Final

import prctl

from . import fdops
from . import syscalls as s
from .errors import KernelError
from .helperproc import HelperProcess, Reply
from .loop.pool import PRIVATE_DIR

LANDING: Final = f"dev/{PRIVATE_DIR}"  # beneath the container's root; the waiter makes it
_SLOT: Final = fdops.RESOLVE_BENEATH | fdops.RESOLVE_NO_SYMLINKS | fdops.RESOLVE_NO_XDEV


def start(staging_pidfd: int, landing_fd: int) -> HelperProcess:
    """Fork the stager into the staging mount namespace of the waiter behind `staging_pidfd`;
    `landing_fd` is the landing directory there."""
    return HelperProcess.spawn(
        "mw-stager", (prctl.CAP_SYS_ADMIN,), lambda: _enter(staging_pidfd, landing_fd), _OPS,
        keep=(staging_pidfd, landing_fd),
    )  # fmt: skip


def idmap(mnt_fd: int, userns_fd: int) -> bool:
    """Idmap the detached mount; False where the filesystem does not support idmapped mounts."""
    try:
        s.mount_setattr(mnt_fd, s.MOUNT_ATTR_IDMAP, 0, userns_fd)
    except KernelError as exc:
        if exc.errno == errno.EINVAL:  # the filesystem lacks FS_ALLOW_IDMAP
            return False
        raise
    return True


_landing = -1  # in the stager: the landing directory in the staging namespace
_fd_dir = -1  # in the stager: the host procfs's /proc/self/fd, opened before setns
_held: dict[str, int] = {}  # in the stager: slot name -> fd on the mount landed there


def _enter(pidfd: int, landing_fd: int) -> None:  # pragma: no cover - runs in the stager
    global _fd_dir, _landing
    _fd_dir = os.open("/proc/self/fd", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    _landing = landing_fd
    s.setns(pidfd, s.CLONE_NEWNS)
    os.close(pidfd)


def _stage(req: dict[str, Any], fds: list[int]) -> tuple[Reply, list[int]]:  # pragma: no cover - in the stager
    """Idmap fds[0] with fds[1] if given, attach it in a new slot of the landing."""
    mnt_fd = fds[0]
    slot = str(req["slot"])
    if slot in _held or "/" in slot or slot in ("", ".", ".."):
        raise KernelError(errno.EEXIST, "the landing slot is taken", slot)
    idmapped = len(fds) > 1 and idmap(mnt_fd, fds[1])
    os.mkdir(slot, 0o700, dir_fd=_landing)
    try:
        at = fdops.openat2(_landing, slot, os.O_PATH | os.O_DIRECTORY, _SLOT)
        try:
            s.move_mount(mnt_fd, at)
        finally:
            os.close(at)
    except BaseException:
        os.rmdir(slot, dir_fd=_landing)
        raise
    _held[slot] = os.dup(mnt_fd)
    return {"idmapped": idmapped}, []


def _unstage(req: dict[str, Any], fds: list[int]) -> tuple[Reply, list[int]]:  # pragma: no cover - in the stager
    """Detach the mount in `slot` (and, by propagation, its copy in the container's landing).

    By the fd's magic link in the host's procfs: the kernel has no unmount by fd, and the
    staging namespace's /proc may be the container's. Nothing can be stacked on the slot (only
    the stager mounts in staging), so the lookup cannot step down onto another mount.
    """
    slot = str(req["slot"])
    fd = _held.pop(slot, -1)
    if fd < 0:
        return {}, []
    try:
        os.fchdir(_fd_dir)
        s.umount2(str(fd), s.MNT_DETACH)
    finally:
        os.chdir("/")
        os.close(fd)
    os.rmdir(slot, dir_fd=_landing)
    return {}, []


_OPS: Final = {"stage": _stage, "unstage": _unstage}
