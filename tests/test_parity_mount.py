"""Kernel parity of mount(2) and umount2(2) (issue 12), differentially: each case runs the same
calls natively as root in a private mount namespace and in a `mountwarden run` container
(tests/parity.py) and asserts the same errnos, mountinfo options and statvfs flags.

Flag reports leave out what every image mount has on purpose (nosuid, nodev, idmapped); a test
whose name says `deliberately` leaves out more, and the README lists it.
"""

from __future__ import annotations

import os
import shlex
import stat
from pathlib import Path

import pytest
from conftest import allow_policy
from parity import DEV, assert_same, both, script

from supervisor import syscalls as s

EXT4 = "ext4"


@pytest.fixture
def rw_image(workdir: Path, images: dict[str, Path]) -> Path:
    """A copy of the ext4 image the container's root may open read-write (made again by `_fresh`)."""
    image = workdir / "img" / "parity-rw.ext4"
    _fresh(image, images["ext4"])
    return image


def _fresh(image: Path, original: Path) -> None:
    image.write_bytes(original.read_bytes())
    image.chmod(0o666)


@pytest.fixture
def at(workdir: Path) -> Path:
    """A mount point `mnt` the container's root may use, and beside it a plain directory `dir`, a
    file `file`, a symlink `link` to mnt and a symlink `loop` to itself."""
    path = workdir / "parity"
    for d in (path / "mnt", path / "dir"):
        d.mkdir(parents=True, exist_ok=True)
    (path / "file").touch()
    if not (path / "nodriver").exists():  # a block device of a major no driver has (240: local use)
        os.mknod(path / "nodriver", stat.S_IFBLK | 0o666, os.makedev(240, 0))
    for name, to in (("link", "mnt"), ("loop", "loop")):
        if not (path / name).is_symlink():
            (path / name).symlink_to(to)
    return path


def _same(tmp_path: Path, mountcall: Path, image: Path, *commands: list[str], ro: bool = True) -> list[str]:
    """The commands on a loop device of `image`, compared; a read-write image is fresh for each side."""
    text = script(mountcall, commands, image, ro=ro)
    original = image.parent / "data.ext4"
    reset = (lambda: None) if ro else (lambda: _fresh(image, original))
    return assert_same(tmp_path, text, allow_policy(tmp_path), reset=reset)


def _hex(flags: int) -> str:
    return f"{flags:#x}"


# --- mount(2): the errnos of the list ----------------------------------------------------


def test_a_plain_read_only_mount_shows_the_same_options(
    tmp_path: Path, mountcall: Path, images: dict[str, Path], at: Path
) -> None:
    mnt = str(at / "mnt")
    out = _same(tmp_path, mountcall, images["ext4"], ["mount", DEV, mnt, EXT4, "ro"], ["flags", mnt])
    assert out[0] == "OK" and out[1].startswith("OK mnt=ro"), out


def test_an_unknown_filesystem_type_is_enodev(
    tmp_path: Path, mountcall: Path, images: dict[str, Path], at: Path
) -> None:
    out = _same(tmp_path, mountcall, images["ext4"], ["mount", DEV, str(at / "mnt"), "error", "ro"])
    assert out == ["ENODEV"]


def test_a_null_filesystem_type_is_einval_without_probing(
    tmp_path: Path, mountcall: Path, images: dict[str, Path], at: Path
) -> None:
    out = _same(tmp_path, mountcall, images["ext4"], ["mount", DEV, str(at / "mnt"), "-", "ro"])
    assert out == ["EINVAL"]


@pytest.mark.parametrize("which", ["type", "src"])
def test_a_pointer_into_a_prot_none_page_is_efault(
    tmp_path: Path, mountcall: Path, images: dict[str, Path], at: Path, which: str
) -> None:
    out = _same(tmp_path, mountcall, images["ext4"], ["mount-on", which, "none", DEV, str(at / "mnt"), EXT4, "ro"])
    assert out == ["EFAULT"]


