"""Kernel parity of mount(2) and umount2(2) (issue 12), differentially: each case runs the same
calls natively as root in a private mount namespace and in a `mountwarden run` container
(tests/parity.py) and asserts the same errnos, mountinfo options and statvfs flags.

Flag reports leave out what every image mount has on purpose (nosuid, nodev, idmapped); a test
whose name says `deliberately` leaves out more, and the README lists it.
"""

from __future__ import annotations

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
    """A fresh mount point (and a plain directory beside it) the container's root may use."""
    path = workdir / "parity"
    for d in (path / "mnt", path / "dir"):
        d.mkdir(parents=True, exist_ok=True)
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
