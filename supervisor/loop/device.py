"""Attaching one host loop device to a backing fd, the way systemd's loop-util does it.

Lock order: the device node's BSD lock (LOCK_EX) is taken after LOOP_CTL_GET_FREE and held
across LOOP_CONFIGURE, so udev and other lock-respecting tools do not probe a half-made device.
Another process (a host `losetup`, a second supervisor) may win the race for the same free
device: LOOP_CONFIGURE then fails with EBUSY and we retry with a fresh number, a bounded number
of times with randomized backoff. Every device is configured with LO_FLAGS_AUTOCLEAR, so the
kernel detaches it by itself once the last opener (our fd, then the mount) lets go, also if the
supervisor is killed.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import random
import struct
import time
from dataclasses import dataclass
from typing import Final

from ..errors import KernelError
from .abi import (
    BLKGETSIZE64,
    BLKROGET,
    BLKROSET,
    BLKSSZGET,
    CONFIG,
    INFO64,
    LO_FLAGS_AUTOCLEAR,
    LO_FLAGS_READ_ONLY,
    LO_NAME_SIZE,
    LOOP_CLR_FD,
    LOOP_CONFIGURE,
    LOOP_CTL_GET_FREE,
    LOOP_GET_STATUS64,
    LoopInfo,
)

_libc = ctypes.CDLL(None, use_errno=True)
_RETRY_ERRNOS: Final = frozenset({errno.EBUSY, errno.ENOENT, errno.ENXIO, errno.EAGAIN})
_MAX_TRIES: Final = 64
BLKGETDISKSEQ: Final = 0x80081280  # _IOR(0x12, 128, __u64)


@dataclass
class LoopDevice:
    """An attached host loop device; `fd` keeps it bound until the mount holds it too."""

    number: int
    fd: int
    rdev: int
    diskseq: int = 0  # the kernel's sequence number of this binding: a re-bound device has another

    @property
    def path(self) -> str:
        return f"/dev/loop{self.number}"

    def close(self) -> None:
        """Drop our reference; with autoclear the kernel detaches once nothing else holds it.

        LOOP_CLR_FD sets autoclear again first: a process under no filter (an ordinary user's,
        on a node of its own container) may have cleared it, which would leave the device
        bound with nobody to hold it. One racing us between the two calls still can (see
        docs/threat-model.md).
        """
        if self.fd >= 0:
            with contextlib.suppress(OSError):  # ENXIO: detached already
                fcntl.ioctl(self.fd, LOOP_CLR_FD)
            os.close(self.fd)
            self.fd = -1


def status64(fd: int) -> LoopInfo:
    """LOOP_GET_STATUS64 of the loop device open on `fd`."""
    buf = bytearray(INFO64.size)
    fcntl.ioctl(fd, LOOP_GET_STATUS64, buf, True)
    return LoopInfo.unpack(buf)


def attach(
    backing_fd: int,
    *,
    read_only: bool,
    name: str = "",
    offset: int = 0,
    sizelimit: int = 0,
    flags: int = 0,
    block_size: int = 0,
) -> LoopDevice:
    """Bind a free host loop device to `backing_fd` (read-only if asked) and verify the result.

    `flags` adds LO_FLAGS_* (partscan, direct I/O); autoclear is always set.
    """
    backing = os.fstat(backing_fd)
    flags |= LO_FLAGS_AUTOCLEAR | (LO_FLAGS_READ_ONLY if read_only else 0)
    info = LoopInfo(offset=offset, sizelimit=sizelimit, flags=flags, file_name=name.encode()[: LO_NAME_SIZE - 1])
    config = CONFIG.pack(backing_fd, block_size, info.pack(), *([0] * 8))
    ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
    try:
        for attempt in range(_MAX_TRIES):
            number = fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)
            try:
                fd = os.open(f"/dev/loop{number}", os.O_RDWR | os.O_CLOEXEC)
            except OSError as exc:
                if exc.errno not in _RETRY_ERRNOS:
                    raise KernelError(exc.errno or errno.EIO, "cannot open loop device", f"/dev/loop{number}") from None
                _backoff(attempt)
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                fcntl.ioctl(fd, LOOP_CONFIGURE, config)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in _RETRY_ERRNOS:
                    raise KernelError(exc.errno or errno.EIO, "LOOP_CONFIGURE failed", f"/dev/loop{number}") from None
                _backoff(attempt)
                continue
            bound = status64(fd)
            if (bound.device, bound.inode) != (backing.st_dev, backing.st_ino) or not bound.flags & LO_FLAGS_AUTOCLEAR:
                os.close(fd)  # autoclear undoes our half of it
                raise KernelError(errno.EBUSY, "loop device was re-bound by someone else", f"/dev/loop{number}")
            fcntl.flock(fd, fcntl.LOCK_UN)
            return LoopDevice(number, fd, os.fstat(fd).st_rdev, diskseq(fd))
        raise KernelError(errno.EBUSY, f"no free loop device after {_MAX_TRIES} tries")
    finally:
        os.close(ctl)


def _backoff(attempt: int) -> None:
    time.sleep(random.uniform(0, min(0.001 * 2**attempt, 0.05)))


def diskseq(fd: int) -> int:
    """BLKGETDISKSEQ: the device's sequence number, bumped whenever it is bound or detached (5.15+)."""
    buf = bytearray(8)
    fcntl.ioctl(fd, BLKGETDISKSEQ, buf, True)
    return int(struct.unpack("<Q", buf)[0])


