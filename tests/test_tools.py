"""Unmodified block-device tools on the container's own pool devices, as a user would run them.

Each test runs the host's own mkfs, fsck, resize2fs, blkid, wipefs, dd and fstrim in a
`mountwarden run` container (no --rootfs: the container sees the host's /usr) on a /dev/loopN
of its private pool, under policies/examples/image-tools.yaml, then mounts what they made:
through the kernel for every block filesystem this kernel has, through a FUSE daemon for those
it lacks. Where a result can be compared with the same tool run natively as root on the same
bytes, it is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import (
    REPO,
    Run,
    build_image,
    loop_devices,
    make_tree,
    mountwarden,
    read_audit,
    run_container,
    write_policy,
)

from supervisor import fuse
from supervisor.policy import MountRequest, load_policy

CONTAINER_ROOT = 100000  # the host uid of the container's root (the mountwarden range in /etc/subuid)
MiB = 1 << 20
KERNEL_TYPES = ("ext2", "ext3", "ext4", "xfs", "btrfs", "squashfs", "erofs")
FUSE_TYPES = {"vfat": "fusefat", "iso9660": "fuseiso"}
MISSING_DRIVERS = ("vfat", "iso9660", "f2fs", "udf")
# 8.3 upper-case names: fusefat shows a FAT volume's short names.
FUSE_CONTENT = {"PUB.TXT": "public\n", "DIR/NESTED.TXT": "nested\n", "DIR/BIG.BIN": "0123456789abcdef" * 8192}
# Served on branch parity-loop (handlers/block_ioctl.py); both pass once it is merged.

# A prelude for the container's scripts: `step NAME CMD...` runs CMD, prints "step NAME RC",
# and sends CMD's output to stderr, so a failing step shows what the tool said.
PRELUDE = 'step() { n=$1; shift; "$@" >&2; echo "step $n $?"; }\n'


@pytest.fixture
def place(workdir: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A directory of the test's own that the container's root owns: images and a mount point."""
    path = workdir / f"tools-{request.node.name}".replace("[", "-").replace("]", "")
    (path / "mnt").mkdir(parents=True)
    for p in (path, path / "mnt"):
        os.chown(p, CONTAINER_ROOT, CONTAINER_ROOT)
    yield path
    shutil.rmtree(path)


@pytest.fixture
def policy(tmp_path: Path, place: Path) -> Path:
    """The shipped example policy, with its /srv/build globs moved to the test's directory."""
    rules: list[dict[str, Any]] = yaml.safe_load((REPO / "policies/examples/image-tools.yaml").read_text())["rules"]
    for rule in rules:
        for key in ("source", "target"):
            if key in rule.get("match", {}):
                rule["match"][key] = f"{place}/**"
    return write_policy(tmp_path / "image-tools.yaml", rules)


@pytest.mark.parametrize(
    ("fstype", "action"),
    [*((t, "kernel") for t in KERNEL_TYPES), ("vfat", "fuse"), ("iso9660", "fuse"), ("f2fs", "deny"), ("udf", "deny")],
)
def test_the_example_policy_sends_each_filesystem_where_this_kernel_can_serve_it(fstype: str, action: str) -> None:
    policy = load_policy([REPO / "policies/examples/image-tools.yaml"])
    request = MountRequest("/srv/build/disk.img", "/srv/build/mnt", fstype, read_only=False)
    assert policy.evaluate(request).action == action
    assert policy.evaluate(dataclasses.replace(request, source="/srv/other.img")).action == "deny"


def test_fuse_daemons_of_filesystems_this_kernel_lacks_get_their_own_command_lines() -> None:
    """fusefat takes FUSE's options first like the others; fuseiso only after the image and mount point."""
    assert fuse.daemon_for("vfat", None).endswith("/fusefat") and fuse.daemon_for("iso9660", None).endswith("/fuseiso")
    forced = "-o nodev,nosuid,allow_other,ro,nonempty"
    assert fuse.argv("fusefat", True, []) == ["fusefat", "-f", *forced.split(), "/image", "/mnt"]
    assert fuse.argv("fuseiso", True, []) == ["fuseiso", "-n", "/image", "/mnt", "-f", *forced.split()]


def _owned(path: Path) -> Path:
    os.chown(path, CONTAINER_ROOT, CONTAINER_ROOT)
    path.chmod(0o644)
    return path


def _blank(place: Path, size: int) -> Path:
    image = place / "disk.img"
    with image.open("wb") as f:
        f.truncate(size)
    return _owned(image)


