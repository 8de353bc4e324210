"""Translating a mount(2) request into what the supervisor will actually ask of the kernel.

Pure functions: MS_* flags and the data string in, a MountOptions value out, with the
options no container may pass (ones that open other paths with the supervisor's rights, or
that let a corrupt image panic the host) refused by name.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from typing import Final

from . import syscalls as s
from .errors import KernelError

# Per-mount flags: MS_* -> (option name, MOUNT_ATTR_*)
_ATTR_FLAGS: Final = {
    s.MS_RDONLY: ("ro", s.MOUNT_ATTR_RDONLY),
    s.MS_NOSUID: ("nosuid", s.MOUNT_ATTR_NOSUID),
    s.MS_NODEV: ("nodev", s.MOUNT_ATTR_NODEV),
    s.MS_NOEXEC: ("noexec", s.MOUNT_ATTR_NOEXEC),
    s.MS_NOATIME: ("noatime", s.MOUNT_ATTR_NOATIME),
    s.MS_NODIRATIME: ("nodiratime", s.MOUNT_ATTR_NODIRATIME),
    s.MS_STRICTATIME: ("strictatime", s.MOUNT_ATTR_STRICTATIME),
    s.MS_RELATIME: ("relatime", s.MOUNT_ATTR_RELATIME),
    s.MS_NOSYMFOLLOW: ("nosymfollow", s.MOUNT_ATTR_NOSYMFOLLOW),
}
# Superblock flags: MS_* -> fsconfig flag key
_SB_FLAGS: Final = {
    s.MS_SYNCHRONOUS: "sync", s.MS_DIRSYNC: "dirsync", s.MS_LAZYTIME: "lazytime", s.MS_MANDLOCK: "mand"
}  # fmt: skip
_MS_NOUSER: Final = 1 << 31
_ATIME_PRECEDENCE: Final = ("strictatime", "noatime", "relatime")  # as the kernel resolves MS_* combinations
SB_FLAG_NAMES: Final = ("sync", "dirsync", "lazytime", "mand")
_SB_CLEAR: Final = {"async": "sync", "nolazytime": "lazytime", "nomand": "mand"}
# MS_REMOUNT sets or clears exactly these superblock flags (the kernel's MS_RMT_MASK; dirsync
# stays as it was): flag -> the fsconfig key that clears it.
_REMOUNT_SB: Final = {"sync": "async", "lazytime": "nolazytime", "mand": "nomand"}
OPTION_ATTRS: Final = {name: attr for name, attr in _ATTR_FLAGS.values()}
FORCED: Final = ("nosuid", "nodev")

_EXT = {
    "acl",
    "noacl",
    "user_xattr",
    "nouser_xattr",
    "noload",
    "norecovery",
    "barrier",
    "nobarrier",
    "discard",
    "nodiscard",
    "delalloc",
    "nodelalloc",
    "auto_da_alloc",
    "noauto_da_alloc",
    "block_validity",
    "noblock_validity",
    "journal_checksum",
    "nojournal_checksum",
    "i_version",
    "nombcache",
    "init_itable",
    "noinit_itable",
    "grpid",
    "bsdgroups",
    "nogrpid",
    "sysvgroups",
    "dioread_lock",
    "dioread_nolock",
    "oldalloc",
    "orlov",
}
_EXT_VALUED = {
    "errors": {"continue", "remount-ro"},  # errors=panic would let a corrupt image panic the host
    "data": {"journal", "ordered", "writeback"},
    "commit": None,
    "barrier": {"0", "1"},
    "sb": None,
    "stripe": None,
    "inode_readahead_blks": None,
    "max_batch_time": None,
    "min_batch_time": None,
    "journal_ioprio": None,
    "auto_da_alloc": {"0", "1"},
}
# option -> allowed values (None: any number). Anything absent is refused, e.g. ext4's
# journal_path= and erofs' device=, which would open host paths with the supervisor's rights.
SAFE_OPTIONS: Final[dict[str, tuple[set[str], dict[str, set[str] | None]]]] = {
    "ext2": (_EXT, _EXT_VALUED),
    "ext3": (_EXT, _EXT_VALUED),
    "ext4": (_EXT, _EXT_VALUED),
    "squashfs": (set(), {"errors": {"continue"}, "threads": {"single", "multi", "percpu"}}),
    "erofs": (
        {"user_xattr", "nouser_xattr", "acl", "noacl"},
        {"cache_strategy": {"disabled", "readahead", "readaround"}},
    ),
}


@dataclass(frozen=True)
class MountOptions:
    """What a new mount will be: per-mount attributes, superblock flags and fs options."""

    read_only: bool
    attrs: frozenset[str] = field(default_factory=frozenset)  # per-mount option names (nosuid, noexec, ...)
    sb_flags: tuple[str, ...] = ()  # fsconfig flags (sync, dirsync, lazytime)
    fs_options: tuple[str, ...] = ()  # filesystem-specific "key" or "key=value"

    def with_forced(self, extra: tuple[str, ...]) -> MountOptions:
        """Add the always-forced nosuid,nodev and whatever policy forces (ro, noexec, sync, ...)."""
        attrs = _one_atime(set(self.attrs) | set(FORCED) | {o for o in extra if o in OPTION_ATTRS and o != "ro"})
        sb = tuple(dict.fromkeys((*self.sb_flags, *(o for o in extra if o in SB_FLAG_NAMES))))
        return MountOptions(self.read_only or "ro" in extra, frozenset(attrs), sb, self.fs_options)

    @property
    def attr_flags(self) -> int:
        value = 0
        for name in self.attrs:
            value |= OPTION_ATTRS[name]
        return value | (s.MOUNT_ATTR_RDONLY if self.read_only else 0)

    @property
    def remount_sb_flags(self) -> list[str]:
        """fsconfig flags making a reconfiguration do what MS_REMOUNT does to the superblock:
        each flag of the kernel's MS_RMT_MASK set as asked, or cleared, and dirsync untouched."""
        return ["ro" if self.read_only else "rw", *(f if f in self.sb_flags else off for f, off in _REMOUNT_SB.items())]

    def describe(self) -> str:
        """The options as `mount` would print them, for audit records and errors."""
        names = ["ro" if self.read_only else "rw", *sorted(self.attrs - {"ro"}), *self.sb_flags]
        return ",".join(names)


