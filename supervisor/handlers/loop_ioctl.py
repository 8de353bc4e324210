"""Loop ioctls on the container's /dev/loop-control and /dev/loopN, served by its private pool.

Every loop request number is intercepted, whatever the fd (the capability-gated block requests
are too, and go to block_ioctl): on the pool's nodes it is answered
here with loop(4)'s semantics and errnos, in container numbers; on a host loop device that is
not the container's own it is refused; on anything else it gets ENOTTY, as natively.

The block size queries (BLKGETSIZE, BLKGETSIZE64) are intercepted too, for one case: an fd the
container opened on a free /dev/loopN before binding it still refers to the pool's empty
placeholder device, so its size is answered from the device the slot was bound to. On any
other fd they run natively (CONTINUE: the answer depends on the fd alone). Backing
files are the fds the container itself opened (taken with pidfd_getfd, never reopened by
path), so the kernel has already checked the container's right to them.

A device that backs a live supervisor mount was approved by policy with its bytes as they are:
LOOP_CHANGE_FD, LOOP_SET_STATUS(64) moving its offset or sizelimit, and LOOP_SET_CAPACITY would
re-point the mounted filesystem at bytes policy never saw, so they get EBUSY while any mount of
it lives.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
from collections.abc import Callable
from typing import Final

from .. import origin
from ..call import Call
from ..errors import KernelError
from ..loop.abi import (
    BLKGETSIZE,
    BLKGETSIZE64,
    BLKGETSIZE64_32,
    INFO64,
    LO_FLAGS_AUTOCLEAR,
    LO_FLAGS_PARTSCAN,
    LO_FLAGS_READ_ONLY,
    LOOP_CHANGE_FD,
    LOOP_CLR_FD,
    LOOP_CONFIGURE,
    LOOP_CTL_ADD,
    LOOP_CTL_GET_FREE,
    LOOP_CTL_REMOVE,
    LOOP_GET_STATUS,
    LOOP_GET_STATUS64,
    LOOP_MAJOR,
    LOOP_SET_BLOCK_SIZE,
    LOOP_SET_CAPACITY,
    LOOP_SET_DIRECT_IO,
    LOOP_SET_FD,
    LOOP_SET_STATUS,
    LOOP_SET_STATUS64,
    NAMES,
    LoopInfo,
)
from ..loop.device import device_size, ioctl_value, status64
from ..loop.pool import BindRequest, LoopPool, Slot
from ..policy import SourceOrigin
from ..registry import layouts
from ..seccomp.notify import Response
from . import block_ioctl

CONFIG_HEAD: Final = struct.Struct("<II")
CONFIG_SIZE: Final = 8 + INFO64.size + 64
_INT_MAX: Final = 2**31 - 1


class Request:
    """One loop ioctl on one of the pool's nodes: the caller, its fd's mode, the argument."""

    def __init__(self, call: Call, pool: LoopPool, slot: Slot | None, writable: bool, arg: int) -> None:
        self.call, self.pool, self.slot, self.writable, self.arg = call, pool, slot, writable, arg

    @property
    def bound(self) -> Slot:
        if self.slot is None or self.slot.device is None:
            raise KernelError(errno.ENXIO, "the loop device is not bound")
        return self.slot

    def done(self, val: int = 0) -> Response:
        return Response.success(self.call.notif.id, val)


Op = Callable[[Request], Response]


def handle(call: Call) -> Response:
    t, args = call.target, call.notif.args
    fd, request, arg = args[0] & 0xFFFFFFFF, args[1] & 0xFFFFFFFF, args[2]
    if request in block_ioctl.REQUESTS:
        return block_ioctl.handle(call)
    call.audit.update(fd=fd, request=f"{request:#06x}", op=_NAMES.get(request, "unknown"))
    ours = t.take_fd(fd)
    try:
        st, flags = os.fstat(ours), fcntl.fcntl(ours, fcntl.F_GETFL)
    except OSError:  # a file of a FUSE mount of the container's own refuses us (EACCES): not a loop device
        raise KernelError(errno.ENOTTY, "not a loop device") from None
    finally:
        os.close(ours)
    if flags & os.O_PATH:  # the kernel's fdget() ignores O_PATH files
        raise KernelError(errno.EBADF, "an O_PATH fd takes no ioctl")
    t.check()
    pool = call.session.pool
    if request in SIZE_OPS:
        slot = pool.slot_for(st) if pool is not None else None
        if pool is None or slot is None or slot.device is None or st.st_ino == slot.node_ino:
            call.audit.update(action="kernel-native")
            return Response.continue_(call.notif.id)
        return SIZE_OPS[request](Request(call, pool, slot, False, arg))
    if pool is not None and pool.is_control(st):
        op = CONTROL_OPS.get(request)
        slot = None
    elif pool is not None and (slot := pool.slot_for(st)) is not None:
        op = DEVICE_OPS.get(request)
    elif pool is not None and stat.S_ISBLK(st.st_mode) and pool.is_retired(st.st_rdev):
        raise KernelError(errno.ENXIO, "this loop device was cleared; open /dev/loopN again")
    elif stat.S_ISBLK(st.st_mode) and os.major(st.st_rdev) == LOOP_MAJOR:
        raise KernelError(errno.EPERM, "this is not one of the container's own loop devices")
    else:
        raise KernelError(errno.ENOTTY, "not a loop device")
    if op is None:
        raise KernelError(errno.EINVAL, f"unsupported loop request {request:#06x}")
    assert pool is not None
    if slot is not None:
        call.audit["device"] = f"/dev/loop{slot.number}"
    writable = flags & os.O_ACCMODE != os.O_RDONLY
    return op(Request(call, pool, slot, writable, arg))


# --- loop-control -----------------------------------------------------------------------------


def _get_free(r: Request) -> Response:
    r.call.session.sweep()  # slots whose mounts the container dropped count no more
    number = r.pool.get_free()
    r.call.audit["device"] = f"/dev/loop{number}"
    return r.done(number)


def _add(r: Request) -> Response:
    return r.done(r.pool.add(_number(r.arg)))


def _remove(r: Request) -> Response:
    r.pool.remove(_number(r.arg))
    return r.done()


def _number(arg: int) -> int:
    if arg > _INT_MAX:
        raise KernelError(errno.EINVAL, "loop device number out of range")
    return arg


# --- binding ----------------------------------------------------------------------------------


def _bind(r: Request, backing: int, info: LoopInfo, block_size: int) -> Response:
    t = r.call.target
    slot = r.slot
    assert slot is not None
    if slot.device is not None:
        raise KernelError(errno.EBUSY, f"/dev/loop{slot.number} is already bound")
    r.call.session.sweep()
    ours = t.take_fd(backing)
    try:
        mode = os.fstat(ours).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            raise KernelError(errno.EINVAL, "a loop device needs a regular file or block device to back it")
        path, source_origin = _backing_file(r, ours)
        read_only = bool(info.flags & LO_FLAGS_READ_ONLY) or not r.writable
        req = BindRequest(
            ours, path, read_only, info.offset, info.sizelimit, info.flags, block_size, info.name, source_origin
        )
        r.call.audit.update(backing_file=path, read_only=read_only, offset=info.offset, sizelimit=info.sizelimit)
        r.call.audit["source_origin"] = source_origin
        r.pool.bind(slot, req)
    finally:
        os.close(ours)
    r.call.audit["host_device"] = slot.host.path
    return r.done()


def _backing_file(r: Request, ours: int) -> tuple[str, SourceOrigin]:
    """Path and origin of the file the supervisor took, judged now and kept with the slot."""
    t = r.call.target
    tree = r.call.session.tree_at_start
    return origin.backing_file(tree, proc_fd=t.proc, root_fd=t.root, root_path=t.root_path, fd=ours)


def _set_fd(r: Request) -> Response:
    return _bind(r, r.arg & 0xFFFFFFFF, LoopInfo(), 0)


def _configure(r: Request) -> Response:
    raw = r.call.target.read_bytes(r.arg, CONFIG_SIZE, "struct loop_config")
    backing, block_size = CONFIG_HEAD.unpack_from(raw)
    info = LoopInfo.unpack(raw, CONFIG_HEAD.size)
    r.call.target.check()
    return _bind(r, backing, info, block_size)


def _clear(r: Request) -> Response:
    r.pool.clear(r.bound, busy=r.call.session.loop_in_use)
    return r.done()


# --- status -----------------------------------------------------------------------------------


def _status(r: Request) -> LoopInfo:
    """The bound device's status as the container must see it: its number, its autoclear."""
    slot = r.bound
    info = status64(slot.host.fd)
    flags = info.flags | LO_FLAGS_AUTOCLEAR if slot.autoclear else info.flags & ~LO_FLAGS_AUTOCLEAR
    return info._replace(number=slot.number, flags=flags | LO_FLAGS_PARTSCAN if slot.partscan else flags)


