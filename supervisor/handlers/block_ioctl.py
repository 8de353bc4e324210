"""Capability-gated block ioctls on the container's own pool devices, and FITRIM on its own mounts.

block/ioctl.c refuses BLKBSZSET, BLKFLSBUF, BLKROSET, BLKRRPART, BLKRASET and BLKFRASET (EACCES),
and filesystems refuse FITRIM (EPERM), to a caller without CAP_SYS_ADMIN in the initial user
namespace, which container root never has: `mkfs.xfs /dev/loop0` (BLKBSZSET), `blockdev
--flushbufs/--setro/--rereadpt/--setra` and `fstrim` would fail where a privileged kernel lets
them through. They are served here with the kernel's semantics:

* The caller must hold CAP_SYS_ADMIN over its own namespaces (container root does); a task that
  dropped it gets the kernel's EACCES (EPERM for FITRIM).
* Only the container's own objects: a block device fd of one of the pool's slots (bound, or the
  free placeholder), or, for FITRIM, a file on a superblock the supervisor mounted on one of the
  pool's devices (its records) whose device number is that device's (ext2/3/4, xfs; not btrfs,
  whose files carry a device number of their own). Any other fd runs natively (CONTINUE), where the kernel refuses
  the caller as it would any unprivileged task.
* The request is made by the supervisor on the caller's own open file (pidfd_getfd), not on a
  file of its own, so what the kernel checks on the file is still the caller's: BLKBSZSET on an
  O_EXCL open (mkfs opens so) sets the size at once, on any other open it claims the device
  and gets EBUSY while someone else holds it (a mount). The one exception is an fd opened on
  a free /dev/loopN before it was bound (see loop_ioctl): natively it refers to the bound
  device, so the request goes to the pool's own fd of that device.

The pool never scans partitions on a host device (see loop/pool.py): BLKRRPART is answered as
a kernel without partition parsers would, EINVAL without LO_FLAGS_PARTSCAN, else EBUSY while
another opener holds the device exclusively, else success with no partition found.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
from collections.abc import Callable
from typing import Final

from ..call import Call
from ..errors import KernelError
from ..loop.abi import (
    BLKBSZGET,
    BLKBSZSET,
    BLKBSZSET_32,
    BLKFLSBUF,
    BLKFRASET,
    BLKRASET,
    BLKROSET,
    BLKRRPART,
    LOOP_MAJOR,
)
from ..loop.device import ioctl_value
from ..loop.pool import LoopPool, Slot
from ..seccomp.notify import Response
from ..target import CAP_SYS_ADMIN

FITRIM: Final = 0xC0185879  # _IOWR('X', 121, struct fstrim_range): three u64, the same on every ABI
_INT: Final = struct.Struct("<i")
_FSTRIM_RANGE: Final = 24

Op = Callable[[Call, int, Slot, int], None]


def _int_arg(call: Call, arg: int) -> bytes:
    return call.target.read_bytes(arg, _INT.size, "int argument")


def _bszset(call: Call, fd: int, slot: Slot, arg: int) -> None:
    if arg == 0:
        raise KernelError(errno.EINVAL, "BLKBSZSET needs a pointer to the block size")
    fcntl.ioctl(fd, BLKBSZSET, _int_arg(call, arg))


def _roset(call: Call, fd: int, slot: Slot, arg: int) -> None:
    fcntl.ioctl(fd, BLKROSET, _int_arg(call, arg))


def _flsbuf(call: Call, fd: int, slot: Slot, arg: int) -> None:
    fcntl.ioctl(fd, BLKFLSBUF, 0)


def _readahead(request: int) -> Op:
    def op(call: Call, fd: int, slot: Slot, arg: int) -> None:
        ioctl_value(fd, request, arg)

    return op


def _rrpart(call: Call, fd: int, slot: Slot, arg: int) -> None:
    if not slot.partscan:
        raise KernelError(errno.EINVAL, f"/dev/loop{slot.number} does not scan partitions (LO_FLAGS_PARTSCAN)")
    # The kernel's scan claims the device unless this very open holds it exclusively. Setting
    # the block size it already has makes the same claim (and nothing else): EBUSY while it
    # is mounted or exclusively open elsewhere.
    size = bytearray(_INT.size)
    fcntl.ioctl(fd, BLKBSZGET, size, True)
    fcntl.ioctl(fd, BLKBSZSET, bytes(size))


DEVICE_OPS: Final[dict[int, Op]] = {
    BLKBSZSET: _bszset,
    BLKBSZSET_32: _bszset,
    BLKROSET: _roset,
    BLKFLSBUF: _flsbuf,
    BLKRASET: _readahead(BLKRASET),
    BLKFRASET: _readahead(BLKFRASET),
    BLKRRPART: _rrpart,
}
REQUESTS: Final = frozenset({*DEVICE_OPS, FITRIM})
NAMES: Final = {
    BLKBSZSET: "BLKBSZSET", BLKBSZSET_32: "BLKBSZSET", BLKROSET: "BLKROSET", BLKFLSBUF: "BLKFLSBUF",
    BLKRASET: "BLKRASET", BLKFRASET: "BLKFRASET", BLKRRPART: "BLKRRPART", FITRIM: "FITRIM",
}  # fmt: skip


def handle(call: Call) -> Response:
    args = call.notif.args
    fd, request, arg = args[0] & 0xFFFFFFFF, args[1] & 0xFFFFFFFF, args[2]
    call.audit.update(fd=fd, request=f"{request:#06x}", op=NAMES[request])
    ours = call.target.take_fd(fd)
    try:
        st = os.fstat(ours)
        pool = call.session.pool
        if pool is None or fcntl.fcntl(ours, fcntl.F_GETFL) & os.O_PATH:
            return _native(call)  # the kernel refuses an O_PATH fd any ioctl (EBADF)
        if request == FITRIM:
            return _fitrim(call, pool, ours, st, arg)
        slot = pool.slot_for(st) if stat.S_ISBLK(st.st_mode) else None
        target = _device_fd(pool, slot, st, ours)
        if slot is None or target is None:
            return _native(call)
        call.audit["device"] = f"/dev/loop{slot.number}"
        _require_admin(call, errno.EACCES)
        call.target.check()
        _run(DEVICE_OPS[request], call, target, slot, arg)
        if slot.device is not None:  # BLKROSET shows in its ro
            pool.refresh(slot)
    finally:
        os.close(ours)
    call.audit["action"] = "served"
    return Response.success(call.notif.id, 0)


def _device_fd(pool: LoopPool, slot: Slot | None, st: os.stat_result, ours: int) -> int | None:
    """The file to act on: the caller's own when it is on the slot's device (or on the free
    slot's placeholder), the pool's when it was opened on the placeholder before the bind
    (natively it refers to the bound device). Never a file on any other device: a node of
    the slot's earlier binding may now reach a device someone else bound."""
    if slot is None or pool.placeholder is None:
        return None
    device = slot.device.rdev if slot.device is not None else pool.placeholder.rdev
    if st.st_rdev == device:
        return ours
    if slot.device is not None and st.st_rdev == pool.placeholder.rdev:
        return slot.device.fd
    return None


def _fitrim(call: Call, pool: LoopPool, ours: int, st: os.stat_result, arg: int) -> Response:
    """FITRIM on a file of a superblock the supervisor mounted on one of the pool's devices."""
    record = call.session.record_for_dev(st.st_dev)
    # on the pool's device itself, not just on a superblock the records name: a superblock
    # with a device number of its own (btrfs, FUSE) could since have given it to another
    slot = pool.slot_for_host(record.loop) if record is not None else None
    mounted_from = {os.makedev(LOOP_MAJOR, record.loop)} if record is not None else set()
    if slot is not None and slot.private is not None:  # a user-owned pool's (LoopPool.mount_device)
        mounted_from.add(slot.private.rdev)
    on_device = st.st_dev in mounted_from
    if record is None or not on_device or not pool.holds(record.loop):
        return _native(call)
    call.audit.update(target=record.target, host_device=f"/dev/loop{record.loop}")
    _require_admin(call, errno.EPERM)
    trim = bytearray(call.target.read_bytes(arg, _FSTRIM_RANGE, "struct fstrim_range"))
    try:
        fcntl.ioctl(ours, FITRIM, trim, True)
    except OSError as exc:
        raise KernelError(exc.errno or errno.EIO, "FITRIM") from None
    call.target.write_bytes(arg, bytes(trim), "struct fstrim_range")
    call.audit["action"] = "served"
    return Response.success(call.notif.id, 0)


def _run(op: Op, call: Call, fd: int, slot: Slot, arg: int) -> None:
    try:
        op(call, fd, slot, arg)
    except OSError as exc:
        raise KernelError(exc.errno or errno.EIO, f"{call.audit['op']} on /dev/loop{slot.number}") from None


def _require_admin(call: Call, err: int) -> None:
    creds = call.target.creds
    if creds is None or not creds.has_cap(CAP_SYS_ADMIN):
        raise KernelError(err, f"{call.audit['op']} needs CAP_SYS_ADMIN")


def _native(call: Call) -> Response:
    """Not the container's own: the kernel answers the caller itself (EACCES/EPERM, ENOTTY)."""
    call.audit["action"] = "kernel-native"
    return Response.continue_(call.notif.id)
