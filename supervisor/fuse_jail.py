"""Where a FUSE daemon runs: a mount tree and credentials the container cannot steer.

The launcher (host root, forked from the supervisor) builds a private mount namespace in the
host's user namespace whose root is a tmpfs holding read-only binds of the host's /usr (and the
/bin, /sbin, /lib, /lib64 links or binds), a /dev with null, zero, urandom and fuse, an empty
mount point and the image (a bind of the fd the supervisor opened, or of a node the loop pool
made for the container's device, never a path the container names). It then joins the
container's user and pid namespaces and unshares the mount namespace again: the copy belongs
to the container's user namespace, so the kernel locks every mount in it (flags, and
unmounting to reveal what is below). So the program, its ELF interpreter and its
libraries are the host's, whatever the container plants in its own tree or in this one.

The daemon itself holds CAP_SYS_ADMIN in the container's user namespace only (for its FUSE
mount), no other capability, no_new_privs, and the container's own seccomp filter: taken over
by the container (ptrace), it can do nothing the container's root cannot.
"""

from __future__ import annotations

import ctypes
import os
import stat
from dataclasses import dataclass
from typing import Final

import prctl

from . import syscalls as s

STAGE: Final = "/tmp"  # where the jail's tmpfs is built, in the launcher's private namespace only
MOUNT_POINT: Final = "/mnt"  # the daemon's own mount point, inside the jail
IMAGE: Final = "/image"  # the image, a bind of the supervisor's fd
HOST_TREES: Final = ("usr", "bin", "sbin", "lib", "lib64")
DEV_NODES: Final = {"null": (1, 3), "zero": (1, 5), "urandom": (1, 9)}
FUSE_DEV: Final = (10, 229)
ENV: Final = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
_RO_BIND: Final = s.MS_REMOUNT | s.MS_BIND | s.MS_RDONLY | s.MS_NOSUID | s.MS_NODEV
_PR_CAP_AMBIENT: Final = 47
_PR_CAP_AMBIENT_RAISE: Final = 2
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class Jail:
    """What the launcher needs: the image (a file's fd, or a loop device of the container's pool),
    whether it is writable, and whose it is."""

    image_fd: int  # the image file, or the pool's node of the container's device (LoopPool.jail_node)
    read_only: bool
    ids: tuple[int, int]  # uid, gid in the container's user namespace
    host_ids: tuple[int, int]  # the same ids on the host: owner of /dev/fuse and the mount point


