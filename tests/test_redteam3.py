"""Third red-team pass: attacks on the landing (image mounts arrive by way of the staging namespace).

The claim under attack (stager.py): every image mount of a `run` container has nosuid, nodev,
the rule's noexec and ro, and its atime mode locked against every process of the container,
filtered or not; the container can still unmount it; nothing stays in staging or the landing.
The attacker is the container's root, under the filter (`Live.ask`) or outside it
(`Live.unfiltered`, nsenter as the container's root).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import calls
from test_locked_flags import FORCED, Live

_SLOT = re.compile(r" /dev/\.mountwarden/\d+ ")


@pytest.fixture(name="live")
def live_fixture(tmp_path: Path) -> Iterator[Live]:
    box = Live(tmp_path, "redteam3")
    try:
        yield box
    finally:
        box.close()


@pytest.fixture(name="live_fuse")
def live_fuse_fixture(tmp_path: Path) -> Iterator[Live]:
    box = Live(tmp_path, "redteam3-fuse", action="fuse")
    try:
        yield box
    finally:
        box.close()


def _dir(mnt: Path, name: str) -> Path:
    """A directory next to `mnt` the container's root may mount on."""
    path = mnt.parent / name
    path.mkdir(exist_ok=True)
    return path


def _no_slot_left(live: Live) -> None:
    with open(f"/proc/{live.init}/mountinfo") as f:
        table = f.read()
    assert not _SLOT.search(table), table
    assert ".mountwarden/" not in table, table


def _locked(live: Live, mountcall: Path, path: Path) -> None:
    """Mount flags at `path` as forced, and the kernel refuses to clear them to an unfiltered process."""
    mount = live.mount_of(path)
    assert mount is not None and set(FORCED) <= set(mount.options.split(",")), mount
    assert live.unfiltered(str(mountcall), "setattr-clear-all", str(path)) == ["EPERM"]


@pytest.mark.xfail(
    strict=True,
    reason="hole: the FUSE daemon's own mount sits unlocked in its jail namespace (owned by the container's "
    "user namespace, in the container's pid namespace) until the supervisor clones and detaches it; the "
    "container's root joins that namespace, clones it first and gets a copy whose flags it can clear",
)
def test_the_fuse_daemons_own_mount_cannot_be_cloned_with_its_flags_unlocked(
    live_fuse: Live, images: dict[str, Path], mountcall: Path, mnt: Path
) -> None:
    mc = str(mountcall)
    stolen = _dir(mnt, "rt3-stolen")
    steal = calls(mountcall, "fuse-steal fuse2fs 20", f"attach {stolen}", f"setattr-clear-all {stolen}")
    cmd = ["nsenter", "-t", str(live_fuse.init), "-U", "-m", "-p", "--", *steal]
    thief = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert live_fuse.ask(f"{mc} mount {images['ext4']} {mnt} ext4 ro") == "OK"
        out, _ = thief.communicate(timeout=30)
    finally:
        if thief.poll() is None:
            thief.kill()
            thief.wait()
    copy = live_fuse.mount_of(stolen)
    try:
        assert out.split()[:1] != ["OK"] or copy is None or set(FORCED) <= set(copy.options.split(",")), (out, copy)
    finally:
        if copy is not None:
            live_fuse.unfiltered("umount", "-l", str(stolen))
        live_fuse.ask(f"{mc} umount {mnt}")


def test_overmounting_the_landing_or_dev_does_not_divert_or_unlock_a_landing(
    live: Live, images: dict[str, Path], mountcall: Path, mnt: Path
) -> None:
    """The helper clones through its own fd on the landing: mounts the container puts over
    /dev/.mountwarden or over /dev itself neither catch the slot nor hide it from the helper."""
    mc = str(mountcall)
    assert live.ask(f"{mc} mount tmpfs /dev/.mountwarden tmpfs 0") == "OK"
    assert live.ask(f"{mc} mount {images['ext4']} {mnt} ext4 ro") == "OK"
    _locked(live, mountcall, mnt)
    _no_slot_left(live)
    assert live.ask(f"{mc} umount {mnt}") == "OK"
    # /dev as a whole under a tmpfs of the container's, the target on it.
    assert live.ask(f"{mc} mount tmpfs /dev tmpfs 0") == "OK"
    assert live.ask("mkdir /dev/img && echo made") == "made"
    assert live.ask(f"{mc} mount {images['ext4']} /dev/img ext4 ro") == "OK"
    _locked(live, mountcall, Path("/dev/img"))
    _no_slot_left(live)
    assert live.ask(f"{mc} umount /dev/img") == "OK"
    assert live.ask(f"{mc} umount /dev") == "OK"
    assert live.ask(f"{mc} umount /dev/.mountwarden") == "OK"
    assert live.unfiltered("ls", "-A", "/dev/.mountwarden") == []