def _steps(run: Run) -> dict[str, int]:
    """Each `step` of the script and its exit status."""
    words = [line.split() for line in run.stdout.splitlines() if line.startswith("step ")]
    return {w[1]: int(w[2]) for w in words}


def _failed(run: Run) -> dict[str, int]:
    return {name: rc for name, rc in _steps(run).items() if rc != 0}


def _lines(run: Run) -> set[str]:
    return set(run.stdout.splitlines())


def _script(*lines: str) -> list[str]:
    return ["/bin/sh", "-c", PRELUDE + "\n".join(lines)]


def _mount_line(mnt: Path) -> str:
    """A script line printing "fstype options" of the mount on `mnt` from the container's mountinfo."""
    return f'awk \'$5=="{mnt}" {{ for (i = 7; $i != "-"; i++); print $(i+1), $6 }}\' /proc/self/mountinfo'


def _native(script: str) -> subprocess.CompletedProcess[str]:
    """`script` natively as root, in a private mount namespace of the host."""
    return subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script], capture_output=True, text=True, timeout=60
    )


MKFS = {
    "ext4": ("mkfs.ext4 -F -q $D", "e2fsck -fn $D"),
    "btrfs": ("mkfs.btrfs -f -q $D", "btrfs check $D"),
    "xfs": ("mkfs.xfs -f -q $D", "xfs_repair -n $D"),
    "vfat": ("mkfs.vfat $D", "fsck.vfat -n $D"),
}


@pytest.mark.parametrize("fstype", ["xfs", "ext4", "btrfs", "vfat"])
def test_mkfs_fsck_and_mount_on_a_pool_device(place: Path, policy: Path, tmp_path: Path, fstype: str) -> None:
    """mkfs and its checker on /dev/loopN, blkid names the result, then the mount the policy gives
    it: the kernel's, read-write, checked again after a write; vfat, which this kernel lacks, by fusefat."""
    image, mnt = _blank(place, 300 * MiB), place / "mnt"
    mkfs, check = MKFS[fstype]
    write = fstype in KERNEL_TYPES
    run = run_container(tmp_path, _script(
        f"D=$(losetup -f --show {image})",
        f"step mkfs {mkfs}",
        f"step check {check}",
        'echo "type=$(blkid -o value -s TYPE $D)"',
        f"step mount mount {'' if write else '-o ro '}$D {mnt}",
        _mount_line(mnt),
        f"step write sh -c 'echo written > {mnt}/new.txt'" if write else "",
        f"step umount umount {mnt}",
        f"step recheck {check}" if write else "",
        "losetup -d $D",
    ), policy=policy, timeout=120)  # fmt: skip
    steps = _lines(run)
    assert run.returncode == 0 and _failed(run) == {}, run.stderr
    assert f"type={fstype}" in steps, run.stdout
    mount = next(d for d in run.decisions("mount") if d.get("caller") != "fuse-daemon")
    assert mount["probed"] == fstype and mount["result"] == "OK"
    if write:
        assert mount["action"] == "kernel" and f"{fstype} rw,nosuid,nodev,relatime,idmapped" in steps
    else:
        assert mount["action"] == "fuse" and mount["daemon"] == "fusefat"
        assert "fuse.fusefat ro,nosuid,nodev,relatime" in steps


CHECKERS = {
    "ext2": "e2fsck -fn $D", "ext3": "e2fsck -fn $D", "ext4": "e2fsck -fn $D", "xfs": "xfs_repair -n $D",
    "btrfs": "btrfs check $D", "squashfs": "unsquashfs -s $D", "erofs": "fsck.erofs $D",
}  # fmt: skip


def _host_image(fstype: str, place: Path) -> Path:
    """An image of `fstype` made on the host with the usual content (xfs and btrfs empty but for a label)."""
    image = place / f"data.{fstype}"
    if fstype == "xfs":
        image.touch()
        os.truncate(image, 300 * MiB)
        subprocess.run(["mkfs.xfs", "-q", "-f", "-L", "made", str(image)], check=True)
    elif fstype == "btrfs":
        src = make_tree(place / "content")
        image.touch()
        os.truncate(image, 128 * MiB)
        subprocess.run(["mkfs.btrfs", "-q", "-f", "--rootdir", str(src), str(image)], check=True)
    else:
        build_image(fstype, make_tree(place / "content"), image)
    return _owned(image)


