"""Attaching the supervisor's mounts in the staging namespace, so the kernel locks their flags.

A mount the namespace helper attaches in the container's own mount namespace is the
container's to change: its root can clear nosuid, nodev, noexec or ro with a raw
MS_REMOUNT|MS_BIND from any process the filter does not see (kernel-facts §10). A mount that
reaches the container's namespace by propagation from a namespace of a more privileged user
namespace arrives with those flags locked (MNT_LOCK_*), for every process, and its root is
not MNT_LOCKED, so the container can still unmount it.

`run` arranges that: the waiter's staging namespace (host user namespace) keeps its tree
shared, and the init's copy of it, made from the container's user namespace, has every
mount as a slave of its staging original (`master:N` in the container, `shared:N` in
staging). The stager, a helper in the staging namespace, attaches each new mount at the
staging dentry that is the container's target: the mount the target is on names its master
group, the staging mount of that group with the same root is walked beneath without
following symlinks or crossing mounts, and the dentry reached must be the target's own
(device and inode) before move_mount, by fd, attaches there. The copy that propagates into
the container is the one it sees and the record names.

Where the target is not on a mount propagated from staging (a tmpfs the container made, a
mount namespace the container unshared, a session without a staging namespace) the helper
attaches in the container's namespace as before, and the audit record says `flags_locked:
false`. The staged original is kept by the stager (an fd) and detached when the container
holds no mount of its superblock any more: detaching it takes any copy left at the same
place in the container's namespaces with it (umount propagation). FUSE mounts take the same
way: the supervisor's clone of the daemon's mount, its forced flags already set, is attached
here like a kernel mount (`attach_detached`). Making the original private before detaching it
does not spare the copies: umount propagates through the parent's peer group and slaves.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import os
import posixpath
import struct
from dataclasses import dataclass
from typing import Any, Final

import prctl

from . import fdops, mountinfo
from . import syscalls as s
from .errors import KernelError
from .helperproc import HelperProcess, Reply

_BENEATH: Final = fdops.RESOLVE_BENEATH | fdops.RESOLVE_NO_SYMLINKS | fdops.RESOLVE_NO_XDEV


@dataclass(frozen=True)
class Plan:
    """Where in staging a mount for the container's target goes.

    `staging_id` is the staging mount (the master of the target's mount) at `mount_point`;
    `under` the target's path beneath its root; `dev` and `ino` the target's own, which the
    dentry reached there must have. `parent_id` and `target` name the place in the
    container, where its copy is looked up afterwards.
    """

    staging_id: int
    mount_point: str
    under: str
    dev: int
    ino: int
    parent_id: int
    target: str


def plan(
    container: dict[int, mountinfo.Mount], staging: dict[int, mountinfo.Mount], target_mnt: int, target: str,
    st: os.stat_result,
) -> Plan | str:  # fmt: skip
    """The staging place for a mount on `target` (on mount `target_mnt`), or why there is none."""
    mine = container.get(target_mnt)
    if mine is None:
        return "the target's mount is not in the container's mount table"
    master = _tag(mine, "master")
    if master is None:
        return "the target is on a mount the container made"
    peers = [m for m in staging.values() if _tag(m, "shared") == master]
    rel = posixpath.relpath(target, mine.mount_point)
    fs_path = posixpath.normpath(posixpath.join(mine.root, rel))
    for peer in peers:
        under = posixpath.relpath(fs_path, peer.root)
        if under != ".." and not under.startswith("../"):
            return Plan(peer.mnt_id, peer.mount_point, under, st.st_dev, st.st_ino, target_mnt, target)
    return "the target's mount has no staging original showing the target"


def copy_in_container(container: dict[int, mountinfo.Mount], where: Plan, dev: int) -> int:
    """The id of the container's copy of the staged mount: the top one on `where`'s place."""
    found = [
        m.mnt_id for m in container.values()
        if m.parent_id == where.parent_id and m.mount_point == where.target and m.dev == dev
        and _tag(m, "master") is not None
    ]  # fmt: skip
    if not found:
        raise KernelError(errno.EBUSY, "the mount did not reach the container's namespace", where.target)
    return max(found)


def _tag(mount: mountinfo.Mount, name: str) -> int | None:
    for tag in mount.tags:
        key, _, value = tag.partition(":")
        if key == name:
            return int(value)
    return None


def start(staging_pidfd: int) -> HelperProcess:
    """Fork the stager into the staging mount namespace of the waiter behind `staging_pidfd`."""
    return HelperProcess.spawn(
        "mw-stager", (prctl.CAP_SYS_ADMIN,), lambda: _enter(staging_pidfd), _OPS, keep=(staging_pidfd,)
    )


def attach_detached(proc: HelperProcess, mnt_fd: int, userns_fd: int, where: Plan) -> int:
    """Attach the detached mount `mnt_fd` as planned (no idmap); the staging original's id."""
    reply, _ = proc.call({"op": "attach", "idmap": False, **dataclasses.asdict(where)}, (mnt_fd, userns_fd))
    return int(reply["staged"])


def idmap(mnt_fd: int, userns_fd: int) -> bool:
    """Idmap the detached mount; False where the filesystem does not support idmapped mounts."""
    try:
        s.mount_setattr(mnt_fd, s.MOUNT_ATTR_IDMAP, 0, userns_fd)
    except KernelError as exc:
        if exc.errno == errno.EINVAL:  # the filesystem lacks FS_ALLOW_IDMAP
            return False
        raise
    return True


_held: dict[int, int] = {}  # in the stager: staging mount id -> fd on that mount


_fd_dir = -1  # in the stager: the host procfs's /proc/self/fd, opened before setns


def _enter(pidfd: int) -> None:  # pragma: no cover - runs in the stager
    global _fd_dir
    _fd_dir = os.open("/proc/self/fd", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    s.setns(pidfd, s.CLONE_NEWNS)
    os.close(pidfd)


def _attach(req: dict[str, Any], fds: list[int]) -> tuple[Reply, list[int]]:  # pragma: no cover - in the stager
    """Idmap fds[0] with fds[1] when asked, attach it at the planned dentry; keep an fd on it."""
    mnt_fd, userns_fd = fds
    top = fdops.openat2(fdops.AT_FDCWD, req["mount_point"], os.O_PATH | os.O_DIRECTORY, fdops.RESOLVE_NO_SYMLINKS)
    try:
        if s.mount_id(top) != req["staging_id"]:
            raise KernelError(errno.EBUSY, "the staging mount moved", req["mount_point"])
        at = top if req["under"] == "." else fdops.openat2(top, req["under"], os.O_PATH | os.O_DIRECTORY, _BENEATH)
        try:
            st = os.fstat(at)
            if (st.st_dev, st.st_ino) != (req["dev"], req["ino"]):
                raise KernelError(errno.EBUSY, "the target changed while it was being mounted; try again")
            idmapped = req["idmap"] and idmap(mnt_fd, userns_fd)
            s.move_mount(mnt_fd, at)
        finally:
            if at != top:
                os.close(at)
    finally:
        os.close(top)
    staged = identity(mnt_fd)[0]
    _held[staged] = os.dup(mnt_fd)
    return {"idmapped": idmapped, "staged": staged}, []


def _release(req: dict[str, Any], fds: list[int]) -> tuple[Reply, list[int]]:  # pragma: no cover - in the stager
    """Detach the staged mount `staged`, named by its fd's magic link in the host's procfs:
    neither a path (the stager trusts none) nor a chdir into the mount (a FUSE mount refuses
    host root even that, EACCES). Replies whether it went.

    umount2 steps down into whatever is mounted on top of the mount a path names
    (LOOKUP_MOUNTPOINT), magic links included, and the kernel has no unmount by fd: while a
    later staged mount sits on this one's root, the release waits (the caller retries).
    """
    staged = int(req["staged"])
    fd = _held.get(staged, -1)
    if fd < 0:
        return {"released": True}, []
    if covered(_fd_dir, identity(fd)[0]):
        return {"released": False}, []
    del _held[staged]
    try:
        os.fchdir(_fd_dir)
        s.umount2(str(fd), s.MNT_DETACH)
    finally:
        os.chdir("/")
        os.close(fd)
    return {"released": True}, []


def covered(fd_dir: int, mnt_id: int) -> bool:
    """Whether a mount sits on the root of mount `mnt_id` in the caller's mount namespace, where
    `fd_dir` is the caller's /proc/<pid>/fd in the host's procfs: an unmount through a path
    or magic link would take that one instead (LOOKUP_MOUNTPOINT steps down)."""
    proc = os.open("..", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd_dir)
    try:
        mounts = mountinfo.read(proc)
    finally:
        os.close(proc)
    me = mounts.get(mnt_id)
    return me is not None and any(m.parent_id == mnt_id and m.mount_point == me.mount_point for m in mounts.values())


_OPS: Final = {"attach": _attach, "release": _release}


def identity(fd: int) -> tuple[int, int]:
    """(mount id, device) of what `fd` is on. statx with an empty mask: a FUSE mount of another
    user namespace refuses every other attribute to host root (EACCES), not these two."""
    buf = ctypes.create_string_buffer(256)
    if _libc.statx(fd, b"", s.AT_EMPTY_PATH | _AT_SYMLINK_NOFOLLOW, 0, buf) != 0:
        raise KernelError(ctypes.get_errno(), "statx")
    major, minor = struct.unpack_from("<II", buf.raw, 0x88)
    (mnt_id,) = struct.unpack_from("<Q", buf.raw, 0x90)
    return mnt_id, os.makedev(major, minor)


_AT_SYMLINK_NOFOLLOW: Final = 0x100
_libc = ctypes.CDLL(None, use_errno=True)
