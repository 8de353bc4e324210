"""A cgroup v2 device program (BPF_PROG_TYPE_CGROUP_DEVICE): fixed rules plus a map of grants.

cgroup v2 has no devices.allow file: device access is decided by small BPF programs attached
to the cgroup. The program here first compares against the fixed allow list (the usual
character devices) in straight-line code, then looks the exact device up in a hash map, so
granting or revoking one loop device is a map update (microseconds) rather than loading and
swapping a new program on every bind. Access bits (read, write, mknod) are not distinguished,
matching the v1 rules' "rwm".
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct
from collections.abc import Iterable
from typing import Final

from .errors import KernelError

_INSN: Final = struct.Struct("<BBhi")
_NR_BPF: Final = {"x86_64": 321, "aarch64": 280}[platform.machine()]
BPF_MAP_CREATE: Final = 0
BPF_MAP_UPDATE_ELEM: Final = 2
BPF_MAP_DELETE_ELEM: Final = 3
BPF_PROG_LOAD: Final = 5
BPF_PROG_ATTACH: Final = 8
BPF_MAP_TYPE_HASH: Final = 1
BPF_PROG_TYPE_CGROUP_DEVICE: Final = 15
BPF_CGROUP_DEVICE: Final = 6
BPF_F_ALLOW_MULTI: Final = 1 << 1
BPF_PSEUDO_MAP_FD: Final = 1
BPF_FUNC_MAP_LOOKUP_ELEM: Final = 1
DEV_TYPES: Final = {"b": 1, "c": 2}  # BPF_DEVCG_DEV_BLOCK, BPF_DEVCG_DEV_CHAR
MAX_GRANTS: Final = 4096

_LDX_W: Final = 0x61  # dst = *(u32 *)(src + off)
_STX_DW: Final = 0x7B  # *(u64 *)(dst + off) = src
_LD_IMM64: Final = 0x18  # dst = imm64 (two instructions); src=1: a map fd
_AND_K: Final = 0x57  # dst &= imm (64-bit)
_ADD_K: Final = 0x07  # dst += imm
_LSH_K: Final = 0x67  # dst <<= imm
_OR_X: Final = 0x4F  # dst |= src
_MOV_X: Final = 0xBF  # dst = src
_MOV_K: Final = 0xB7  # dst = imm (64-bit)
_JNE_K: Final = 0x55  # if dst != imm goto +off
_JEQ_K: Final = 0x15  # if dst == imm goto +off
_CALL: Final = 0x85
_EXIT: Final = 0x95

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

Rule = tuple[str, int, int | None]  # ("c", major, minor or None for any)


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return _INSN.pack(code, (src << 4) | dst, off, imm)


def key(kind: str, major: int, minor: int) -> int:
    """The map key for one device: type, major and minor packed as the program packs them."""
    return DEV_TYPES[kind] << 40 | major << 20 | minor


def program(rules: Iterable[Rule], map_fd: int) -> bytes:
    """Allow `rules`, then any device present in the map `map_fd`; deny the rest.

    Registers: r2 = type, r4 = major, r5 = minor (from struct bpf_cgroup_dev_ctx in r1).
    """
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
    code += [
        _insn(_LSH_K, dst=2, imm=40),  # key = type << 40 | major << 20 | minor
        _insn(_LSH_K, dst=4, imm=20),
        _insn(_OR_X, dst=2, src=4),
        _insn(_OR_X, dst=2, src=5),
        _insn(_STX_DW, dst=10, src=2, off=-8),
        _insn(_MOV_X, dst=2, src=10),
        _insn(_ADD_K, dst=2, imm=-8),
        _insn(_LD_IMM64, dst=1, src=BPF_PSEUDO_MAP_FD, imm=map_fd),
        _insn(0),
        _insn(_CALL, imm=BPF_FUNC_MAP_LOOKUP_ELEM),
        _insn(_JEQ_K, dst=0, off=2, imm=0),
        _insn(_MOV_K, dst=0, imm=1),
        _insn(_EXIT),
        _insn(_MOV_K, dst=0, imm=0),
        _insn(_EXIT),
    ]
    return b"".join(code)


def _bpf(cmd: int, attr: ctypes.Array[ctypes.c_char], what: str) -> int:
    ret = _libc.syscall(ctypes.c_long(_NR_BPF), ctypes.c_long(cmd), attr, ctypes.c_long(len(attr)))
    if ret < 0:
        raise KernelError(ctypes.get_errno(), what)
    return int(ret)


class DeviceFilter:
    """The map of granted devices and the program that consults it, attached to one cgroup."""

    def __init__(self, rules: Iterable[Rule]) -> None:
        attr = ctypes.create_string_buffer(128)
        struct.pack_into("<IIII", attr, 0, BPF_MAP_TYPE_HASH, 8, 4, MAX_GRANTS)
        self.map_fd = _bpf(BPF_MAP_CREATE, attr, "creating the device grant map")
        try:
            self.prog_fd = self._load(program(rules, self.map_fd))
        except BaseException:
            os.close(self.map_fd)
            raise

    @staticmethod
    def _load(code: bytes) -> int:
        insns = ctypes.create_string_buffer(code)
        license_ = ctypes.create_string_buffer(b"Apache-2.0")
        attr = ctypes.create_string_buffer(128)
        struct.pack_into(
            "<IIQQ", attr, 0, BPF_PROG_TYPE_CGROUP_DEVICE, len(code) // 8, ctypes.addressof(insns),
            ctypes.addressof(license_),
        )  # fmt: skip
        struct.pack_into("<16s", attr, 48, b"mountwarden_dev")
        struct.pack_into("<I", attr, 68, BPF_CGROUP_DEVICE)
        return _bpf(BPF_PROG_LOAD, attr, "loading the device cgroup program")

    def attach(self, cgroup_fd: int) -> None:
        """Attach to a cgroup, coexisting with programs others (systemd) attached higher up."""
        attr = ctypes.create_string_buffer(128)
        struct.pack_into("<IIII", attr, 0, cgroup_fd, self.prog_fd, BPF_CGROUP_DEVICE, BPF_F_ALLOW_MULTI)
        _bpf(BPF_PROG_ATTACH, attr, "attaching the device cgroup program")

    def grant(self, kind: str, major: int, minor: int) -> None:
        self._elem(BPF_MAP_UPDATE_ELEM, key(kind, major, minor), "granting a device")

    def revoke(self, kind: str, major: int, minor: int) -> None:
        self._elem(BPF_MAP_DELETE_ELEM, key(kind, major, minor), "revoking a device")

    def _elem(self, cmd: int, k: int, what: str) -> None:
        key_buf = ctypes.create_string_buffer(struct.pack("<Q", k))
        value = ctypes.create_string_buffer(struct.pack("<I", 1))
        attr = ctypes.create_string_buffer(128)
        value_ptr = ctypes.addressof(value) if cmd == BPF_MAP_UPDATE_ELEM else 0  # delete wants it zero
        struct.pack_into("<IIQQQ", attr, 0, self.map_fd, 0, ctypes.addressof(key_buf), value_ptr, 0)
        try:
            _bpf(cmd, attr, what)
        except KernelError as exc:
            if not (cmd == BPF_MAP_DELETE_ELEM and exc.errno == 2):  # revoking what is not granted
                raise

    def close(self) -> None:
        for fd in (self.prog_fd, self.map_fd):
            if fd >= 0:
                os.close(fd)
        self.prog_fd = self.map_fd = -1