@pytest.mark.parametrize("fstype", KERNEL_TYPES)
def test_every_block_filesystem_of_this_kernel_checks_and_mounts_on_the_kernel_path(
    place: Path, policy: Path, tmp_path: Path, fstype: str
) -> None:
    """A host-made image on /dev/loopN: its checker passes, and the kernel mounts it."""
    image, mnt = _host_image(fstype, place), place / "mnt"
    run = run_container(tmp_path, _script(
        f"D=$(losetup -r -f --show {image})",
        f"step check {CHECKERS[fstype]}",
        f"step mount mount $D {mnt}",
        _mount_line(mnt),
        f"step ls ls {mnt}",
        f"step umount umount {mnt}",
        "losetup -d $D",
    ), policy=policy, timeout=120)  # fmt: skip
    steps = _lines(run)
    assert run.returncode == 0 and _failed(run) == {}, run.stderr
    driver = "ext4" if fstype.startswith("ext") else fstype
    assert any(line.startswith(f"{driver} ro,nosuid,nodev") for line in steps), run.stdout
    mount = run.decisions("mount")[-1]  # mount(8) tries rw first; the read-only device refuses it (EACCES)
    assert (mount["probed"], mount["action"], mount["result"]) == (fstype, "kernel", "OK")


def test_the_kernel_types_are_every_block_filesystem_of_this_kernel() -> None:
    """Guards the lists above: a kernel with another block filesystem needs it covered here."""
    with open("/proc/filesystems") as f:
        block = {line.split()[-1] for line in f if not line.startswith("nodev")}
    assert block - {"fuseblk"} == set(KERNEL_TYPES)
    assert not block & set(MISSING_DRIVERS)


def _missing_driver_image(fstype: str, place: Path) -> Path:
    image = place / f"data.{fstype}"
    if fstype == "iso9660":
        subprocess.run(["genisoimage", "-quiet", "-R", "-o", str(image), str(make_tree(place / "content"))], check=True)
        return _owned(image)
    image.touch()
    os.truncate(image, 64 * MiB)
    mkfs = {"vfat": ["mkfs.vfat"], "f2fs": ["mkfs.f2fs", "-q", "-f"], "udf": ["mkudffs", "--media-type=hd"]}[fstype]
    subprocess.run([*mkfs, str(image)], check=True, capture_output=True)
    return _owned(image)


@pytest.mark.parametrize("fstype", MISSING_DRIVERS)
def test_filesystems_this_kernel_lacks_get_its_enodev_on_the_kernel_path(
    place: Path, tmp_path: Path, mountcall: Path, fstype: str
) -> None:
    """mount(2) of a loop device holding one, natively as root and in a container under a rule that
    sends it to the kernel: ENODEV both times."""
    image, mnt = _missing_driver_image(fstype, place), place / "mnt"
    call = f"{mountcall} mount $D {mnt} {fstype} ro"
    native = _native(f"D=$(losetup -r -f --show {image}); {call}; losetup -d $D")
    policy = write_policy(tmp_path / "kernel.yaml", [{"name": "kernel", "match": {"source": f"{place}/**"},
                                                     "action": "kernel"}])  # fmt: skip
    run = run_container(tmp_path, _script(f"D=$(losetup -r -f --show {image})", call, "losetup -d $D"), policy=policy)
    assert native.stdout.split() == run.stdout.split() == ["ENODEV"], (native.stderr, run.stderr)
    assert run.decisions("mount")[0]["result"] == "ENODEV"


def _fuse_image(fstype: str, place: Path) -> Path:
    src = make_tree(place / "content", FUSE_CONTENT)
    image = place / f"data.{fstype}"
    if fstype == "vfat":
        image.touch()
        os.truncate(image, 16 * MiB)
        subprocess.run(["mkfs.vfat", str(image)], check=True, capture_output=True)
        subprocess.run(["mcopy", "-s", "-i", str(image), *map(str, src.iterdir()), "::"], check=True)
    else:
        subprocess.run(["genisoimage", "-quiet", "-R", "-o", str(image), str(src)], check=True)
    return _owned(image)


@pytest.mark.parametrize("fstype", sorted(FUSE_TYPES))
def test_filesystems_this_kernel_lacks_are_served_by_their_fuse_daemon(
    place: Path, policy: Path, tmp_path: Path, fstype: str
) -> None:
    """As for the other FUSE types: the same bytes, read-only, nosuid,nodev, an unprivileged daemon
    in the container that ends with its mount."""
    image, mnt = _fuse_image(fstype, place), place / "mnt"
    daemon = FUSE_TYPES[fstype]
    run = run_container(tmp_path, _script(
        f"step mount mount -o loop,ro {image} {mnt}",
        _mount_line(mnt),
        f"cd {mnt} && find . -type f | sort | xargs sha256sum; cd /",
        f"echo x > {mnt}/PUB.TXT 2>/dev/null || echo write=refused",
        f"echo daemon=$(ps -o user= -C {daemon})",
        f"step umount umount {mnt}",
    ), policy=policy)  # fmt: skip
    steps = _lines(run)
    assert run.returncode == 0 and _steps(run) == {"mount": 0, "umount": 0}, run.stderr
    expected = {f"{hashlib.sha256(text.encode()).hexdigest()}  ./{name}" for name, text in FUSE_CONTENT.items()}
    assert expected <= set(steps), run.stdout
    assert f"fuse.{daemon} ro,nosuid,nodev,relatime" in steps
    assert "write=refused" in steps and "daemon=root" in steps  # the container's root: host uid 100000
    mount = next(d for d in run.decisions("mount") if d.get("caller") != "fuse-daemon")
    assert (mount["probed"], mount["action"], mount["daemon"]) == (fstype, "fuse", daemon)
    assert not os.path.exists(f"/proc/{mount['daemon_pid']}")


