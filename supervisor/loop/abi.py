"""The loop driver's user ABI (linux/loop.h) and the block ioctls used with it."""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass
from typing import Final, NamedTuple

from ..errors import KernelError

LOOP_SET_FD: Final = 0x4C00
LOOP_CLR_FD: Final = 0x4C01
LOOP_SET_STATUS: Final = 0x4C02
LOOP_GET_STATUS: Final = 0x4C03
LOOP_SET_STATUS64: Final = 0x4C04
LOOP_GET_STATUS64: Final = 0x4C05
LOOP_CHANGE_FD: Final = 0x4C06
LOOP_SET_CAPACITY: Final = 0x4C07
LOOP_SET_DIRECT_IO: Final = 0x4C08
LOOP_SET_BLOCK_SIZE: Final = 0x4C09
LOOP_CONFIGURE: Final = 0x4C0A
LOOP_CTL_ADD: Final = 0x4C80
LOOP_CTL_REMOVE: Final = 0x4C81
LOOP_CTL_GET_FREE: Final = 0x4C82
BLKGETSIZE: Final = 0x1260
BLKSSZGET: Final = 0x1268
BLKGETSIZE64: Final = 0x80081272
# _IOR(0x12, 114, size_t) with a 4-byte size_t: what 32-bit callers send; the kernel still stores a u64
BLKGETSIZE64_32: Final = 0x80041272
# The capability-gated requests of block/ioctl.c served on pool devices (handlers/block_ioctl.py)
BLKROSET: Final = 0x125D
BLKROGET: Final = 0x125E
BLKRRPART: Final = 0x125F
BLKFLSBUF: Final = 0x1261
BLKRASET: Final = 0x1262
BLKFRASET: Final = 0x1264
BLKBSZGET: Final = 0x80081270
BLKBSZSET: Final = 0x40081271
BLKBSZSET_32: Final = 0x40041271  # _IOW(0x12, 113, size_t) with a 4-byte size_t; the argument is an int on both

LO_FLAGS_READ_ONLY: Final = 1
LO_FLAGS_AUTOCLEAR: Final = 4
LO_FLAGS_PARTSCAN: Final = 8
LO_FLAGS_DIRECT_IO: Final = 16
LO_NAME_SIZE: Final = 64
LOOP_MAJOR: Final = 7

# struct loop_info64: device, inode, rdevice, offset, sizelimit, number, encrypt_type,
# encrypt_key_size, flags, file_name[64], crypt_name[64], encrypt_key[32], init[2]
INFO64: Final = struct.Struct("<5Q4I64s64s32s2Q")


class LoopInfo(NamedTuple):
    """struct loop_info64, field by field."""

    device: int = 0
    inode: int = 0
    rdevice: int = 0
    offset: int = 0
    sizelimit: int = 0
    number: int = 0
    encrypt_type: int = 0
    encrypt_key_size: int = 0
    flags: int = 0
    file_name: bytes = b""
    crypt_name: bytes = b""
    encrypt_key: bytes = b""
    init0: int = 0
    init1: int = 0

    @classmethod
    def unpack(cls, raw: bytes | bytearray, offset: int = 0) -> LoopInfo:
        return cls._make(INFO64.unpack_from(raw, offset))

    def pack(self) -> bytes:
        return INFO64.pack(*self)

    @property
    def name(self) -> str:
        return self.file_name.split(b"\0")[0].decode(errors="replace")


# struct loop_config: fd, block_size, info, reserved[8]
CONFIG: Final = struct.Struct(f"<II{INFO64.size}s8Q")
_U64: Final = 2**64 - 1


@dataclass(frozen=True)
class Layouts:
    """The structs whose layout depends on the caller's ABI: a 32-bit caller (i386, x32, arm)
    gets the kernel's compat layouts, narrower than the 64-bit ones, so a 64-bit answer would
    overrun its buffer. loop_info64 and loop_config are the same on every ABI.

    `info_old` is struct loop_info: number, device, inode, rdevice, offset, encrypt_type,
    encrypt_key_size, flags, name[64], encrypt_key[32], init[2], reserved[4]. Its ints are read
    unsigned, as the kernel stores them in loop_info64's u32 fields; only lo_offset is signed:
    the kernel sign-extends it.
    """

    name: str
    info_old: struct.Struct
    ulong: struct.Struct  # BLKGETSIZE's unsigned long
    size64_request: int  # the number BLKGETSIZE64 has on this ABI

    def pack_old(self, info: LoopInfo) -> bytes:
        """The kernel answers EOVERFLOW when a field does not fit the old struct (loop_info64_to_old)."""
        offset = info.offset - 2**64 if info.offset >= 2**63 else info.offset
        try:
            return self.info_old.pack(
                info.number, info.device, info.inode, info.rdevice, offset, info.encrypt_type,
                info.encrypt_key_size, info.flags, info.file_name, info.encrypt_key, info.init0, info.init1, b"",
            )  # fmt: skip
        except struct.error:
            raise KernelError(errno.EOVERFLOW, f"the status does not fit a {self.name} struct loop_info") from None

    def unpack_old(self, raw: bytes, sizelimit: int) -> LoopInfo:
        """The old struct has no sizelimit: the caller passes the one that stays."""
        number, device, inode, rdevice, offset, etype, ekeysize, flags, name, key, init0, init1, _ = (
            self.info_old.unpack(raw)
        )
        return LoopInfo(
            device, inode, rdevice, offset & _U64, sizelimit, number, etype, ekeysize, flags, name, b"", key,
            init0, init1,
        )  # fmt: skip


# x86-64, aarch64: __kernel_old_dev_t and unsigned long are 8 bytes
NATIVE64: Final = Layouts("64-bit", struct.Struct("<I4xQQQiIII64s32s2Q4s4x"), struct.Struct("<Q"), BLKGETSIZE64)
# struct compat_loop_info: compat_dev_t is 16 bits, compat_ulong_t 32, 4-byte alignment
COMPAT32: Final = Layouts("32-bit", struct.Struct("<IH2xIH2xiIII64s32s2I4s"), struct.Struct("<I"), BLKGETSIZE64_32)


NAMES: Final = {value: name for name, value in dict(globals()).items() if name.startswith(("LOOP_", "BLK"))}