def _get_status64(r: Request) -> Response:
    r.call.target.write_bytes(r.arg, _status(r).pack(), "struct loop_info64")
    return r.done()


def _get_status(r: Request) -> Response:
    r.call.target.write_bytes(r.arg, layouts(r.call.notif).pack_old(_status(r)), "struct loop_info")
    return r.done()


def _apply_status(r: Request, info: LoopInfo) -> Response:
    slot = r.bound
    now = status64(slot.host.fd)
    window = (info.offset, info.sizelimit)
    moved = window != (now.offset, now.sizelimit) or window != slot.window
    if moved:
        r.call.audit.update(offset=info.offset, sizelimit=info.sizelimit)
        _refuse_if_mounted(r, slot, "moving its offset or size limit")
    slot.autoclear = bool(info.flags & LO_FLAGS_AUTOCLEAR)
    slot.partscan = slot.partscan or bool(info.flags & LO_FLAGS_PARTSCAN)  # the kernel never clears it either
    # the host device always clears itself at last close and never scans partitions (see pool)
    host_flags = (info.flags | LO_FLAGS_AUTOCLEAR) & ~LO_FLAGS_PARTSCAN
    _host_ioctl(slot, LOOP_SET_STATUS64, info._replace(flags=host_flags).pack())
    if moved:
        r.pool.changed(slot, window=window)
    r.pool.refresh(slot)
    return r.done()


