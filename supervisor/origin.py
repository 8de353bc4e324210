"""Whose file a source path names: the host's, or one the container put there.

Binds, moves and mounts of non-image filesystems run natively, so a path a policy trusts
(``/srv/img/*.ext4``) can lead wherever the container's own mounts make it lead. Policy globs
mean the host's files, so each source is judged against the container's mount tree as it was
before its command ran (`Tree`, taken by Session.start):

* the caller's root must still be the container's original root (no chroot of its own);
* the file's mount (statx on the fd the supervisor holds) must be the very mount the original
  tree has at that path (a walk over the recorded tree, so a file hidden under an original
  mount does not count), compared by the unique mount id the kernel never reuses, and
* that mount must still sit where it sat (its mount point in mountinfo now).

Then the path names the file the host had there, and the source is "host"; anything else is
"container". Mounts the supervisor made for the container are not in the original tree: the
bytes in them are the container's. Mountinfo shows only legacy ids, which the kernel gives
to a new mount once the old one is freed (an unmount, then a tmpfs on the same place, got the
same id and device number on 6.18); so the tree also records each reachable mount's unique id,
looked up from the root before the command runs; a mount not found at its own mount point
that way (hidden by another) is never the host's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from . import mountinfo
from .errors import KernelError
from .paths import resolve
from .policy.matcher import SourceOrigin
from .syscalls import mount_id

_DELETED = " (deleted)"


@dataclass(frozen=True)
class Tree:
    """A container's mounts before its command ran, and the root they are seen from."""

    mounts: dict[int, mountinfo.Mount]
    unique: dict[int, int]  # mountinfo's id -> the unique id, for mounts reachable from the root
    root_id: int
    root_key: tuple[int, int]  # st_dev, st_ino of the root directory
    children: dict[tuple[int, str], tuple[int, ...]]  # (parent id, mount point) -> mounts there

    @classmethod
    def take(cls, pid: int) -> Tree:
        """Record the tree of `pid` (the container's init, before the command runs) from its own root."""
        proc = os.open(f"/proc/{pid}", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            root = os.open("root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=proc)
            try:
                mounts = mountinfo.read(proc)
                unique = {m.mnt_id: u for m in mounts.values() if (u := _unique_id(root, m)) is not None}
                st = os.fstat(root)
                return cls.of(mounts, unique, mount_id(root), (st.st_dev, st.st_ino))
            finally:
                os.close(root)
        finally:
            os.close(proc)

    @classmethod
    def of(
        cls, mounts: dict[int, mountinfo.Mount], unique: dict[int, int], root_id: int, root_key: tuple[int, int]
    ) -> Tree:
        children: dict[tuple[int, str], tuple[int, ...]] = {}
        for m in mounts.values():
            key = (m.parent_id, m.mount_point)
            children[key] = (*children.get(key, ()), m.mnt_id)
        return cls(mounts, unique, root_id, root_key, children)

    def owner(self, path: str) -> mountinfo.Mount | None:
        """The mount a lookup of the canonical `path` ended on in this tree; None if unclear.

        A lookup starts on the root's mount and never enters mounts stacked over the root
        itself; at every component it enters what is mounted there, the topmost of a stack.
        Two mounts on one place under one parent cannot be told apart: None.
        """
        current = self.root_id
        prefix = ""
        for name in path.strip("/").split("/") if path != "/" else ():
            prefix += "/" + name
            while (stacked := self.children.get((current, prefix))) is not None:
                if len(stacked) != 1:
                    return None
                current = stacked[0]
        return self.mounts.get(current)

    def judge(self, *, proc_fd: int, root_fd: int, fd: int, path: str) -> SourceOrigin:
        """Whether `fd`, found at canonical `path` by the task of `proc_fd` (root `root_fd`), is the host's.

        `path` is relative to that task's root; its mountinfo is read now, from the same root.
        """
        st = os.fstat(root_fd)
        if mount_id(root_fd) != self.root_id or (st.st_dev, st.st_ino) != self.root_key:
            return "container"
        then = self.owner(path)
        if then is None or then.mnt_id not in self.unique or mount_id(fd, unique=True) != self.unique[then.mnt_id]:
            return "container"
        # The same mount, alive (our fd holds it), so it still owns its mountinfo id.
        now = mountinfo.read(proc_fd).get(then.mnt_id)
        return "host" if now is not None and now.mount_point == then.mount_point else "container"


def _unique_id(root: int, m: mountinfo.Mount) -> int | None:
    """The unique id of `m`, looked up at its mount point; None where another mount is found there."""
    try:
        with resolve(root, m.mount_point, follow_last=False) as found:
            if mount_id(found.fd) != m.mnt_id:
                return None
            return mount_id(found.fd, unique=True)
    except KernelError:
        return None


def judge(tree: Tree | None, *, proc_fd: int, root_fd: int, fd: int, path: str) -> SourceOrigin:
    """`Tree.judge`, for a session that may not have recorded its tree: then nothing is the host's."""
    if tree is None:
        return "container"
    return tree.judge(proc_fd=proc_fd, root_fd=root_fd, fd=fd, path=path)


def backing_file(tree: Tree | None, *, proc_fd: int, root_fd: int, root_path: str, fd: int) -> tuple[str, SourceOrigin]:
    """The path and origin of a loop device's backing file, from the fd the supervisor took.

    The path is the kernel's name for the open file (readlink of our own fd, not of the
    caller's fd table, which may have changed since), relative to the caller's root
    `root_path`; "" when the file lies outside that root. A file that lost its name (" (deleted)",
    or no links left) is "deleted": no path names it.
    """
    raw = os.readlink(f"/proc/self/fd/{fd}")
    if raw.endswith(_DELETED) or os.fstat(fd).st_nlink == 0:
        return raw.removeprefix(root_path.rstrip("/")), "deleted"
    if root_path != "/":
        if not raw.startswith(root_path + "/"):
            return "", "container"
        raw = raw[len(root_path) :]
    return raw, judge(tree, proc_fd=proc_fd, root_fd=root_fd, fd=fd, path=raw)