def test_resize2fs_after_growing_the_backing_file_and_losetup_c(place: Path, policy: Path, tmp_path: Path) -> None:
    """truncate the bound file larger, `losetup -c`, and the device, its sysfs size and resize2fs follow."""
    image, mnt = _owned(build_image("ext4", make_tree(place / "content"), place / "data.ext4", "32M")), place / "mnt"
    run = run_container(tmp_path, _script(
        f"D=$(losetup -f --show {image})",
        f"truncate -s 64M {image}",
        "step capacity losetup -c $D",
        'echo "bytes=$(blockdev --getsize64 $D)"',
        'echo "sectors=$(cat /sys/block/${D#/dev/}/size)"',
        "step fsck e2fsck -fp $D",
        "step resize resize2fs $D",
        f"step mount mount $D {mnt}",
        f"echo size=$(df -B1M --output=size {mnt} | tail -1)",
        f"step read cat {mnt}/pub.txt",
        f"step umount umount {mnt}",
        "losetup -d $D",
    ), policy=policy)  # fmt: skip
    steps = _lines(run)
    assert run.returncode == 0 and _failed(run) == {}, run.stderr
    assert f"bytes={64 * MiB}" in steps and f"sectors={64 * MiB // 512}" in steps, run.stdout
    size = next(int(k.split("=")[1]) for k in steps if k.startswith("size="))
    assert 40 < size <= 64, run.stdout  # the filesystem grew: it was 32 MiB
    dump = subprocess.run(["dumpe2fs", "-h", str(image)], capture_output=True, text=True, check=True).stdout
    fields = dict(line.split(":", 1) for line in dump.splitlines() if ":" in line)
    assert int(fields["Block count"]) * int(fields["Block size"]) == 64 * MiB


def test_blkid_wipefs_and_dd_agree_with_the_same_tools_run_natively(place: Path, policy: Path, tmp_path: Path) -> None:
    """blkid and wipefs -n on /dev/loopN report what they report natively on the file; dd reads its
    bytes and writes through to it; wipefs -a erases the signature for both."""
    image = _owned(build_image("ext4", make_tree(place / "content"), place / "data.ext4"))
    subprocess.run(["e2label", str(image), "tools"], check=True)
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    native = {
        "blkid": subprocess.run(["blkid", "-p", "-o", "export", str(image)], capture_output=True, text=True).stdout,
        "wipefs": subprocess.run(["wipefs", "-n", "-a", str(image)], capture_output=True, text=True).stdout,
    }
    run = run_container(tmp_path, _script(
        f"D=$(losetup -f --show {image})",
        "blkid -p -o export $D | sed 's/^/blkid:/'",
        "wipefs -n -a $D | sed 's/^/wipefs:/'",
        "echo \"read=$(dd if=$D bs=1M status=none | sha256sum | cut -d' ' -f1)\"",
        "step wipe wipefs -a -q $D",
        "blkid -p $D; echo \"after=$?\"",
        "printf mountwarden-was-here | dd of=$D bs=1 seek=4194304 conv=notrunc,fsync status=none",
        'echo "step write $?"',
        "losetup -d $D",
    ), policy=policy)  # fmt: skip
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()

    def seen(prefix: str) -> list[str]:
        return [line.removeprefix(prefix) for line in lines if line.startswith(prefix)]

    assert [line for line in seen("blkid:") if not line.startswith("DEVNAME=")] == [
        line for line in native["blkid"].splitlines() if not line.startswith("DEVNAME=")
    ]
    assert "LABEL=tools" in seen("blkid:") and "TYPE=ext4" in seen("blkid:")
    assert [line.partition(": ")[2] for line in native["wipefs"].splitlines()] == [
        line.partition(": ")[2] for line in seen("wipefs:")
    ]
    assert seen("read=") == [digest]
    assert _steps(run) == {"wipe": 0, "write": 0} and seen("after=") == ["2"]  # blkid: nothing found
    assert subprocess.run(["blkid", "-p", str(image)], capture_output=True).returncode == 2
    with image.open("rb") as f:
        f.seek(4 * MiB)
        assert f.read(18) == b"mountwarden-was-he"


