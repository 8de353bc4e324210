"""The walls: forced nosuid,nodev that survive remounts, and paths that cannot leave the container's root."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from conftest import allow_policy, build_image, make_tree, run_container, write_policy

CONTAINER_UID = 1000
OTHER_UID = 2000


@pytest.fixture(scope="session")
def hostile_image(workdir: Path, mountcall: Path, images: dict[str, Path]) -> Path:
    """An ext4 image with a setuid program owned by container uid 1000 and a /dev/null node."""
    src = make_tree(workdir / "hostile")
    suid = src / "suid"
    shutil.copy(mountcall, suid)
    os.chown(suid, CONTAINER_UID, CONTAINER_UID)  # on disk; the idmapped mount shows it as container uid 1000
    suid.chmod(0o4755)
    os.mknod(src / "null", 0o20666, os.makedev(1, 3))
    return build_image("ext4", src, workdir / "img" / "hostile.ext4")


def _sh(*lines: str) -> list[str]:
    return ["/bin/sh", "-c", "; ".join(lines)]


def test_nosuid_nodev_hold_also_after_remount_and_setattr(
    tmp_path: Path, hostile_image: Path, mountcall: Path, mnt: Path, workdir: Path
) -> None:
    mc, bind = str(mountcall), workdir / "bind"
    bind.mkdir(exist_ok=True)
    script = _sh(
        f"{mc} mount {hostile_image} {mnt} ext4 ro",
        f"{mc} open {mnt}/null rw",
        f"{mc} exec-as {OTHER_UID} {mnt}/suid euid",
        f"{mc} mount - {mnt} - remount,bind",
        f"{mc} setattr-clear {mnt}",
        f"{mc} open {mnt}/null rw",
        f"{mc} exec-as {OTHER_UID} {mnt}/suid euid",
        f"{mc} mount {mnt} {bind} - bind",  # native: binds keep the flags
        f"{mc} mount - {bind} - remount,bind",
        f"{mc} open {bind}/null rw",
        f"grep -c ' {mnt} .*nosuid,nodev' /proc/self/mountinfo",
        f"grep -c ' {bind} .*nosuid,nodev' /proc/self/mountinfo",
        f"stat -c '%a %u' {mnt}/suid",
    )
    run = run_container(tmp_path, script, policy=allow_policy(tmp_path))
    assert run.stdout.splitlines() == [
        "OK",
        "EACCES",
        f"OK {OTHER_UID}",  # nodev: the node does not open; nosuid: euid unchanged
        "OK",
        "ENOSYS",
        "EACCES",
        f"OK {OTHER_UID}",
        "OK",
        "OK",
        "EACCES",
        "1",
        "1",
        f"4755 {CONTAINER_UID}",  # the bits are there; they just give nothing
    ], run.stderr
    remounts = [d for d in run.decisions("mount") if d.get("remount")]
    assert [d["result"] for d in remounts] == ["OK", "OK"]
    assert all("nosuid" in d["options"] and "nodev" in d["options"] for d in remounts)


def test_remount_of_read_only_image_cannot_make_it_writable(
    tmp_path: Path, images: dict[str, Path], mountcall: Path, mnt: Path
) -> None:
    mc = str(mountcall)
    script = _sh(
        f"{mc} mount {images['ext4']} {mnt} ext4 ro",
        f"{mc} mount - {mnt} - remount",
        f"{mc} mount - {mnt} - remount,bind",
        f"{mc} open {mnt}/pub.txt w",
    )
    run = run_container(tmp_path, script, policy=allow_policy(tmp_path, options=["ro"]))
    # A read-only mount of a file is on a read-only loop device: EACCES, as the kernel answers (issue 12).
    assert run.stdout.split() == ["OK", "EACCES", "OK", "EROFS"]


def test_paths_cannot_escape_the_rootfs(tmp_path: Path, rootfs: Path, images: dict[str, Path]) -> None:
    policy = write_policy(
        tmp_path / "p.yaml",
        [{"name": "rootfs-images", "match": {"source": "/img/*", "target": "/mnt/**"}, "action": "kernel"}],
    )
    script = _sh(
        "mountcall mount /abs-escape/data.ext4 /mnt ext4 ro",
        "mountcall mount /rel-escape/data.ext4 /mnt ext4 ro",
        "mountcall mount /img/data.ext4 /mnt-escape ext4 ro",
        "mountcall mount /img/data.ext4 /mnt/../../../.. ext4 ro",
        "mountcall mount /img/../../../img/data.ext4 /mnt ext4 ro",
        "cat /mnt/pub.txt",
        "mountcall umount /mnt",
    )
    run = run_container(tmp_path, script, policy=policy, rootfs=rootfs)
    assert run.stdout.split() == ["ENOENT", "ENOENT", "EPERM", "EPERM", "OK", "public", "OK"], run.stderr
    decisions = run.decisions("mount")
    assert decisions[2]["target"] == "/tmp" and decisions[3]["target"] == "/"
    assert decisions[4]["source"] == "/img/data.ext4"


def test_private_dev_and_hidden_block_views_cannot_be_removed(tmp_path: Path, rootfs: Path, mountcall: Path) -> None:
    """Made before the container's namespaces, these mounts are locked: umount gets EINVAL.
    What shows through is the container's own loop pool, nothing of the host's."""
    for root, mc in ((None, str(mountcall)), (rootfs, "/bin/mountcall")):
        script = _sh(
            f"{mc} umount /dev",
            f"{mc} umount /sys/block",
            f"{mc} umount /sys/dev/block",
            "ls /sys/block /sys/class/block /sys/dev/block",
            "ls /dev",
        )
        run = run_container(tmp_path, script, rootfs=root)
        lines = run.stdout.split()
        assert lines[:3] == ["EINVAL", "EINVAL", "EINVAL"], run.stderr
        assert not [n for n in lines if n.startswith(("vd", "zram", "sd", "nvme"))]
        own = {"loop-control"} | {f"loop{n}" for n in range(8)}  # the container's own pool, numbered from 0
        assert {n for n in lines if n.startswith("loop")} == own


def test_a_bind_remount_changes_the_atime_mode_where_the_kernel_has_not_locked_it(
    tmp_path: Path, images: dict[str, Path], mountcall: Path, mnt: Path
) -> None:
    """On a mount the kernel locked (landed from staging) the atime mode is locked with the
    forced flags: EPERM, also under a tmpfs of the container's own. On that tmpfs, the
    container's own mount, the supervisor changes the atime mode as a whole field, as
    mount_setattr requires."""
    mc = str(mountcall)
    script = _sh(
        f"{mc} mount {images['ext4']} {mnt} ext4 ro",
        f"{mc} mount - {mnt} - remount,bind,noatime",
        f"{mc} umount {mnt}",
        f"{mc} mount tmpfs {mnt} tmpfs 0",
        f"mkdir {mnt}/sub",
        f"{mc} mount {images['ext4']} {mnt}/sub ext4 ro",
        f"{mc} mount - {mnt}/sub - remount,bind,noatime",
        f"{mc} umount {mnt}/sub",
        f"{mc} mount - {mnt} - remount,bind,noatime",
        f"grep ' {mnt} ' /proc/self/mountinfo | cut -d' ' -f6",
        f"{mc} umount {mnt}",
    )
    run = run_container(tmp_path, script, policy=allow_policy(tmp_path))
    lines = run.stdout.splitlines()
    assert lines[:8] == ["OK", "EPERM", "OK", "OK", "OK", "EPERM", "OK", "OK"], run.stdout + run.stderr
    assert lines[9:] == ["OK"], run.stdout + run.stderr
    assert {"noatime", "nosuid", "nodev"} <= set(lines[8].split(",")), lines[8]
