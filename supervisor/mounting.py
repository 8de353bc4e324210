"""Building a detached mount with the new mount API, in the supervisor's own namespaces.

The superblock is created here (fsopen/fsconfig/fsmount) with the forced attributes already
set, so the mount never exists without them; only attaching it (move_mount) has to happen
inside the container's mount namespace, which the per-container helper does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from . import syscalls as s
from .errors import KernelError
from .mountopts import MountOptions


@dataclass
class DetachedMount:
    """A mount not yet attached anywhere; closing the fd before attaching discards it."""

    fd: int
    mnt_id: int
    dev: int
    root_ino: int

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def create(driver: str, device: str, opts: MountOptions) -> DetachedMount:
    """Make the superblock on `device` and a detached mount of it with `opts` applied."""
    fsfd = s.fsopen(driver)
    try:
        try:
            s.fsconfig(fsfd, s.FSCONFIG_SET_STRING, "source", device)
            if opts.read_only:
                s.fsconfig(fsfd, s.FSCONFIG_SET_FLAG, "ro")
            for flag in opts.sb_flags:
                s.fsconfig(fsfd, s.FSCONFIG_SET_FLAG, flag)
            for opt in opts.fs_options:
                key, eq, value = opt.partition("=")
                if eq:
                    s.fsconfig(fsfd, s.FSCONFIG_SET_STRING, key, value)
                else:
                    s.fsconfig(fsfd, s.FSCONFIG_SET_FLAG, key)
            s.fsconfig(fsfd, s.FSCONFIG_CMD_CREATE)
        except KernelError as exc:
            raise KernelError(
                exc.errno or 0, _context_log(fsfd) or f"{driver} refused the image ({exc.what})"
            ) from None
        mfd = s.fsmount(fsfd, opts.attr_flags)
    finally:
        os.close(fsfd)
    st = os.fstat(mfd)
    return DetachedMount(mfd, s.mount_id(mfd), st.st_dev, st.st_ino)


def _context_log(fsfd: int) -> str:
    """The filesystem's own explanation, from the fs context's message log (fsopen(2))."""
    messages = []
    os.set_blocking(fsfd, False)
    while True:
        try:
            msg = os.read(fsfd, 1024).decode(errors="replace")
        except OSError:
            break
        if not msg:
            break
        messages.append(msg[2:] if msg[1:2] == " " else msg)
    return "; ".join(messages)
