"""mountopts: MS_* flags and data text -> MountOptions, forced options, fs option allow-lists."""

from __future__ import annotations

import errno
from typing import get_args

import pytest
from hypothesis import given
from hypothesis import strategies as st

from supervisor import syscalls as s
from supervisor.errors import KernelError
from supervisor.mountopts import FORCED, OPTION_ATTRS, SAFE_OPTIONS, MountOptions, check_fs_options, parse
from supervisor.policy.schema import OptionName

RO, NOSUID, NODEV, NOEXEC = s.MS_RDONLY, s.MS_NOSUID, s.MS_NODEV, s.MS_NOEXEC


def opts(
    read_only: bool = False, attrs: tuple[str, ...] = (), sb: tuple[str, ...] = (), fs: tuple[str, ...] = ()
) -> MountOptions:
    return MountOptions(read_only, frozenset(attrs), sb, fs)


def refused(fstype: str, *options: str) -> KernelError:
    with pytest.raises(KernelError) as info:
        check_fs_options(fstype, options)
    return info.value


# --- parse: flags ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (0, opts()),
        (RO, opts(read_only=True)),
        (NOSUID, opts(attrs=("nosuid",))),
        (NODEV, opts(attrs=("nodev",))),
        (NOEXEC, opts(attrs=("noexec",))),
        (RO | NOSUID | NODEV | NOEXEC, opts(True, ("nosuid", "nodev", "noexec"))),
        (s.MS_NOATIME, opts(attrs=("noatime",))),
        (s.MS_NODIRATIME, opts(attrs=("nodiratime",))),
        (s.MS_RELATIME, opts(attrs=("relatime",))),
        (s.MS_STRICTATIME, opts(attrs=("strictatime",))),
        (s.MS_NOATIME | s.MS_NODIRATIME, opts(attrs=("noatime", "nodiratime"))),
        (s.MS_SYNCHRONOUS, opts(sb=("sync",))),
        (s.MS_DIRSYNC, opts(sb=("dirsync",))),
        (s.MS_LAZYTIME, opts(sb=("lazytime",))),
        (s.MS_SYNCHRONOUS | s.MS_DIRSYNC | s.MS_LAZYTIME, opts(sb=("sync", "dirsync", "lazytime"))),
        (RO | s.MS_SYNCHRONOUS | NOEXEC, opts(True, ("noexec",), ("sync",))),
        (s.MS_NOSYMFOLLOW, opts(attrs=("nosymfollow",))),  # issue 12: it reaches the mount
        (s.MS_MANDLOCK, opts(sb=("mand",))),  # shown as the kernel shows it, though it does nothing since 5.15
        # Flags that change nothing for a new mount.
        (s.MS_SILENT, opts()),
        (s.MS_REC, opts()),
        (RO | s.MS_SILENT | s.MS_REC, opts(read_only=True)),
        # The old magic number in the top half is stripped, whatever the bottom half says.
        (s.MS_MGC_VAL, opts()),
        (s.MS_MGC_VAL | RO, opts(read_only=True)),
        (s.MS_MGC_VAL | RO | NOSUID | NODEV | NOEXEC, opts(True, ("nosuid", "nodev", "noexec"))),
        (s.MS_MGC_VAL | s.MS_SYNCHRONOUS | s.MS_NOATIME, opts(attrs=("noatime",), sb=("sync",))),
        # Bits above the 32 the kernel reads are not flags.
        ((1 << 32) | RO, opts(read_only=True)),
    ],
)
def test_flags(flags: int, expected: MountOptions) -> None:
    assert parse(flags, None) == expected


def test_magic_value_does_not_leak_relatime() -> None:
    """MS_MGC_VAL contains bit 21 (MS_RELATIME); stripping it must not leave relatime behind."""
    assert s.MS_MGC_VAL & s.MS_RELATIME
    assert "relatime" not in parse(s.MS_MGC_VAL, None).attrs


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (s.MS_MOVE, opts()),
        (RO | 0x200, opts(read_only=True)),
        (s.MS_MGC_VAL | s.MS_MOVE, opts()),
        (RO | NOSUID | s.MS_MOVE, opts(True, ("nosuid",))),
        (1 << 16 | 1 << 22 | 1 << 23 | 1 << 26 | 1 << 30, opts()),  # POSIXACL, KERNMOUNT, I_VERSION, ...
    ],
)
def test_flags_the_kernel_ignores_are_ignored(flags: int, expected: MountOptions) -> None:
    """As path_mount does (issue 12; tests/test_parity_mount.py compares with the kernel)."""
    assert parse(flags, None) == expected