def build(jail: Jail, ns_pidfd: int) -> None:  # pragma: no cover - runs in the launcher, host root
    """Make the jail's tree in a new mount namespace and pivot into it."""
    s.unshare(s.CLONE_NEWNS)
    s.mount(None, "/", None, s.MS_REC | s.MS_PRIVATE)
    s.mount("mountwarden-fuse", STAGE, "tmpfs", s.MS_NOSUID | s.MS_NOEXEC, "mode=755,size=64k")
    for name in HOST_TREES:
        host, here = f"/{name}", os.path.join(STAGE, name)
        if os.path.islink(host):
            os.symlink(os.readlink(host), here)
        elif os.path.isdir(host):
            os.mkdir(here)
            s.mount(host, here, None, s.MS_BIND)
            s.mount(None, here, None, _RO_BIND)
    dev = os.path.join(STAGE, "dev")
    os.mkdir(dev)
    for name, (major, minor) in DEV_NODES.items():
        os.mknod(os.path.join(dev, name), stat.S_IFCHR | 0o666, os.makedev(major, minor))
        os.chmod(os.path.join(dev, name), 0o666)
    fuse_node = os.path.join(dev, "fuse")
    os.mknod(fuse_node, stat.S_IFCHR | 0o600, os.makedev(*FUSE_DEV))
    os.chown(fuse_node, *jail.host_ids)
    point = STAGE + MOUNT_POINT
    os.mkdir(point, 0o755)
    os.chown(point, *jail.host_ids)
    image = STAGE + IMAGE
    os.close(os.open(image, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    _bind_from_container(jail.image_fd, ns_pidfd, image)
    if stat.S_ISBLK(os.fstat(jail.image_fd).st_mode):  # the pool's node: its mode says read-only
        s.mount(None, image, None, s.MS_REMOUNT | s.MS_BIND | s.MS_NOSUID | s.MS_NOEXEC)
    else:
        s.mount(None, image, None, s.MS_REMOUNT | s.MS_BIND | s.MS_NOSUID | s.MS_NODEV | s.MS_NOEXEC
                | (s.MS_RDONLY if jail.read_only else 0))  # fmt: skip
    s.mount(None, STAGE, None, s.MS_REMOUNT | s.MS_RDONLY | s.MS_NOSUID | s.MS_NOEXEC)
    os.chdir(STAGE)
    s.pivot_root(".", ".")
    s.umount2(".", s.MNT_DETACH)
    os.chdir("/")


def _bind_from_container(fd: int, ns_pidfd: int, where: str) -> None:  # pragma: no cover - launcher
    """Bind the file `fd` (on a mount of the container's namespace, or a detached copy made there) at
    `where`, by fd only.

    A mount can be cloned only from inside its own namespace: clone it there, come back, attach.
    """
    own = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    s.setns(ns_pidfd, s.CLONE_NEWNS)
    clone = open_tree(fd, OPEN_TREE_CLONE | os.O_CLOEXEC | s.AT_EMPTY_PATH)
    s.setns(own, s.CLONE_NEWNS)
    os.close(own)
    target = os.open(where, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    s.move_mount(clone, target)
    os.close(target)
    os.close(clone)


OPEN_TREE_CLONE: Final = 1


def open_tree(fd: int, flags: int) -> int:
    """open_tree(fd, "", flags): a detached clone of the mount `fd` is on (with OPEN_TREE_CLONE)."""
    ret = _libc.syscall(ctypes.c_long(s.NR_OPEN_TREE), ctypes.c_long(fd), b"", ctypes.c_long(flags))
    if ret < 0:
        raise OSError(ctypes.get_errno(), "open_tree")
    return int(ret)


def own_namespaces(ns_pidfd: int) -> int:  # pragma: no cover - runs in the launcher, before `build`
    """The container's network, uts and ipc namespaces where it has its own (not `--net host`),
    for `enter`: the daemon must not reach the host's abstract sockets or loopback services."""
    with open(f"/proc/self/fdinfo/{ns_pidfd}") as f:
        pid = next(int(line.split()[1]) for line in f if line.startswith("Pid:"))
    flags = 0
    for name, flag in (("net", s.CLONE_NEWNET), ("uts", s.CLONE_NEWUTS), ("ipc", s.CLONE_NEWIPC)):
        if os.stat(f"/proc/{pid}/ns/{name}").st_ino != os.stat(f"/proc/self/ns/{name}").st_ino:
            flags |= flag
    return flags


def enter(jail: Jail, ns_pidfd: int, namespaces: int) -> None:  # pragma: no cover - runs in the launcher
    """Join the container's user and pid namespaces (and `namespaces`), lock the tree, become the caller.

    Afterwards the process holds CAP_SYS_ADMIN (and only that, also across exec, as an ambient
    capability) in the container's user namespace; its children are in the container's pid
    namespace.
    """
    os.setgroups([])  # before: an ordinary user's namespace denies setgroups
    s.setns(ns_pidfd, s.CLONE_NEWUSER | s.CLONE_NEWPID | namespaces)
    s.unshare(s.CLONE_NEWNS)  # owned by the container's user namespace: every mount is locked
    for cap in prctl.ALL_CAPS:
        if cap != prctl.CAP_SYS_ADMIN:
            prctl.capbset_drop(cap)
    prctl.set_keepcaps(True)
    prctl.cap_inheritable.sys_admin = True
    os.setresgid(jail.ids[1], jail.ids[1], jail.ids[1])
    os.setresuid(jail.ids[0], jail.ids[0], jail.ids[0])
    prctl.cap_effective.limit(prctl.CAP_SYS_ADMIN)
    prctl.cap_permitted.limit(prctl.CAP_SYS_ADMIN)
    if _libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_RAISE, prctl.CAP_SYS_ADMIN, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "cannot keep CAP_SYS_ADMIN for the FUSE daemon")
    prctl.set_no_new_privs(True)