def test_fstrim_on_a_mounted_read_write_image(place: Path, policy: Path, tmp_path: Path) -> None:
    """fstrim on the container's own kernel mount of its image, as natively on a loop mount."""
    image, mnt = _owned(build_image("ext4", make_tree(place / "content"), place / "data.ext4")), place / "mnt"
    run = run_container(tmp_path, _script(
        f"step mount mount -o loop {image} {mnt}",
        f"step fstrim fstrim {mnt}",
        f"umount {mnt}",
    ), policy=policy)  # fmt: skip
    assert _steps(run) == {"mount": 0, "fstrim": 0}, run.stderr


def test_fstrim_natively_on_a_loop_mount(place: Path) -> None:
    """The native side of the test above: root's fstrim on a loop mount of the same kind of image works here."""
    image, mnt = build_image("ext4", make_tree(place / "content"), place / "data.ext4"), place / "mnt"
    native = _native(f"mount -o loop {image} {mnt} && fstrim {mnt}; rc=$?; umount {mnt}; exit $rc")
    assert native.returncode == 0, native.stderr


def _two_device_btrfs(place: Path) -> tuple[Path, Path]:
    first, second = place / "first.img", place / "second.img"
    for image in (first, second):
        image.touch()
        os.truncate(image, 128 * MiB)
    subprocess.run(["mkfs.btrfs", "-q", "-f", "-d", "single", "-m", "single", str(first), str(second)], check=True)
    return _owned(first), _owned(second)


def _host_nodes(place: Path, *images: Path) -> list[str]:
    """Nodes in `place` (outside /dev) of the host's loop devices bound to `images`, in that order."""
    bound = {Path(backing): name for name, backing in loop_devices()}
    nodes = []
    for image in images:
        node = place / bound[image]
        os.mknod(node, 0o600 | stat.S_IFBLK, os.stat(f"/dev/{bound[image]}").st_rdev)
        nodes.append(str(node))
    return nodes


def test_a_btrfs_filesystem_of_several_devices_is_refused_deliberately(
    place: Path, policy: Path, tmp_path: Path, mountcall: Path
) -> None:
    """Once both devices of a two-device btrfs are registered (`btrfs device scan`, as udev's
    64-btrfs.rules does on most hosts), root natively mounts it from either. The kernel assembles
    btrfs from every registered device with the image's fsid, opening each by the path it was
    registered under, whoever's it is; so the supervisor keeps only a superblock made of exactly
    the one loop device it minted from: EXDEV. (Registered under /dev/loopN, the other device is
    not even found: the minter's /dev holds one node. Here it is registered by a node outside /dev.)"""
    first, second = _two_device_btrfs(place)
    mnt = place / "mnt"
    native = _native(
        f"A=$(losetup -f --show {first}); B=$(losetup -f --show {second}); btrfs device scan $A $B >&2; "
        f"{mountcall} mount $A {mnt} btrfs ro; umount {mnt}; losetup -d $A $B; btrfs device scan --forget >&2"
    )
    assert native.stdout.split() == ["OK"], native.stderr
    script = f"A=$(losetup -f --show {first}); B=$(losetup -f --show {second}); echo bound; read _; "
    script += f"{mountcall} mount $A {mnt} btrfs ro; losetup -d $A $B"
    log = tmp_path / "audit.log"
    cmd = mountwarden("run", "--audit-log", str(log), "--policy", str(policy), "--", "/bin/sh", "-c", script)
    with subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO) as proc:
        assert proc.stdin and proc.stdout and proc.stdout.readline() == "bound\n"
        try:
            nodes = _host_nodes(place, first, second)
            subprocess.run(["btrfs", "device", "scan", *nodes], check=True, capture_output=True)
            proc.stdin.write("\n")
            proc.stdin.close()
            assert proc.stdout.read().split() == ["EXDEV"]
            assert proc.wait(timeout=30) == 0
        finally:
            subprocess.run(["btrfs", "device", "scan", "--forget"], capture_output=True)
    mount = next(r for r in read_audit(log) if r.get("event") == "mount-decision" and r.get("syscall") == "mount")
    assert (mount["probed"], mount["action"], mount["result"]) == ("btrfs", "kernel", "EXDEV"), mount["error"]
    assert "spans 2 devices" in mount["error"]