# --- parse: data -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "data", "expected"),
    [
        (0, None, opts()),
        (0, "", opts()),
        (0, ",,, ,", opts()),
        (0, "ro", opts(read_only=True)),
        (RO, "rw", opts()),
        (0, "ro,rw", opts()),
        (0, "rw,ro", opts(read_only=True)),
        (RO, "ro", opts(read_only=True)),
        (0, " ro ", opts(read_only=True)),
        (0, "loop", opts()),
        (0, "loop=/dev/loop7", opts()),
        (0, "defaults", opts()),
        (0, "async", opts()),
        (0, "nolazytime", opts()),
        (0, "defaults,loop,ro,loop=/dev/x", opts(read_only=True)),
        (0, "nosuid,nodev,noexec", opts(attrs=("nosuid", "nodev", "noexec"))),
        (0, "noatime,nodiratime", opts(attrs=("noatime", "nodiratime"))),
        (NOEXEC, "noexec", opts(attrs=("noexec",))),
        (0, "sync,dirsync,lazytime", opts(sb=("sync", "dirsync", "lazytime"))),
        (s.MS_SYNCHRONOUS, "sync", opts(sb=("sync",))),
        (s.MS_SYNCHRONOUS, "dirsync,sync", opts(sb=("sync", "dirsync"))),
        (0, "commit=5", opts(fs=("commit=5",))),
        (0, "errors=remount-ro,data=ordered", opts(fs=("errors=remount-ro", "data=ordered"))),
        (0, "journal_path=/dev/sda", opts(fs=("journal_path=/dev/sda",))),
        (RO, "ro,acl,loop,noexec,commit=5", opts(True, ("noexec",), fs=("acl", "commit=5"))),
        (s.MS_MGC_VAL, "ro,user_xattr", opts(True, fs=("user_xattr",))),
    ],
)
def test_data(flags: int, data: str | None, expected: MountOptions) -> None:
    assert parse(flags, data) == expected


def test_fs_options_keep_their_order_and_text() -> None:
    """They go to fsconfig one by one; order can matter to a filesystem, so it is kept."""
    assert parse(0, "b=2,a,c=x=y").fs_options == ("b=2", "a", "c=x=y")


# --- with_forced, attr_flags, describe ---------------------------------------------------------


@pytest.mark.parametrize(
    ("base", "extra", "expected"),
    [
        (opts(), (), opts(attrs=FORCED)),
        (opts(True), (), opts(True, FORCED)),
        (opts(attrs=("nosuid",)), (), opts(attrs=FORCED)),
        (opts(), ("noexec",), opts(attrs=(*FORCED, "noexec"))),
        (opts(), ("noatime", "nodiratime"), opts(attrs=(*FORCED, "noatime", "nodiratime"))),
        (opts(attrs=("noexec",)), ("nosuid", "nodev"), opts(attrs=(*FORCED, "noexec"))),
        (opts(sb=("sync",), fs=("commit=5",)), (), opts(attrs=FORCED, sb=("sync",), fs=("commit=5",))),
    ],
)
def test_with_forced(base: MountOptions, extra: tuple[str, ...], expected: MountOptions) -> None:
    assert base.with_forced(extra) == expected


def test_forced_ro_makes_a_read_write_request_read_only() -> None:
    forced = opts().with_forced(("ro",))
    assert forced.read_only
    assert forced.attr_flags & s.MOUNT_ATTR_RDONLY
    assert forced.describe() == "ro,nodev,nosuid"


def test_with_forced_ignores_names_that_are_not_options() -> None:
    assert opts().with_forced(("bogus", "commit=5")) == opts(attrs=FORCED)


@pytest.mark.parametrize(
    ("options", "value"),
    [
        (opts(), 0),
        (opts(True), s.MOUNT_ATTR_RDONLY),
        (opts(attrs=("nosuid", "nodev")), s.MOUNT_ATTR_NOSUID | s.MOUNT_ATTR_NODEV),
        (opts(True, ("noexec",)), s.MOUNT_ATTR_RDONLY | s.MOUNT_ATTR_NOEXEC),
        (opts(attrs=("noatime",)), s.MOUNT_ATTR_NOATIME),
        (opts(attrs=("strictatime",)), s.MOUNT_ATTR_STRICTATIME),
        (opts(attrs=("relatime",)), s.MOUNT_ATTR_RELATIME),
        (opts(attrs=("nodiratime", "noatime")), s.MOUNT_ATTR_NODIRATIME | s.MOUNT_ATTR_NOATIME),
        (opts(sb=("sync",), fs=("commit=5",)), 0),  # superblock and fs options are not mount attrs
        (
            opts().with_forced(("ro", "noexec")),
            s.MOUNT_ATTR_RDONLY | s.MOUNT_ATTR_NOSUID | s.MOUNT_ATTR_NODEV | s.MOUNT_ATTR_NOEXEC,
        ),
    ],
)
def test_attr_flags(options: MountOptions, value: int) -> None:
    assert options.attr_flags == value


