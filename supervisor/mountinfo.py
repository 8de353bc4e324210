"""Parsing /proc/<pid>/mountinfo: one entry per mount, keyed by mount id.

The kernel writes mount points and roots relative to the root of the process whose file is
read, and escapes space, tab, newline and backslash as three-digit octal (``\\040``); paths
are bytes, so the text is decoded with surrogateescape and compares equal to the paths the
supervisor resolved itself (which are decoded the same way).
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass
from typing import Final

from .errors import KernelError

_ESCAPE: Final = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True)
class Mount:
    """One line of mountinfo (see proc_pid_mountinfo(5)); `dev` is the superblock's st_dev."""

    mnt_id: int
    parent_id: int
    dev: int
    root: str
    mount_point: str
    options: str
    fstype: str
    source: str
    tags: tuple[str, ...] = ()  # the optional fields: shared:N, master:N, propagate_from:N, unbindable


def unescape(field: str) -> str:
    """A mountinfo field as the path it names: ``\\040`` becomes a space, ``\\134`` a backslash."""
    return _ESCAPE.sub(lambda m: chr(int(m[1], 8)), field)


def parse(text: str) -> dict[int, Mount]:
    """Every mount in `text`, in the kernel's order; raises KernelError(EIO) on a line it cannot read."""
    mounts: dict[int, Mount] = {}
    for line in text.splitlines():
        fields = line.split(" ")
        try:
            sep = fields.index("-", 6)  # optional fields (shared:N, master:N, ...) end at "-"
            major, minor = fields[2].split(":")
            mount = Mount(
                int(fields[0]), int(fields[1]), os.makedev(int(major), int(minor)), unescape(fields[3]),
                unescape(fields[4]), fields[5], fields[sep + 1], unescape(fields[sep + 2]), tuple(fields[6:sep]),
            )  # fmt: skip
        except (ValueError, IndexError):
            raise KernelError(errno.EIO, f"cannot parse the mountinfo line {line!r}") from None
        mounts[mount.mnt_id] = mount
    return mounts


def read(proc_fd: int) -> dict[int, Mount]:
    """The mounts of the process whose /proc/<pid> directory `proc_fd` is, as it sees them."""
    try:
        fd = os.open("mountinfo", os.O_RDONLY | os.O_CLOEXEC, dir_fd=proc_fd)
        try:
            chunks = []
            while chunk := os.read(fd, 1 << 16):
                chunks.append(chunk)
        finally:
            os.close(fd)
    except OSError as exc:
        raise KernelError(exc.errno or errno.ESRCH, "cannot read the mount table of the task (did it exit?)") from None
    return parse(b"".join(chunks).decode(errors="surrogateescape"))
