"""The seccomp user-notification ABI (seccomp_unotify(2)), spoken directly with ioctls.

pyseccomp's notify helpers work only on the listener of the process that loaded the filter,
and lack ID_VALID and ADDFD, so the supervisor, which holds a listener received over a socket,
speaks the ABI itself. The layouts are checked once against SECCOMP_GET_NOTIF_SIZES.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import struct
from dataclasses import dataclass
from typing import Final

from ..errors import KernelError
from ..syscalls import seccomp

# struct seccomp_notif { u64 id; u32 pid; u32 flags; struct seccomp_data { s32 nr; u32 arch; u64 ip; u64 args[6]; } }
NOTIF: Final = struct.Struct("<QIIiIQ6Q")
# struct seccomp_notif_resp { u64 id; s64 val; s32 error; u32 flags; }
RESP: Final = struct.Struct("<QqiI")
# struct seccomp_notif_addfd { u64 id; u32 flags; u32 srcfd; u32 newfd; u32 newfd_flags; }
ADDFD: Final = struct.Struct("<QIIII")
SECCOMP_DATA_SIZE: Final = 64

SECCOMP_GET_NOTIF_SIZES: Final = 3
IOCTL_NOTIF_RECV: Final = 0xC0502100
IOCTL_NOTIF_SEND: Final = 0xC0182101
IOCTL_NOTIF_ID_VALID: Final = 0x40082102
IOCTL_NOTIF_ADDFD: Final = 0x40182103
IOCTL_NOTIF_SET_FLAGS: Final = 0x40082104
USER_NOTIF_FLAG_CONTINUE: Final = 1
USER_NOTIF_FD_SYNC_WAKE_UP: Final = 1


@dataclass(frozen=True)
class Notification:
    """One intercepted system call, exactly as the kernel reported it."""

    id: int
    pid: int
    nr: int
    arch: int
    args: tuple[int, int, int, int, int, int]


@dataclass(frozen=True)
class Response:
    """The answer to one notification; the kernel's struct is built only in `pack`."""

    id: int
    val: int = 0
    error: int = 0
    flags: int = 0

    @classmethod
    def continue_(cls, notif_id: int) -> Response:
        """Let the kernel run the call itself (only where the kernel re-checks everything)."""
        return cls(notif_id, flags=USER_NOTIF_FLAG_CONTINUE)

    @classmethod
    def errno(cls, notif_id: int, err: int) -> Response:
        return cls(notif_id, error=-abs(err))

    @classmethod
    def success(cls, notif_id: int, val: int = 0) -> Response:
        return cls(notif_id, val=val)

    def pack(self) -> bytes:
        return RESP.pack(self.id, self.val, self.error, self.flags)


def check_sizes() -> None:
    """Refuse to run if this kernel's structs differ from the layouts above."""
    sizes = (ctypes.c_uint16 * 3)()
    seccomp(SECCOMP_GET_NOTIF_SIZES, 0, ctypes.c_void_p(ctypes.addressof(sizes)))
    want = (NOTIF.size, RESP.size, SECCOMP_DATA_SIZE)
    if tuple(sizes) != want:
        raise KernelError(errno.ENOTSUP, f"seccomp notification sizes {tuple(sizes)} differ from {want}")


def receive(listener: int) -> Notification | None:
    """Take one pending notification; None if its task died before we got it."""
    buf = bytearray(NOTIF.size)  # the kernel insists on a zeroed buffer
    try:
        fcntl.ioctl(listener, IOCTL_NOTIF_RECV, buf, True)
    except InterruptedError:
        return None
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise
    return decode(buf)


def decode(raw: bytes | bytearray) -> Notification:
    """struct seccomp_notif as the kernel filled it; only the fields the supervisor uses."""
    nid, pid, _flags, nr, arch, _ip, *args = NOTIF.unpack(raw)
    return Notification(nid, pid, nr, arch, (args[0], args[1], args[2], args[3], args[4], args[5]))


def id_valid(listener: int, notif_id: int) -> bool:
    """Whether the notification still stands: its task alive and still blocked in that call."""
    try:
        fcntl.ioctl(listener, IOCTL_NOTIF_ID_VALID, struct.pack("<Q", notif_id))
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise
    return True


def send(listener: int, response: Response) -> bool:
    """Answer a notification; False if the task is gone (killed meanwhile) and nobody is waiting."""
    try:
        fcntl.ioctl(listener, IOCTL_NOTIF_SEND, response.pack())
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise
    return True


def set_sync_wakeup(listener: int) -> bool:
    """Ask the kernel to wake the supervisor on the same CPU (5.19+); halves the round trip."""
    try:
        fcntl.ioctl(listener, IOCTL_NOTIF_SET_FLAGS, struct.pack("<Q", USER_NOTIF_FD_SYNC_WAKE_UP))
    except OSError:
        return False
    return True