@pytest.mark.parametrize(
    ("options", "text"),
    [
        (opts(), "rw"),
        (opts(True), "ro"),
        (opts(attrs=("nosuid", "nodev", "noexec")), "rw,nodev,noexec,nosuid"),
        (opts(True, ("noatime",), ("sync", "dirsync")), "ro,noatime,sync,dirsync"),
        (opts(fs=("commit=5",)), "rw"),
        (parse(s.MS_MGC_VAL | RO | NOEXEC, "loop,lazytime").with_forced(()), "ro,nodev,noexec,nosuid,lazytime"),
    ],
)
def test_describe(options: MountOptions, text: str) -> None:
    assert options.describe() == text


# --- check_fs_options ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fstype", "options"),
    [
        ("ext4", ()),
        ("ext4", ("acl", "noacl", "user_xattr", "noload", "norecovery", "nobarrier", "discard")),
        ("ext4", ("errors=continue", "errors=remount-ro")),
        ("ext4", ("data=journal", "data=ordered", "data=writeback")),
        ("ext4", ("commit=0", "commit=5", "commit=300")),
        ("ext4", ("barrier", "barrier=0", "barrier=1", "auto_da_alloc", "auto_da_alloc=0")),
        ("ext4", ("sb=8193", "stripe=16", "inode_readahead_blks=32", "max_batch_time=15000")),
        ("ext3", ("data=journal", "errors=remount-ro")),
        ("ext2", ("acl", "errors=continue")),
        ("squashfs", ()),
        ("squashfs", ("errors=continue",)),
        ("squashfs", ("threads=single", "threads=multi", "threads=percpu")),
        ("erofs", ("user_xattr", "nouser_xattr", "acl", "noacl")),
        ("erofs", ("cache_strategy=disabled", "cache_strategy=readahead", "cache_strategy=readaround")),
        ("xfs", ()),  # an unknown fstype with no options at all is fine
    ],
)
def test_safe_options_pass(fstype: str, options: tuple[str, ...]) -> None:
    check_fs_options(fstype, options)


@pytest.mark.parametrize(
    ("fstype", "option"),
    [
        ("ext4", "journal_path=/dev/sda"),  # opens a host path with the supervisor's rights
        ("ext4", "journal_dev=2049"),
        ("ext4", "errors=panic"),  # a corrupt image could panic the host
        ("ext4", "commit=abc"),
        ("ext4", "commit="),
        ("ext4", "commit=-1"),
        ("ext4", "commit=0x10"),
        ("ext4", "data=bogus"),
        ("ext4", "barrier=2"),
        ("ext4", "acl=1"),  # a flag is not a key
        ("ext4", "data"),  # and a key is not a flag
        ("ext4", "usrjquota=/etc/shadow"),
        ("ext4", "ERRORS=continue"),
        ("ext4", "dax"),
        ("ext3", "errors=panic"),
        ("ext2", "journal_path=/x"),
        ("squashfs", "errors=panic"),
        ("squashfs", "threads=4"),
        ("squashfs", "acl"),
        ("erofs", "device=/dev/sda"),  # another host path
        ("erofs", "fsid=x"),
        ("erofs", "domain_id=x"),
        ("erofs", "cache_strategy=bogus"),
        ("xfs", "nouuid"),  # unknown fstype: every option is unknown
        ("btrfs", "subvol=/"),
        ("vfat", "uid=0"),
    ],
)
def test_unsafe_options_are_eperm(fstype: str, option: str) -> None:
    error = refused(fstype, option)
    assert error.errno == errno.EPERM
    assert option in str(error) and fstype in str(error)


def test_one_bad_option_among_good_ones_is_refused() -> None:
    error = refused("ext4", "acl", "commit=5", "journal_path=/dev/sda", "noload")
    assert "journal_path" in str(error)


def test_allow_lists_name_no_path_options() -> None:
    """Options that take a host path or device must never be on an allow-list."""
    for flags, valued in SAFE_OPTIONS.values():
        assert not {"journal_path", "journal_dev", "device", "usrjquota", "grpjquota"} & (flags | set(valued))
        assert "panic" not in (valued.get("errors") or set())


# --- properties ------------------------------------------------------------------------------

_OPTION_TEXT = st.sampled_from(
    ["ro", "rw", "nosuid", "noexec", "noatime", "sync", "loop", "loop=/dev/x", "defaults", "acl", "commit=5", ""]
)
_DATA = st.one_of(st.none(), st.text(max_size=200), st.lists(_OPTION_TEXT | st.text(max_size=12)).map(",".join))
_FLAGS = st.integers(min_value=0, max_value=(1 << 64) - 1) | st.sampled_from(
    [s.MS_MGC_VAL | RO, s.MS_MGC_VAL | s.MS_SYNCHRONOUS, RO | NOSUID | NODEV | NOEXEC | s.MS_SILENT]
)


