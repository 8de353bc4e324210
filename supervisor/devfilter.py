"""A cgroup v2 device program (BPF_PROG_TYPE_CGROUP_DEVICE) built from an allow list.

cgroup v2 has no devices.allow file: device access is decided by small BPF programs attached
to the cgroup. The program here is straight-line code: for each allowed (type, major, minor)
compare and return 1 on a match; fall through to 0 (deny). Access bits (read, write, mknod)
are not distinguished, matching the v1 rules' "rwm".
"""

from __future__ import annotations

import ctypes
import platform
import struct
from collections.abc import Iterable
from typing import Final

from .errors import KernelError

_INSN: Final = struct.Struct("<BBhi")
_NR_BPF: Final = {"x86_64": 321, "aarch64": 280}[platform.machine()]
BPF_PROG_LOAD: Final = 5
BPF_PROG_ATTACH: Final = 8
BPF_PROG_TYPE_CGROUP_DEVICE: Final = 15
BPF_CGROUP_DEVICE: Final = 6
BPF_F_ALLOW_MULTI: Final = 1 << 1
BPF_F_REPLACE: Final = 1 << 2
DEV_TYPES: Final = {"b": 1, "c": 2}  # BPF_DEVCG_DEV_BLOCK, BPF_DEVCG_DEV_CHAR

_LDX_W: Final = 0x61  # dst = *(u32 *)(src + off)
_AND_K: Final = 0x57  # dst &= imm (64-bit)
_JNE_K: Final = 0x55  # if dst != imm goto +off
_MOV_K: Final = 0xB7  # dst = imm (64-bit)
_EXIT: Final = 0x95

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

Rule = tuple[str, int, int | None]  # ("c", major, minor or None for any)


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return _INSN.pack(code, (src << 4) | dst, off, imm)


def program(rules: Iterable[Rule]) -> bytes:
    """The instructions allowing exactly `rules`; r2 = type, r4 = major, r5 = minor."""
    code = [
        _insn(_LDX_W, dst=2, src=1, off=0),  # access_type: (access << 16) | type
        _insn(_AND_K, dst=2, imm=0xFFFF),
        _insn(_LDX_W, dst=4, src=1, off=4),  # major
        _insn(_LDX_W, dst=5, src=1, off=8),  # minor
    ]
    for kind, major, minor in rules:
        checks = [(2, DEV_TYPES[kind]), (4, major)] + ([(5, minor)] if minor is not None else [])
        block_len = len(checks) + 2
        for i, (reg, value) in enumerate(checks):
            code.append(_insn(_JNE_K, dst=reg, off=block_len - i - 1, imm=value))
        code += [_insn(_MOV_K, dst=0, imm=1), _insn(_EXIT)]
    code += [_insn(_MOV_K, dst=0, imm=0), _insn(_EXIT)]
    return b"".join(code)


def _bpf(cmd: int, attr: ctypes.Array[ctypes.c_char], what: str) -> int:
    ret = _libc.syscall(ctypes.c_long(_NR_BPF), ctypes.c_long(cmd), attr, ctypes.c_long(len(attr)))
    if ret < 0:
        raise KernelError(ctypes.get_errno(), what)
    return int(ret)


def load(rules: Iterable[Rule]) -> int:
    """Load the device program for `rules`; returns its fd."""
    insns = ctypes.create_string_buffer(program(rules))
    license_ = ctypes.create_string_buffer(b"Apache-2.0")
    attr = ctypes.create_string_buffer(128)
    struct.pack_into(
        "<IIQQ", attr, 0, BPF_PROG_TYPE_CGROUP_DEVICE, len(insns.raw) // 8, ctypes.addressof(insns),
        ctypes.addressof(license_),
    )  # fmt: skip
    struct.pack_into("<16s", attr, 48, b"mountwarden_dev")
    struct.pack_into("<I", attr, 68, BPF_CGROUP_DEVICE)
    return _bpf(BPF_PROG_LOAD, attr, "loading the device cgroup program")


def attach(cgroup_fd: int, prog_fd: int, replace_fd: int | None = None) -> None:
    """Attach to a cgroup, coexisting with programs others (systemd) attached higher up."""
    attr = ctypes.create_string_buffer(128)
    flags = BPF_F_ALLOW_MULTI | (BPF_F_REPLACE if replace_fd is not None else 0)
    struct.pack_into("<IIIII", attr, 0, cgroup_fd, prog_fd, BPF_CGROUP_DEVICE, flags, replace_fd or 0)
    _bpf(BPF_PROG_ATTACH, attr, "attaching the device cgroup program")
