"""Resolving a container's path inside its own root, one component at a time.

The walk starts from an fd on the container's root and opens each component with
O_PATH|O_NOFOLLOW relative to the previous one, reading symlinks itself: an absolute link
restarts at the container's root and ``..`` never climbs above it, whatever the container
swaps in meanwhile. The result is an fd (so nothing is re-resolved later) plus the canonical
container path that policy matches against.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import deque
from dataclasses import dataclass
from typing import Final

from .errors import KernelError

MAX_SYMLINKS: Final = 40  # the kernel's own limit (MAXSYMLINKS)
PATH_MAX: Final = 4096


@dataclass
class Resolved:
    """An O_PATH fd on the object and its canonical path as the container sees it."""

    fd: int
    path: str
    st: os.stat_result

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Resolved:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def absolute(path: str, cwd: str) -> str:
    """The path as the container meant it: relative paths start at its working directory."""
    return path if path.startswith("/") else f"{cwd.rstrip('/')}/{path}"


def resolve(root_fd: int, path: str, *, follow_last: bool = True) -> Resolved:
    """Walk `path` (absolute, in the container's terms) from `root_fd` without leaving it.

    Raises KernelError with the errno the kernel's own lookup would give (ENOENT, ENOTDIR,
    ELOOP, EACCES, ENAMETOOLONG).
    """
    if not path:
        raise KernelError(errno.ENOENT, "empty path")
    if len(path) >= PATH_MAX:
        raise KernelError(errno.ENAMETOOLONG, "path too long")
    stack: list[tuple[str, int]] = [("", os.dup(root_fd))]
    pending: deque[str] = deque(path.split("/"))
    links = 0
    try:
        while pending:
            name = pending.popleft()
            if name in ("", "."):
                continue
            if name == "..":
                if len(stack) > 1:
                    os.close(stack.pop()[1])
                continue
            if len(name.encode()) > 255:
                raise KernelError(errno.ENAMETOOLONG, "path component too long", name)
            parent = stack[-1][1]
            try:
                fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
            except OSError as exc:
                raise KernelError(exc.errno or errno.EIO, "cannot look up", _joined(stack, name)) from None
            st = os.fstat(fd)
            is_last = not any(p not in ("", ".") for p in pending)
            if stat.S_ISLNK(st.st_mode) and (follow_last or not is_last):
                links += 1
                try:
                    target = os.readlink(name, dir_fd=parent)
                finally:
                    os.close(fd)
                if links > MAX_SYMLINKS:
                    raise KernelError(errno.ELOOP, "too many levels of symbolic links", path)
                if target.startswith("/"):
                    for _, held in stack[1:]:
                        os.close(held)
                    del stack[1:]
                pending.extendleft(reversed(target.split("/")))
                continue
            if not is_last and not stat.S_ISDIR(st.st_mode):
                os.close(fd)
                raise KernelError(errno.ENOTDIR, "not a directory", _joined(stack, name))
            stack.append((name, fd))
        canonical = "/" + "/".join(n for n, _ in stack[1:])
        final_fd = stack.pop()[1]
        return Resolved(final_fd, canonical, os.fstat(final_fd))
    finally:
        for _, held in stack:
            os.close(held)


def _joined(stack: list[tuple[str, int]], last: str) -> str:
    names = [n for n, _ in stack[1:]] + ([last] if last else [])
    return "/" + "/".join(names)
