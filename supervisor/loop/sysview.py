"""The container's own view of its loop devices in /sys, under container numbers.

util-linux lists loop devices from /sys/block and reads each one's loop/backing_file, offset
and sizelimit there, and finds a device's directory from its number through /sys/dev/block.
The container's /sys/block, /sys/class/block and /sys/dev/block are empty tmpfs mounts made
before its namespaces (so it cannot remove them); this module keeps them showing exactly the
container's devices. The directory fds are the supervisor's own detached copies of those
tmpfs mounts (taken before the container's command ran): no bind the container puts over an
entry of its view is in them, and the directories are host root's, so the container cannot
add names either. Every walk below them is an openat2 that crosses no mount and follows no
symlink, and no open waits on a FIFO.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from .. import fdops


@dataclass(frozen=True)
class LoopState:
    """What sysfs says about one bound device."""

    backing_file: str
    offset: int
    sizelimit: int
    autoclear: bool
    partscan: bool
    read_only: bool
    direct_io: bool
    size_bytes: int
    block_size: int


@contextlib.contextmanager
def _unless_absent() -> Iterator[None]:
    """Ignore a missing entry (ENOENT, as KernelError from openat2 or FileNotFoundError)."""
    try:
        yield
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            raise


class SysView:
    """Writes /sys/block/loopN, /sys/class/block/loopN and /sys/dev/block/M:m for the container.

    Every attribute is replaced in one rename (written under a temporary name beside it), and
    each is written once with its final value: a reader racing a change sees the old value or
    the new one, never an empty, missing or intermediate file, as with the kernel's own sysfs.
    """

    def __init__(self, block_fd: int, class_fd: int | None, dev_fd: int | None) -> None:
        self.block_fd, self.class_fd, self.dev_fd = block_fd, class_fd, dev_fd

    def add(self, number: int, rdev: int) -> None:
        """An unbound device: its directory and device number, no loop/ attributes."""
        self._show(number, rdev, {"size": "0", "ro": "0", "queue/logical_block_size": "512"})
        if self.class_fd is not None:
            self._link(self.class_fd, f"loop{number}", f"../../block/loop{number}")

    def bind(self, number: int, rdev: int, state: LoopState) -> None:
        name = f"loop{number}"
        self._mkdir(name)
        self._mkdir(f"{name}/loop")
        self._show(number, rdev, {
            "size": str(state.size_bytes // 512),
            "ro": "1" if state.read_only else "0",
            "queue/logical_block_size": str(state.block_size),
            "loop/backing_file": state.backing_file,
            "loop/offset": str(state.offset),
            "loop/sizelimit": str(state.sizelimit),
            "loop/autoclear": str(int(state.autoclear)),
            "loop/partscan": str(int(state.partscan)),
            "loop/dio": str(int(state.direct_io)),
        })  # fmt: skip
        if self.class_fd is not None:
            self._link(self.class_fd, name, f"../../block/{name}")
        if self.dev_fd is not None:
            self._link(self.dev_fd, f"{os.major(rdev)}:{os.minor(rdev)}", f"../../block/{name}")

    def unbind(self, number: int, rdev: int, placeholder_rdev: int) -> None:
        with _unless_absent():
            self._rmtree(f"loop{number}/loop")
        if self.dev_fd is not None:
            with _unless_absent():
                os.unlink(f"{os.major(rdev)}:{os.minor(rdev)}", dir_fd=self.dev_fd)
        self.add(number, placeholder_rdev)

    def remove(self, number: int) -> None:
        name = f"loop{number}"
        with _unless_absent():
            self._rmtree(name)
        if self.class_fd is not None:
            with _unless_absent():
                os.unlink(name, dir_fd=self.class_fd)

    def _show(self, number: int, rdev: int, values: dict[str, str]) -> None:
        """Write the attributes every loop device has, with `values` over the defaults."""
        name = f"loop{number}"
        self._mkdir(name)
        self._mkdir(f"{name}/queue")
        common = {"dev": f"{os.major(rdev)}:{os.minor(rdev)}", "removable": "0", "range": "1"}
        for attr, value in (common | values).items():
            self._write(f"{name}/{attr}", value)

    def _parent(self, rel: str) -> tuple[int, str]:
        """An fd on the directory holding `rel` (walked strictly) and the last component."""
        head, _, leaf = rel.rpartition("/")
        return fdops.open_beneath(self.block_fd, head or ".", os.O_PATH | os.O_DIRECTORY), leaf

    def _mkdir(self, rel: str) -> None:
        parent, leaf = self._parent(rel)
        try:
            with contextlib.suppress(FileExistsError):
                os.mkdir(leaf, 0o755, dir_fd=parent)
        finally:
            os.close(parent)

    def _rmtree(self, rel: str) -> None:
        fd = fdops.open_beneath(self.block_fd, rel, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for entry in os.listdir(fd):
                if stat.S_ISDIR(os.stat(entry, dir_fd=fd, follow_symlinks=False).st_mode):
                    self._rmtree(f"{rel}/{entry}")
                else:
                    os.unlink(entry, dir_fd=fd)
        finally:
            os.close(fd)
        parent, leaf = self._parent(rel)
        try:
            os.rmdir(leaf, dir_fd=parent)
        finally:
            os.close(parent)

    def _write(self, rel: str, value: str) -> None:
        """Replace `rel` with a file holding `value` in one rename; unchanged values are left be."""
        parent, leaf = self._parent(rel)
        data = f"{value}\n".encode()
        try:
            with contextlib.suppress(OSError):
                fd = os.open(leaf, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=parent)
                try:
                    if os.read(fd, len(data) + 1) == data:
                        return
                finally:
                    os.close(fd)
            temp = f".{leaf}.new"
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp, dir_fd=parent)
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444, dir_fd=parent)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
            os.rename(temp, leaf, src_dir_fd=parent, dst_dir_fd=parent)
        finally:
            os.close(parent)

    @staticmethod
    def _link(dir_fd: int, name: str, target: str) -> None:
        """Point `name` at `target` in one rename, so the link never dangles or goes missing."""
        with contextlib.suppress(OSError):
            if os.readlink(name, dir_fd=dir_fd) == target:
                return
        temp = f".{name}.new"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp, dir_fd=dir_fd)
        os.symlink(target, temp, dir_fd=dir_fd)
        os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
