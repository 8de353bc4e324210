"""The loop driver's user ABI (linux/loop.h) and the block ioctls used with it."""

from __future__ import annotations

import struct
from typing import Final

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

LO_FLAGS_READ_ONLY: Final = 1
LO_FLAGS_AUTOCLEAR: Final = 4
LO_FLAGS_PARTSCAN: Final = 8
LO_FLAGS_DIRECT_IO: Final = 16
LO_NAME_SIZE: Final = 64
LOOP_MAJOR: Final = 7

# struct loop_info64: device, inode, rdevice, offset, sizelimit, number, encrypt_type,
# encrypt_key_size, flags, file_name[64], crypt_name[64], encrypt_key[32], init[2]
INFO64: Final = struct.Struct("<5Q4I64s64s32s2Q")
# struct loop_config: fd, block_size, info, reserved[8]
CONFIG: Final = struct.Struct(f"<II{INFO64.size}s8Q")
# struct loop_info, the old ABI (x86-64/arm64 layout: long-sized dev_t fields)
INFO_OLD: Final = struct.Struct("<i4xQQQiiii64s32s2Q4s4x")

NAMES: Final = {value: name for name, value in dict(globals()).items() if name.startswith(("LOOP_", "BLK"))}