def test_an_image_mounted_on_the_landing_itself_is_locked_and_later_landings_still_work(
    live: Live, images: dict[str, Path], mountcall: Path, mnt: Path
) -> None:
    """/dev/.mountwarden resolves for the container (O_PATH needs no search right on it): the
    image covers the landing in the container's tree, the helper's fd still sees the real one."""
    mc = str(mountcall)
    assert live.ask(f"{mc} mount {images['ext4']} /dev/.mountwarden ext4 ro") == "OK"
    _locked(live, mountcall, Path("/dev/.mountwarden"))
    assert live.ask(f"{mc} mount {images['squashfs']} {mnt} squashfs ro") == "OK"
    _locked(live, mountcall, mnt)
    _no_slot_left(live)
    assert live.ask(f"{mc} umount {mnt}") == "OK"
    assert live.ask(f"{mc} umount /dev/.mountwarden") == "OK"
    assert live.unfiltered("ls", "-A", "/dev/.mountwarden") == []


def test_a_bind_of_the_landing_or_of_dev_keeps_no_slot_copy(
    live: Live, images: dict[str, Path], mountcall: Path, mnt: Path
) -> None:
    """Binds of /dev and of the landing are slaves of staging too, so the slot propagates into
    them; the unstage (umount propagation, then the rmdir) must take every copy back."""
    mc = str(mountcall)
    land, dev = _dir(mnt, "rt3-land"), _dir(mnt, "rt3-dev")
    assert live.ask(f"{mc} mount /dev/.mountwarden {land} - bind") == "OK"
    assert live.ask(f"{mc} mount /dev {dev} - bind,rec") == "OK"
    assert live.ask(f"{mc} mount - {dev} - rec,private") == "OK"  # propagation changes run natively
    assert live.ask(f"{mc} mount {images['ext4']} {mnt} ext4 ro") == "OK"
    _locked(live, mountcall, mnt)
    with open(f"/proc/{live.init}/mountinfo") as f:
        table = f.read()
    assert f" {land}/" not in table and f" {dev}/.mountwarden" not in table, table
    _no_slot_left(live)
    for path in (mnt, dev / "shm", dev, land):
        live.unfiltered("umount", "-l", str(path))
    assert live.mount_of(land) is None and live.mount_of(dev) is None


def test_many_concurrent_mounts_all_land_locked_and_leave_nothing(
    live: Live, images: dict[str, Path], mountcall: Path, mnt: Path
) -> None:
    mc = str(mountcall)
    targets = [_dir(mnt, f"rt3-many-{i}") for i in range(8)]
    kinds = ["ext4", "squashfs", "erofs"]
    line = " ".join(f"{mc} mount {images[k]} {t} {k} ro >/dev/null &" for t, k in zip(targets, kinds * 3, strict=False))
    assert live.ask(f"{line} wait; echo done") == "done"
    for target in targets:
        _locked(live, mountcall, target)
    _no_slot_left(live)
    assert live.unfiltered("ls", "-A", "/dev/.mountwarden") == []
    for target in targets:
        assert live.ask(f"{mc} umount {target}") == "OK"


def test_killing_the_container_in_the_middle_of_a_landing_leaves_nothing(
    tmp_path: Path, images: dict[str, Path], mountcall: Path, mnt: Path
) -> None:
    box = Live(tmp_path, "redteam3-kill")
    try:
        assert box.ask(f"{mountcall} mount {images['ext4']} {mnt} ext4 ro >/dev/null & echo started") == "started"
        os.kill(box.init, signal.SIGKILL)
        box.proc.wait(timeout=30)
    finally:
        if box.proc.poll() is None:
            box.close()
    # no_leaks checks that the mounts, the helpers and the container are gone