def test_the_same_device_again_on_its_own_mount_point_is_ebusy(
    tmp_path: Path, mountcall: Path, images: dict[str, Path], at: Path
) -> None:
    mnt = str(at / "mnt")
    out = _same(tmp_path, mountcall, images["ext4"], ["mount", DEV, mnt, EXT4, "ro"], ["mount", DEV, mnt, EXT4, "ro"])
    assert out == ["OK", "EBUSY"]


def test_a_remount_of_a_directory_that_is_no_mount_point_is_einval(
    tmp_path: Path, mountcall: Path, images: dict[str, Path], at: Path
) -> None:
    mnt, plain = str(at / "mnt"), str(at / "dir")
    out = _same(
        tmp_path, mountcall, images["ext4"],
        ["mount", DEV, mnt, EXT4, "ro"], ["mount", "-", plain, "-", _hex(s.MS_REMOUNT | s.MS_RDONLY)],
    )  # fmt: skip
    assert out == ["OK", "EINVAL"]


def _errno_cases(at: Path, mountcall: Path) -> dict[str, tuple[list[list[str]], list[str]]]:
    """mount(2)'s ERRORS (man 2 mount) that can be made on demand: commands, the kernel's answer."""
    mnt, long = str(at / "mnt"), "a" * 5000
    return {
        "target-missing": ([["mount", DEV, str(at / "nope"), EXT4, "ro"]], ["ENOENT"]),
        "target-a-file": ([["mount", DEV, str(at / "file"), EXT4, "ro"]], ["ENOTDIR"]),
        "target-under-a-file": ([["mount", DEV, str(at / "file" / "x"), EXT4, "ro"]], ["ENOTDIR"]),
        "target-a-symlink-loop": ([["mount", DEV, str(at / "loop"), EXT4, "ro"]], ["ELOOP"]),
        "target-too-long": ([["mount", DEV, long, EXT4, "ro"]], ["ENAMETOOLONG"]),
        "target-faulting": ([["raw", "165", "s:/x", "1", "s:ext4", "1"]], ["EFAULT"]),
        "source-missing": ([["mount", str(at / "nope"), mnt, EXT4, "ro"]], ["ENOENT"]),
        "source-a-directory": ([["mount", str(at / "dir"), mnt, EXT4, "ro"]], ["ENOTBLK"]),
        "source-a-char-device": ([["mount", "/dev/null", mnt, EXT4, "ro"]], ["ENOTBLK"]),
        "source-too-long": ([["mount", long, mnt, EXT4, "ro"]], ["EINVAL"]),  # copy_mount_string
        "type-too-long": ([["mount", DEV, mnt, long, "ro"]], ["EINVAL"]),
        "type-long": ([["mount", DEV, mnt, "t" * 300, "ro"]], ["ENODEV"]),
        "data-faulting": ([["mount-on", "data", "none", DEV, mnt, EXT4, "ro", "noload"]], ["EFAULT"]),
        "rw-on-a-read-only-device": ([["mount", DEV, mnt, EXT4, "0"]], ["EACCES"]),
        "remount-rw-on-a-read-only-device": (
            [["mount", DEV, mnt, EXT4, "ro"], ["mount", "-", mnt, "-", _hex(s.MS_REMOUNT)]],
            ["OK", "EACCES"],
        ),
        "ms-nouser": ([["mount", DEV, mnt, EXT4, _hex(1 << 31)]], ["EINVAL"]),
        "ms-nouser-remount": (
            [["mount", DEV, mnt, EXT4, "ro"], ["mount", "-", mnt, "-", _hex(1 << 31 | s.MS_REMOUNT)]],
            ["OK", "EINVAL"],
        ),
        "unprivileged": ([["exec-as", "1000", str(mountcall), "mount", DEV, mnt, EXT4, "ro"]], ["EPERM"]),
    }


ERRNO_CASES = list(_errno_cases(Path("/"), Path("/")))


