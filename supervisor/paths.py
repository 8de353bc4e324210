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


def resolve(root_fd: int, path: str, *, cwd: str = "/", follow_last: bool = True) -> Resolved:
    """Walk `path` from `root_fd` (relative paths from `cwd`, a canonical path) without leaving it.

    Raises KernelError with the errno the kernel's own lookup would give (ENOENT, ENOTDIR,
    ELOOP, EACCES, ENAMETOOLONG). A trailing slash demands a directory and follows a final link.
    """
    if not path:
        raise KernelError(errno.ENOENT, "empty path")
    if len(os.fsencode(path)) >= PATH_MAX:
        raise KernelError(errno.ENAMETOOLONG, "path too long")
    follow_last = follow_last or path.endswith("/")
    stack: list[tuple[str, int, bool]] = [("", os.dup(root_fd), True)]
    pending: deque[str] = deque(absolute(path, cwd).split("/"))
    links = 0
    try:
        while pending:
            name = pending.popleft()
            if not name:
                continue
            if not stack[-1][2]:  # only a directory can be looked into, also for "." and ".."
                raise KernelError(errno.ENOTDIR, "not a directory", _joined(stack))
            if name == ".":
                continue
            if name == "..":
                if len(stack) > 1:
                    os.close(stack.pop()[1])
                continue
            if len(os.fsencode(name)) > 255:
                raise KernelError(errno.ENAMETOOLONG, "path component too long", name)
            try:
                fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=stack[-1][1])
            except OSError as exc:
                raise KernelError(exc.errno or errno.EIO, "cannot look up", _joined(stack, name)) from None
            try:
                mode = os.fstat(fd).st_mode
            except OSError as exc:  # e.g. a FUSE mount of another user namespace refuses us
                os.close(fd)
                raise KernelError(exc.errno or errno.EACCES, "cannot look up", _joined(stack, name)) from None
            is_last = not any(p for p in pending)
            if stat.S_ISLNK(mode) and (follow_last or not is_last):
                links += 1
                try:
                    target = os.readlink("", dir_fd=fd)  # the link we opened, not whatever is there now
                finally:
                    os.close(fd)
                if links > MAX_SYMLINKS:
                    raise KernelError(errno.ELOOP, "too many levels of symbolic links", path)
                if target.startswith("/"):
                    for _, held, _ in stack[1:]:
                        os.close(held)
                    del stack[1:]
                pending.extendleft(reversed(target.split("/")))
                continue
            stack.append((name, fd, stat.S_ISDIR(mode)))
        if path.endswith("/") and not stack[-1][2]:
            raise KernelError(errno.ENOTDIR, "not a directory", _joined(stack))
        canonical = _joined(stack)
        final_fd = stack.pop()[1]
        return Resolved(final_fd, canonical, os.fstat(final_fd))
    finally:
        for _, held, _ in stack:
            os.close(held)


def _joined(stack: list[tuple[str, int, bool]], last: str = "") -> str:
    return "/" + "/".join([n for n, _, _ in stack[1:]] + ([last] if last else []))
