"""The loop pool's place in a container a runtime made (LXC, runc, crun), not `run`.

A runtime makes the container's /dev and /sys itself, usually from inside the container's user
namespace: such a /dev is a tmpfs the kernel marks nodev for its whole life (SB_I_NODEV), so
no block device node on it can ever be opened, and the container's root may change it at will.
So the pool's nodes live on a small tmpfs of the host's user namespace that the supervisor
attaches at /dev/.mountwarden, and /dev/loop-control and /dev/loopN are symbolic links into it
(the one visible difference from a privileged kernel's /dev: `ls -l` shows links). The /sys
block views are host tmpfs mounts over /sys/block, /sys/class/block, /sys/dev/block and
/sys/devices/virtual/block, as `run` stages them. The supervisor writes in its own detached
copies of these tmpfs mounts, which nothing the container mounts can reach.

Unlike `run`'s, these mounts are not locked: the container's root may unmount them. It then
loses its own loop devices (or sees the host's list of block devices, which a runtime's /sys
shows anyway), nothing more: the nodes' devices are granted in its device cgroup only while
they are its own. Everything here is created as the container's root (fs ids of its host
uid), through paths resolved beneath its root without following symlinks, so nothing the
container planted can take a host root's action elsewhere.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable
from typing import Final

from . import fdops
from .errors import KernelError
from .loop.pool import PRIVATE_DIR
from .loop.sysview import SysView
from .nshelper import Attach, NsHelper
from .target import as_ids

SYS_VIEWS: Final = ("sys/block", "sys/class/block", "sys/dev/block", "sys/devices/virtual/block")
_WALK: Final = fdops.RESOLVE_BENEATH | fdops.RESOLVE_NO_SYMLINKS | fdops.RESOLVE_NO_MAGICLINKS


def views(
    helper: NsHelper, init_pid: int, owner: tuple[int, int], names: list[str], check_alive: Callable[[], None]
) -> tuple[list[int], SysView]:  # fmt: skip
    """Attach the pool's /dev and /sys views in the container of `init_pid`, link `names` in /dev.

    `check_alive` raises once the init is gone (a pid may then name another process).
    Returns the supervisor's copies (the first is the node directory, for the pool; the caller
    owns all of them) and the /sys view over them.
    """
    kept: list[int] = []
    try:
        with contextlib.ExitStack() as stack:
            root = os.open(f"/proc/{init_pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            stack.callback(os.close, root)
            check_alive()  # the root opened is the init's, not a reused pid's
            with as_ids(*owner):
                dev = _beneath(root, "dev")
                if dev is None:
                    raise KernelError(errno.ENOENT, "the container has no /dev for its loop devices")
                stack.callback(os.close, dev)
                with contextlib.suppress(FileExistsError):
                    os.mkdir(PRIVATE_DIR, 0o755, dir_fd=dev)
                if (nodes := _attach_tmpfs(helper, dev, PRIVATE_DIR, "mountwarden-dev", devices=True)) < 0:
                    raise KernelError(errno.ENOENT, "the container's /dev changed while it was being set up", "/dev")
                kept.append(nodes)
                shown: dict[str, int] = {}
                for view in SYS_VIEWS:
                    if (fd := _attach_tmpfs(helper, root, view, "mountwarden-sys")) >= 0:
                        kept.append(fd)
                        shown[view] = fd
                for name in names:
                    _link(dev, name, f"{PRIVATE_DIR}/{name}")
        if SYS_VIEWS[0] not in shown:
            raise KernelError(errno.ENOENT, "the container has no /sys/block to show its loop devices in")
        return kept, SysView(shown[SYS_VIEWS[0]], shown.get(SYS_VIEWS[1]), shown.get(SYS_VIEWS[2]))
    except BaseException:
        for fd in kept:
            os.close(fd)
        raise


def _beneath(dir_fd: int, path: str) -> int | None:
    try:
        return fdops.openat2(dir_fd, path, os.O_PATH | os.O_DIRECTORY, _WALK)
    except KernelError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise


def _attach_tmpfs(helper: NsHelper, dir_fd: int, path: str, name: str, *, devices: bool = False) -> int:
    """Mount a fresh host tmpfs on `path` beneath `dir_fd`; the supervisor's copy, or -1 if `path` is absent."""
    target = _beneath(dir_fd, path)
    if target is None:
        return -1
    try:
        shown, kept = helper.tmpfs(name, devices=devices)
        try:
            helper.call(Attach(), (shown, target))
        except BaseException:
            os.close(kept)
            raise
        finally:
            os.close(shown)
    finally:
        os.close(target)
    return kept


def _link(dir_fd: int, name: str, points_to: str) -> None:
    """Make `name` a symbolic link to `points_to`, replacing whatever the runtime put there."""
    temporary = f".{name}.mountwarden"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temporary, dir_fd=dir_fd)
    os.symlink(points_to, temporary, dir_fd=dir_fd)
    os.rename(temporary, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