def parse(flags: int, data: str | None) -> MountOptions:
    """Split a mount(2) request into flags and fs options; the data string is untrusted text."""
    flags &= 0xFFFFFFFF  # MS_* is a 32-bit space; the kernel ignores the upper half of the long
    if flags & s.MS_MGC_MSK == s.MS_MGC_VAL:
        flags &= ~s.MS_MGC_MSK
    if flags & _MS_NOUSER:
        raise KernelError(errno.EINVAL, "MS_NOUSER is the kernel's own flag; mount(2) refuses it")
    # Every other bit the kernel's path_mount ignores, or passes to the filesystem, which ignores
    # it: MS_POSIXACL, MS_KERNMOUNT, MS_I_VERSION, bits 26-30 and the unused ones (Linux 6.18).
    read_only = bool(flags & s.MS_RDONLY)
    attrs = {name for bit, (name, _) in _ATTR_FLAGS.items() if flags & bit and name != "ro"}
    sb = [key for bit, key in _SB_FLAGS.items() if flags & bit]
    fs_options: list[str] = []
    for item in (data or "").split(","):
        item = item.strip()
        if not item or item in ("defaults", "loop") or item.startswith("loop="):
            continue
        if item in ("ro", "rw"):
            read_only = item == "ro"
        elif item in OPTION_ATTRS:
            attrs.add(item)
        elif item in SB_FLAG_NAMES:
            sb.append(item)
        elif item in _SB_CLEAR:
            sb = [f for f in sb if f != _SB_CLEAR[item]]
        else:
            fs_options.append(item)
    return MountOptions(read_only, frozenset(_one_atime(attrs)), tuple(dict.fromkeys(sb)), tuple(fs_options))


def _one_atime(attrs: set[str]) -> set[str]:
    """Keep a single atime mode: mount_setattr and fsmount refuse two at once."""
    chosen = next((a for a in _ATIME_PRECEDENCE if a in attrs), None)
    return {a for a in attrs if a not in _ATIME_PRECEDENCE or a == chosen}


def check_fs_options(fstype: str, options: tuple[str, ...]) -> None:
    """Refuse any filesystem option not known to be safe for `fstype`."""
    flags, valued = SAFE_OPTIONS.get(fstype, (set(), {}))
    for opt in options:
        key, eq, value = opt.partition("=")
        if not eq and key in flags:
            continue
        if eq and key in valued:
            allowed = valued[key]
            if allowed is None and value.isascii() and value.isdigit() or allowed is not None and value in allowed:
                continue
        raise KernelError(errno.EPERM, f"mount option '{opt}' is not allowed for {fstype}")
