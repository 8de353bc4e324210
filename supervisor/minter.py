"""The minter: makes superblocks from host loop devices the supervisor holds, never from a container path.

fsconfig(source=...) takes a path, and mountinfo shows that string as the mount's source. Given
"/dev/loopN" inside the container's mount namespace, the path would resolve in a tree the
container controls (a tmpfs over its /dev with a planted node is enough to reach any host
device). The minter lives in a private mount namespace of the host's user namespace, whose
/dev is a tmpfs of its own: just before each fsconfig it makes the node loopN there, of the
host device backing the container's slot N, so the superblock is made from exactly that
device while mountinfo names /dev/loopN as the container knows it. It replies with the
detached mount's fd, which the namespace helper idmaps and attaches.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from typing import Any, Final

import prctl

from . import btrfs, fdops, mounting
from . import syscalls as s
from .errors import KernelError
from .helperproc import HelperProcess, Reply
from .mountopts import MountOptions

_DEV: Final = "/dev"


def start() -> HelperProcess:
    """Fork the minter, unshared into its own mount namespace with a private /dev."""
    return HelperProcess.spawn(
        "mw-minter", (prctl.CAP_SYS_ADMIN, prctl.CAP_MKNOD), _setup, {"mint": _mint, "tmpfs": _tmpfs}
    )


def _setup() -> None:  # pragma: no cover - runs in the minter
    s.unshare(s.CLONE_NEWNS)
    s.mount(None, "/", None, s.MS_REC | s.MS_PRIVATE)
    # Not nodev: the kernel refuses to open a block device through a nodev mount.
    s.mount("mountwarden-minter", _DEV, "tmpfs", s.MS_NOSUID | s.MS_NOEXEC, "mode=700,size=64k")


def _mint(req: dict[str, Any], fds: list[int]) -> tuple[Reply, list[int]]:  # pragma: no cover - in the minter
    number, rdev = int(req["number"]), int(req["rdev"])
    name = f"loop{number}"
    dev = os.open(_DEV, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=dev)
        os.mknod(name, stat.S_IFBLK | 0o600, rdev, dir_fd=dev)
        try:
            opts = MountOptions(
                req["read_only"], frozenset(req["attrs"]), tuple(req["sb_flags"]), tuple(req["fs_options"])
            )
            mnt = mounting.create(req["driver"], f"{_DEV}/{name}", opts)
        finally:
            os.unlink(name, dir_fd=dev)
    finally:
        os.close(dev)
    if mnt.dev != rdev and not (req["driver"] == "btrfs" and _btrfs_device(mnt) == rdev):
        mnt.close()
        raise KernelError(errno.EXDEV, "the new superblock is not on the expected device", f"/dev/{name}")
    return {"mnt_id": mnt.mnt_id, "dev": mnt.dev, "root_ino": mnt.root_ino}, [mnt.fd]


def _btrfs_device(mnt: mounting.DetachedMount) -> int:  # pragma: no cover - in the minter
    """btrfs's st_dev is an anonymous number: its device set is checked instead (btrfs.py)."""
    try:
        return btrfs.sole_device(mnt.fd)
    except (KernelError, OSError):
        mnt.close()
        raise


def _tmpfs(req: dict[str, Any], fds: list[int]) -> tuple[Reply, list[int]]:  # pragma: no cover - in the minter
    """A small tmpfs of the host's user namespace (device nodes work on it: not SB_I_NODEV), as two
    detached mounts of it: one to attach in a container, one the supervisor keeps to write in,
    which no mount the container stacks on the first can reach."""
    fsfd = s.fsopen("tmpfs")
    try:
        s.fsconfig(fsfd, s.FSCONFIG_SET_STRING, "source", str(req["name"]))
        s.fsconfig(fsfd, s.FSCONFIG_SET_STRING, "mode", "755")
        s.fsconfig(fsfd, s.FSCONFIG_SET_STRING, "size", "1m")
        s.fsconfig(fsfd, s.FSCONFIG_CMD_CREATE)
        shown = s.fsmount(
            fsfd, s.MOUNT_ATTR_NOSUID | s.MOUNT_ATTR_NOEXEC | (0 if req["devices"] else s.MOUNT_ATTR_NODEV)
        )
    finally:
        os.close(fsfd)
    try:
        kept = fdops.clone_tree(shown, "", recursive=False, empty_path=True)
    except BaseException:
        os.close(shown)
        raise
    return {}, [shown, kept]