def _set_status64(r: Request) -> Response:
    raw = r.call.target.read_bytes(r.arg, INFO64.size, "struct loop_info64")
    r.call.target.check()
    return _apply_status(r, LoopInfo.unpack(raw))


def _set_status(r: Request) -> Response:
    layout = layouts(r.call.notif)
    raw = r.call.target.read_bytes(r.arg, layout.info_old.size, "struct loop_info")
    r.call.target.check()
    return _apply_status(r, layout.unpack_old(raw, _status(r).sizelimit))


# --- the rest ---------------------------------------------------------------------------------


def _refuse_if_mounted(r: Request, slot: Slot, change: str) -> None:
    if r.call.session.loop_in_use(slot.host.number) or r.pool.private_claimed(slot):
        raise KernelError(
            errno.EBUSY, f"/dev/loop{slot.number} backs a mount policy approved; {change} would change what it reads"
        )


def _host_ioctl(slot: Slot, request: int, arg: int | bytes) -> None:
    """The request on the host device; the kernel's refusal (LOOP_CHANGE_FD of a writable
    device or to a file of another size: EINVAL) is the container's answer."""
    try:
        if isinstance(arg, int):
            ioctl_value(slot.host.fd, request, arg)
        else:
            fcntl.ioctl(slot.host.fd, request, arg)
    except OSError as exc:
        raise KernelError(exc.errno or errno.EIO, f"{_NAMES[request]} on /dev/loop{slot.number}") from None


def _change_fd(r: Request) -> Response:
    slot = r.bound
    _refuse_if_mounted(r, slot, "another backing file")
    ours = r.call.target.take_fd(r.arg & 0xFFFFFFFF)
    try:
        _host_ioctl(slot, LOOP_CHANGE_FD, ours)
        slot.backing_path, slot.backing_origin = _backing_file(r, ours)
        r.pool.changed(slot, backing_fd=ours)
    finally:
        os.close(ours)
    r.pool.refresh(slot)
    return r.done()


def _passthrough(request: int) -> Op:
    """Requests whose only argument is a number: the kernel's own checks apply on the host device."""

    def op(r: Request) -> Response:
        slot = r.bound
        if request == LOOP_SET_CAPACITY:  # would show bytes beyond the size policy saw
            _refuse_if_mounted(r, slot, "a new capacity")
        _host_ioctl(slot, request, r.arg)
        if request == LOOP_SET_CAPACITY:
            r.pool.changed(slot)
        r.pool.refresh(slot)
        return r.done()

    return op


def _size(request: int) -> Op:
    """The bound device's size, for an fd still on the placeholder (see the module docstring),
    in the caller's ABI: BLKGETSIZE stores an unsigned long, and BLKGETSIZE64 has another
    number for 32-bit callers. A number that is not this ABI's runs natively."""

    def op(r: Request) -> Response:
        layout = layouts(r.call.notif)
        if request not in (BLKGETSIZE, layout.size64_request):
            r.call.audit.update(action="kernel-native")
            return Response.continue_(r.call.notif.id)
        size = device_size(r.bound.host.fd)
        if request != BLKGETSIZE:
            data = struct.pack("<Q", size)
        elif size // 512 > (1 << layout.ulong.size * 8) - 1:
            raise KernelError(errno.EFBIG, f"the device has more sectors than a {layout.name} unsigned long holds")
        else:
            data = layout.ulong.pack(size // 512)
        r.call.target.write_bytes(r.arg, data)
        return r.done()

    return op


SIZE_OPS: Final[dict[int, Op]] = {req: _size(req) for req in (BLKGETSIZE, BLKGETSIZE64, BLKGETSIZE64_32)}
CONTROL_OPS: Final[dict[int, Op]] = {LOOP_CTL_GET_FREE: _get_free, LOOP_CTL_ADD: _add, LOOP_CTL_REMOVE: _remove}
DEVICE_OPS: Final[dict[int, Op]] = {
    LOOP_SET_FD: _set_fd,
    LOOP_CONFIGURE: _configure,
    LOOP_CLR_FD: _clear,
    LOOP_GET_STATUS: _get_status,
    LOOP_GET_STATUS64: _get_status64,
    LOOP_SET_STATUS: _set_status,
    LOOP_SET_STATUS64: _set_status64,
    LOOP_CHANGE_FD: _change_fd,
    LOOP_SET_CAPACITY: _passthrough(LOOP_SET_CAPACITY),
    LOOP_SET_DIRECT_IO: _passthrough(LOOP_SET_DIRECT_IO),
    LOOP_SET_BLOCK_SIZE: _passthrough(LOOP_SET_BLOCK_SIZE),
}
_NAMES: Final = NAMES