@pytest.mark.parametrize("case", ERRNO_CASES)
def test_mount_errors_of_the_man_page(
    tmp_path: Path, mountcall: Path, images: dict[str, Path], at: Path, case: str
) -> None:
    commands, expected = _errno_cases(at, mountcall)[case]
    assert _same(tmp_path, mountcall, images["ext4"], *commands) == expected


def test_an_image_of_another_type_is_einval(tmp_path: Path, mountcall: Path, images: dict[str, Path], at: Path) -> None:
    assert _same(tmp_path, mountcall, images["squashfs"], ["mount", DEV, str(at / "mnt"), EXT4, "ro"]) == ["EINVAL"]


def test_a_read_only_mount_of_a_writable_device_deliberately_stays_read_only(
    tmp_path: Path, mountcall: Path, rw_image: Path, at: Path
) -> None:
    """The policy judged a read-only mount; going read-write is a new request mountwarden does not take
    on remount (EROFS), where the kernel would let host root do it."""
    mnt = str(at / "mnt")
    commands = [["mount", DEV, mnt, EXT4, "ro"], ["mount", "-", mnt, "-", _hex(s.MS_REMOUNT)]]
    sides = both(tmp_path, script(mountcall, commands, rw_image, ro=False), allow_policy(tmp_path))
    assert (sides.native, sides.contained) == (["OK", "OK"], ["OK", "EROFS"])


# --- MS_* flags on first mount and on remount ----------------------------------------------------

FLAGS = {
    "ro": s.MS_RDONLY,
    "nosymfollow": s.MS_NOSYMFOLLOW,
    "noexec": s.MS_NOEXEC,
    "nosuid": s.MS_NOSUID,
    "nodev": s.MS_NODEV,
    "relatime": s.MS_RELATIME,
    "lazytime": s.MS_LAZYTIME,
    "synchronous": s.MS_SYNCHRONOUS,
    "dirsync": s.MS_DIRSYNC,
    "silent": s.MS_SILENT,
    "mandlock": s.MS_MANDLOCK,
    "kernel-ignored": 1 << 16 | 1 << 22 | 1 << 23 | 1 << 26 | 1 << 27 | 1 << 28 | 1 << 29 | 1 << 30 | 0x200,
    "everything": s.MS_NOSYMFOLLOW | s.MS_NOEXEC | s.MS_LAZYTIME | s.MS_SYNCHRONOUS | s.MS_DIRSYNC | s.MS_MANDLOCK,
}
ATIME = {
    "noatime": s.MS_NOATIME,
    "nodiratime": s.MS_NODIRATIME,
    "strictatime": s.MS_STRICTATIME,
    "noatime+nodiratime": s.MS_NOATIME | s.MS_NODIRATIME,
    "strictatime+noatime": s.MS_STRICTATIME | s.MS_NOATIME,
}
NEW = FLAGS | ATIME | {"everything+noatime": FLAGS["everything"] | s.MS_NOATIME}


@pytest.mark.parametrize("flag", NEW.values(), ids=NEW.keys())
def test_a_flag_reaches_a_new_mount(tmp_path: Path, mountcall: Path, rw_image: Path, at: Path, flag: int) -> None:
    mnt = str(at / "mnt")
    _same(tmp_path, mountcall, rw_image, ["mount", DEV, mnt, EXT4, _hex(flag)], ["flags", mnt], ro=False)


def _remount(mnt: str, first: int, flag: int) -> list[list[str]]:
    return [["mount", DEV, mnt, EXT4, _hex(first)], ["mount", "-", mnt, "-", _hex(s.MS_REMOUNT | flag)], ["flags", mnt]]


@pytest.mark.parametrize("first", [0, s.MS_SYNCHRONOUS | s.MS_LAZYTIME | s.MS_MANDLOCK], ids=["plain", "sb-flags"])
@pytest.mark.parametrize("flag", FLAGS.values(), ids=FLAGS.keys())
def test_a_flag_reaches_a_remounted_mount(
    tmp_path: Path, mountcall: Path, rw_image: Path, at: Path, flag: int, first: int
) -> None:
    _same(tmp_path, mountcall, rw_image, *_remount(str(at / "mnt"), first, flag), ro=False)