def still_bound(number: int, seq: int) -> bool:
    """Whether host device `number` still holds the binding whose diskseq was `seq`.

    Read from sysfs, so no fd of ours keeps the device alive while we look. A device detached
    and bound again by anyone (another container, a host losetup) has a new diskseq.
    """
    try:
        with open(f"/sys/block/loop{number}/diskseq") as f:
            current = int(f.read())
    except (OSError, ValueError):
        return False  # the device itself was removed
    return current == seq and is_bound(number)


def is_bound(number: int) -> bool:
    """Whether a host loop device still has a backing file (autoclear runs asynchronously)."""
    return os.path.exists(f"/sys/block/loop{number}/loop/backing_file")


def wait_detached(numbers: list[int], timeout: float = 10.0) -> list[int]:
    """Wait until the kernel's deferred autoclear has released these devices; returns the stragglers."""
    deadline = time.monotonic() + timeout
    left = [n for n in numbers if is_bound(n)]
    while left and time.monotonic() < deadline:
        time.sleep(0.01)
        left = [n for n in left if is_bound(n)]
    return left


def device_size(fd: int) -> int:
    """Size in bytes of the block device open on `fd`."""
    buf = bytearray(8)
    fcntl.ioctl(fd, BLKGETSIZE64, buf, True)
    return int(struct.unpack("<Q", buf)[0])


def logical_block_size(fd: int) -> int:
    buf = bytearray(4)
    fcntl.ioctl(fd, BLKSSZGET, buf, True)
    return int(struct.unpack("<i", buf)[0])


def read_only(fd: int) -> bool:
    """BLKROGET: whether the device refuses writes (bound read-only, or set so by BLKROSET)."""
    buf = bytearray(4)
    fcntl.ioctl(fd, BLKROGET, buf, True)
    return bool(struct.unpack("<i", buf)[0])


def clear_read_only(fd: int) -> None:
    """BLKROSET 0. The kernel keeps a BLKROSET 1 on a loop device across detach and the next
    binding, so a device leaving the container must not take it to its next user."""
    fcntl.ioctl(fd, BLKROSET, struct.pack("<i", 0))


def ioctl_value(fd: int, request: int, arg: int) -> None:
    """An ioctl whose argument is a number (an unsigned long in the kernel, wider than the C
    int fcntl.ioctl passes), so the host device judges the caller's very value."""
    if _libc.ioctl(ctypes.c_int(fd), ctypes.c_ulong(request), ctypes.c_ulong(arg & (2**64 - 1))) < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