@given(flags=_FLAGS, data=_DATA, extra=st.lists(st.sampled_from([*OPTION_ATTRS, "sync", "bogus"]), max_size=4))
def test_parse_fails_only_with_kernel_errors(flags: int, data: str | None, extra: list[str]) -> None:
    """Untrusted flags and text either parse or give EINVAL; forced options always hold."""
    try:
        parsed = parse(flags, data)
    except KernelError as exc:
        assert exc.errno == errno.EINVAL
        return
    forced = parsed.with_forced(tuple(extra))
    assert forced.attrs >= set(FORCED)
    assert forced.attr_flags & s.MOUNT_ATTR_NOSUID and forced.attr_flags & s.MOUNT_ATTR_NODEV
    assert forced.read_only == (parsed.read_only or "ro" in extra)
    atime = {"noatime", "strictatime", "relatime"}
    assert set(extra) & set(OPTION_ATTRS) - atime <= forced.attrs | {"ro"}
    assert len(forced.attrs & atime) <= 1
    assert forced.fs_options == parsed.fs_options
    assert set(forced.sb_flags) == set(parsed.sb_flags) | ({"sync"} & set(extra))
    assert all(o and "," not in o and o == o.strip() for o in parsed.fs_options)
    assert forced.describe().split(",")[0] == ("ro" if forced.read_only else "rw")


@given(fstype=st.sampled_from([*SAFE_OPTIONS, "xfs", ""]), options=st.lists(st.text(max_size=30), max_size=5))
def test_check_fs_options_raises_only_eperm(fstype: str, options: list[str]) -> None:
    try:
        check_fs_options(fstype, tuple(options))
    except KernelError as exc:
        assert exc.errno == errno.EPERM


@given(value=st.text(max_size=10))
def test_numeric_options_need_digits(value: str) -> None:
    """commit= takes a number; anything else must not reach the filesystem."""
    try:
        check_fs_options("ext4", (f"commit={value}",))
    except KernelError:
        assert not (value.isascii() and value.isdigit())
    else:
        assert value.isascii() and value.isdigit()


# --- cases the kernel's own mount(2) decides this way ---------------------------------------


@pytest.mark.parametrize("flags", [s.MS_REMOUNT | RO, s.MS_REMOUNT | s.MS_BIND | RO, s.MS_REMOUNT])
def test_remount_flags_parse(flags: int) -> None:
    assert parse(flags, None).read_only == bool(flags & RO)


def test_ms_nouser_is_einval() -> None:
    with pytest.raises(KernelError) as info:
        parse(1 << 31, None)
    assert info.value.errno == errno.EINVAL


@pytest.mark.parametrize("name", get_args(OptionName))
def test_every_policy_option_is_forced(name: str) -> None:
    """Whatever a policy may write under options: must end up in the mount."""
    forced = opts().with_forced((name,))
    assert name in forced.attrs or name in forced.sb_flags or (name == "ro" and forced.read_only)


def test_conflicting_atime_flags_give_one_atime_mode() -> None:
    value = parse(s.MS_NOATIME | s.MS_STRICTATIME, None).attr_flags & s.MOUNT_ATTR__ATIME
    assert value in (s.MOUNT_ATTR_RELATIME, s.MOUNT_ATTR_NOATIME, s.MOUNT_ATTR_STRICTATIME)


@pytest.mark.parametrize(("flags", "data"), [(s.MS_SYNCHRONOUS, "async"), (s.MS_LAZYTIME, "nolazytime")])
def test_data_clears_superblock_flags(flags: int, data: str) -> None:
    assert parse(flags, data).sb_flags == ()


@pytest.mark.parametrize("value", ["²", "٣", "５"])
def test_non_ascii_digits_are_refused(value: str) -> None:
    assert refused("ext4", f"commit={value}").errno == errno.EPERM


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (0, ["rw", "async", "nolazytime", "nomand"]),
        (RO | s.MS_SYNCHRONOUS | s.MS_DIRSYNC, ["ro", "sync", "nolazytime", "nomand"]),  # dirsync stays as it is
        (s.MS_LAZYTIME | s.MS_MANDLOCK, ["rw", "async", "lazytime", "mand"]),
    ],
)
def test_a_remount_sets_or_clears_each_flag_ms_remount_covers(flags: int, expected: list[str]) -> None:
    assert parse(flags | s.MS_REMOUNT, None).remount_sb_flags == expected