@pytest.mark.parametrize("flag", FLAGS.values(), ids=FLAGS.keys())
def test_a_flag_reaches_a_bind_remounted_mount(
    tmp_path: Path, mountcall: Path, rw_image: Path, at: Path, flag: int
) -> None:
    _same(tmp_path, mountcall, rw_image, *_remount(str(at / "mnt"), 0, s.MS_BIND | flag), ro=False)


@pytest.mark.parametrize("flag", FLAGS.values(), ids=FLAGS.keys())
def test_a_flag_reaches_a_remount_of_the_containers_own_tmpfs_shown_with_its_owner(
    tmp_path: Path, mountcall: Path, at: Path, flag: int
) -> None:
    """The container's own tmpfs (mounted by the kernel, remounted by the supervisor with the
    container root's rights); the kernel shows a tmpfs of a user namespace with its owner's ids."""
    mnt = str(at / "mnt")
    commands = [
        ["mount", "parity", mnt, "tmpfs", _hex(s.MS_SYNCHRONOUS | s.MS_LAZYTIME)],
        ["mount", "-", mnt, "-", _hex(s.MS_REMOUNT | flag)],
        ["flags", mnt],
    ]
    owner = {"uid=100000", "gid=100000"}
    assert_same(tmp_path, script(mountcall, commands), allow_policy(tmp_path), deliberate=owner)


def test_a_host_block_device_is_deliberately_eperm(tmp_path: Path, mountcall: Path, at: Path) -> None:
    """The container's device cgroup allows no host block device: the kernel itself refuses it
    the open (EPERM) before it could learn that no driver serves major 240 (ENXIO natively)."""
    text = script(mountcall, [["mount", str(at / "nodriver"), str(at / "mnt"), EXT4, "ro"]])
    sides = both(tmp_path, text, allow_policy(tmp_path))
    assert (sides.native, sides.contained) == (["ENXIO"], ["EPERM"])


def test_a_regular_file_is_deliberately_mounted_through_a_pool_device(
    tmp_path: Path, mountcall: Path, images: dict[str, Path], at: Path
) -> None:
    """mount(2) of an image file binds a free pool device, as `mount -o loop` would (README); the
    kernel answers ENOTBLK."""
    mnt = str(at / "mnt")
    text = script(mountcall, [["mount", str(images["ext4"]), mnt, EXT4, "ro"], ["flags", mnt]])
    sides = both(tmp_path, text, allow_policy(tmp_path))
    assert sides.native == ["ENOTBLK", "ENOENT"] and sides.contained[0] == "OK", sides.contained


@pytest.mark.parametrize("flag", ATIME.values(), ids=ATIME.keys())
def test_an_atime_change_on_remount_is_deliberately_eperm_in_run_containers(
    tmp_path: Path, mountcall: Path, rw_image: Path, at: Path, flag: int
) -> None:
    """`run` lands image mounts from its staging namespace, so the kernel locks their atime mode
    (as their nosuid, nodev): the remount is refused and the mount keeps relatime."""
    mnt = str(at / "mnt")
    sides = both(tmp_path, script(mountcall, _remount(mnt, 0, flag), rw_image, ro=False), allow_policy(tmp_path))
    assert sides.native[:2] == ["OK", "OK"] and sides.native[2] != sides.contained[2]
    assert sides.contained == ["OK", "EPERM", "OK mnt=rw,relatime sb=rw st=relatime"]


def test_nosymfollow_stops_symlinks(tmp_path: Path, mountcall: Path, rw_image: Path, at: Path) -> None:
    mnt = at / "mnt"
    out = _same(
        tmp_path, mountcall, rw_image,
        ["mount", DEV, str(mnt), EXT4, _hex(s.MS_NOSYMFOLLOW)], ["symlink", "pub.txt", str(mnt / "link")],
        ["open", str(mnt / "link"), "r"], ["open", str(mnt / "pub.txt"), "r"], ro=False,
    )  # fmt: skip
    assert out == ["OK", "OK", "ELOOP", "OK"]


# --- umount2(2) ---------------------------------------------------------------------------------


def test_mnt_expire_unmounts_an_untouched_mount_on_the_second_call(
    tmp_path: Path, mountcall: Path, images: dict[str, Path], at: Path
) -> None:
    mnt = str(at / "mnt")
    out = _same(
        tmp_path, mountcall, images["ext4"],
        ["mount", DEV, mnt, EXT4, "ro"], ["umount", mnt, "expire"], ["umount", mnt, "expire"], ["flags", mnt],
    )  # fmt: skip
    assert out == ["OK", "EAGAIN", "OK", "ENOENT"]


def _umount_cases(at: Path, mountcall: Path) -> dict[str, tuple[list[list[str]], str, list[str]]]:
    """umount2(2)'s ERRORS (man 2 umount) made on demand, after a mount of the device on mnt:
    commands, shell lines after them, the kernel's answer."""
    mnt, link = str(at / "mnt"), str(at / "link")
    first = ["mount", DEV, mnt, EXT4, "ro"]
    quoted = shlex.quote(mnt)
    return {
        "plain": ([first, ["umount", mnt], ["flags", mnt]], "", ["OK", "OK", "ENOENT"]),
        "detach": ([first, ["umount", mnt, "detach"], ["flags", mnt]], "", ["OK", "OK", "ENOENT"]),
        "not-a-mount-point": ([first, ["umount", str(at / "dir")]], "", ["OK", "EINVAL"]),
        "missing": ([first, ["umount", str(at / "nope")]], "", ["OK", "ENOENT"]),
        "too-long": ([first, ["umount", "a" * 5000]], "", ["OK", "ENAMETOOLONG"]),
        "faulting": ([first, ["raw", "166", "1", "0"]], "", ["OK", "EFAULT"]),
        "expire-and-detach": ([first, ["umount", mnt, "expire,detach"]], "", ["OK", "EINVAL"]),
        "expire-and-force": ([first, ["umount", mnt, "expire,force"]], "", ["OK", "EINVAL"]),
        "unknown-flag": ([first, ["umount", mnt, "0x10"]], "", ["OK", "EINVAL"]),
        "nofollow-on-a-symlink": (
            [first, ["umount", link, "nofollow"], ["umount", link], ["flags", mnt]],
            "",
            ["OK", "EINVAL", "OK", "ENOENT"],
        ),
        "busy": ([first], f'(cd {quoted} && "$mc" umount {quoted})\n', ["OK", "EBUSY"]),
        "unprivileged": ([first, ["exec-as", "1000", str(mountcall), "umount", mnt]], "", ["OK", "EPERM"]),
    }


UMOUNT_CASES = list(_umount_cases(Path("/"), Path("/")))


@pytest.mark.parametrize("case", UMOUNT_CASES)
def test_umount_errors_of_the_man_page(
    tmp_path: Path, mountcall: Path, images: dict[str, Path], at: Path, case: str
) -> None:
    commands, then, expected = _umount_cases(at, mountcall)[case]
    text = script(mountcall, commands, images["ext4"], then=then)
    assert assert_same(tmp_path, text, allow_policy(tmp_path)) == expected


def test_mnt_force_is_deliberately_eperm_in_a_container(
    tmp_path: Path, mountcall: Path, images: dict[str, Path], at: Path
) -> None:
    """MNT_FORCE needs CAP_SYS_ADMIN in the initial user namespace: the container's root has it
    only in its own, and the supervisor unmounts with exactly those rights."""
    mnt = str(at / "mnt")
    text = script(mountcall, [["mount", DEV, mnt, EXT4, "ro"], ["umount", mnt, "force"]], images["ext4"])
    sides = both(tmp_path, text, allow_policy(tmp_path))
    assert (sides.native, sides.contained) == (["OK", "OK"], ["OK", "EPERM"])
