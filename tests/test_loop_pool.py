"""The private loop pool with unmodified tools: util-linux on the host view, busybox in a rootfs."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import allow_policy, descendants, make_tree, mountwarden, run_container, write_policy


@pytest.fixture(scope="session")
def part_image(workdir: Path) -> Path:
    """An ext4 filesystem that starts 1 MiB into the file, as a partition would."""
    src = make_tree(workdir / "part-src", {"p.txt": "partition\n"})
    image = workdir / "img" / "part.img"
    subprocess.run(["truncate", "-s", "12M", str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "offset=1048576", "-d", str(src), str(image), "8M"], check=True)
    image.chmod(0o644)
    return image


def sh(*lines: str) -> list[str]:
    return ["/bin/sh", "-c", "\n".join(lines)]


def test_util_linux_losetup_and_mount(tmp_path: Path, images: dict[str, Path], part_image: Path, mnt: Path) -> None:
    ext4, sq, erofs = images["ext4"], images["squashfs"], images["erofs"]
    script = sh(
        "losetup -f",
        f"losetup --show -f -r {ext4}",
        "losetup -a",
        "losetup -l -n -O NAME,RO,AUTOCLEAR,BACK-FILE",
        f"losetup -j {ext4}",
        f"mount /dev/loop0 {mnt} && cat {mnt}/pub.txt && umount {mnt}",
        "losetup -c /dev/loop0 && echo capacity-ok",
        "losetup -d /dev/loop0 && losetup -a | wc -l",
        f"losetup --show -f -r -o 1048576 --sizelimit 8388608 {part_image}",
        "losetup -l -n -O NAME,OFFSET,SIZELIMIT",
        f"mount -r /dev/loop0 {mnt} && cat {mnt}/p.txt && umount -d {mnt} && losetup -a | wc -l",
        f"losetup --show -f -r -P {ext4}",
        "cat /sys/block/loop0/loop/partscan; ls /dev/loop0p1 2>&1 | wc -l",
        f"losetup -f -r {sq} && losetup -a | wc -l && losetup -D && losetup -a | wc -l",
        f"mount -o loop,ro {erofs} {mnt} && cat {mnt}/pub.txt && losetup -a | wc -l",
        f"umount {mnt} && losetup -a | wc -l",
        f"mount -o loop=/dev/loop3,ro {sq} {mnt} && losetup -a && umount -d {mnt} && losetup -a | wc -l",
    )
    run = run_container(tmp_path, script, policy=allow_policy(tmp_path))
    assert [" ".join(line.split()) for line in run.stdout.splitlines()] == [
        "/dev/loop0",
        "/dev/loop0",
        f"/dev/loop0: [{os.stat(ext4).st_dev:04d}]:{os.stat(ext4).st_ino} ({ext4})",
        f"/dev/loop0 1 0 {ext4}",
        f"/dev/loop0: [{os.stat(ext4).st_dev:04d}]:{os.stat(ext4).st_ino} ({ext4})",
        "public",
        "capacity-ok",
        "0",
        "/dev/loop0",
        "/dev/loop0 1048576 8388608",
        "partition",
        "0",
        "/dev/loop0",
        "1",  # partition scanning is on; this kernel has no partition table parsers, so no loop0p1
        "1",
        "2",
        "0",
        "public",
        "1",
        "0",  # mount -o loop set autoclear: the device went with the umount
        f"/dev/loop3: [{os.stat(sq).st_dev:04d}]:{os.stat(sq).st_ino} ({sq})",
        "0",
    ], run.stderr
    configure = [d for d in run.decisions("ioctl") if d.get("op") == "LOOP_CONFIGURE"]
    assert configure and all(d["result"] == "OK" and d["host_device"].startswith("/dev/loop") for d in configure)


def test_busybox_losetup_and_mount_in_rootfs(tmp_path: Path, rootfs: Path) -> None:
    script = sh(
        "losetup -f",
        "losetup -r -f /img/data.ext4 && losetup -a",
        "mount -r /dev/loop0 /mnt && cat /mnt/pub.txt && umount /mnt",
        "losetup -d /dev/loop0 && losetup -a | wc -l",
        "mount -o loop,ro /img/data.ext4 /mnt && cat /mnt/dir/nested.txt && umount /mnt",
        "ls /sys/block | wc -l",
    )
    run = run_container(tmp_path, script, policy=allow_policy(tmp_path), rootfs=rootfs)
    lines = run.stdout.splitlines()
    assert lines[0] == "/dev/loop0", run.stderr
    assert lines[1].startswith("/dev/loop0:") and lines[1].endswith("/img/data.ext4")
    assert lines[2:] == ["public", "0", "nested", "8"], run.stderr


def _start(tmp_path: Path, name: str, script: list[str], policy: Path) -> tuple[subprocess.Popen[str], Path]:
    log = tmp_path / f"{name}.log"
    cmd = mountwarden("run", "--name", name, "--audit-log", str(log), "--policy", str(policy), "--", *script)
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, log


def test_two_containers_each_have_their_own_loop0(tmp_path: Path, images: dict[str, Path]) -> None:
    """Each sees exactly its own device as /dev/loop0: not the other's, not one the host bound."""
    policy = allow_policy(tmp_path)
    host_dev = subprocess.run(
        ["losetup", "--show", "-f", "-r", str(images["erofs"])], capture_output=True, text=True, check=True
    ).stdout.strip()
    procs = {}
    for name, fstype in (("one", "ext4"), ("two", "squashfs")):
        script = sh(f"losetup --show -f -r {images[fstype]}", "losetup -a", "ls /sys/block/*/loop -d", "read line")
        procs[name] = _start(tmp_path, name, script, policy)
    try:
        seen = {}
        for name, (proc, _) in procs.items():
            assert proc.stdout and proc.stderr
            seen[name] = [proc.stdout.readline().strip() for _ in range(3)]
            assert seen[name][0], proc.stderr.read()
        assert seen["one"][0] == seen["two"][0] == "/dev/loop0"
        assert seen["one"][1].endswith(f"({images['ext4']})") and seen["two"][1].endswith(f"({images['squashfs']})")
        assert seen["one"][2] == seen["two"][2] == "/sys/block/loop0/loop"  # each sees one bound device: its own
        host = {
            line.split(":")[0]
            for line in subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout.splitlines()
        }
        assert len([d for d in host if d]) >= 2  # two distinct host devices back the two loop0s
    finally:
        for proc, _ in procs.values():
            proc.communicate("\n", timeout=30)
        subprocess.run(["losetup", "-d", host_dev], check=True)
    assert all(proc.returncode == 0 for proc, _ in procs.values())


def test_limit_per_container_and_per_host_uid(tmp_path: Path, images: dict[str, Path]) -> None:
    ext4 = images["ext4"]
    small = write_policy(
        tmp_path / "small.yaml",
        [{"name": "all", "match": {"source": "/**"}, "action": "kernel"}],
    )
    small.write_text(small.read_text() + "limits: {loop_devices: 2}\n")
    run = run_container(tmp_path, sh(*[f"losetup -f -r {ext4} 2>&1; echo rc=$?" for _ in range(3)]), policy=small)
    assert run.stdout.splitlines()[:2] == ["rc=0", "rc=0"]
    assert "cannot find an unused loop device" in run.stdout and run.stdout.endswith("rc=1\n")
    denied = [d for d in run.decisions("ioctl") if d["result"] == "ENOSPC"]
    assert denied and "limit of 2" in denied[0]["error"]

    per_uid = allow_policy(tmp_path)
    per_uid.write_text(per_uid.read_text() + "limits: {loop_devices_per_host_uid: 1}\n")
    run = run_container(tmp_path, sh(*[f"losetup -f -r {ext4} 2>&1; echo rc=$?" for _ in range(2)]), policy=per_uid)
    assert run.stdout.splitlines()[0] == "rc=0"
    assert "No space left on device" in run.stdout and run.stdout.endswith("rc=1\n")
    assert any("host uid" in d.get("error", "") for d in run.decisions("ioctl"))


@pytest.mark.parametrize("victim", ["container", "supervisor"])
def test_kill_9_with_devices_bound_and_mounted(tmp_path: Path, images: dict[str, Path], mnt: Path, victim: str) -> None:
    script = sh(
        f"losetup -f -r {images['ext4']}",
        f"losetup -f -r {images['squashfs']}",
        f"mount -o loop,ro {images['erofs']} {mnt}",
        "losetup -a | wc -l",
        "read line",
    )
    proc, log = _start(tmp_path, "victim", script, allow_policy(tmp_path))
    assert proc.stdout and proc.stdout.readline().strip() == "3"
    if victim == "container":
        init = next(pid for pid, name in descendants(proc.pid) if name == "mw-init")
        os.kill(init, signal.SIGKILL)
    else:
        os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    if victim == "supervisor":
        deadline = time.monotonic() + 10
        while not subprocess.run(mountwarden("gc"), capture_output=True, text=True).stdout:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    # no_leaks: every host loop device (bound, mounted and the placeholder) is gone


def test_fifty_attach_detach_cycles_leave_nothing(tmp_path: Path, images: dict[str, Path], mnt: Path) -> None:
    ext4 = images["ext4"]
    script = sh(
        f"for i in $(seq 50); do losetup -f -r {ext4} && losetup -d /dev/loop0 || echo fail $i; done",
        f"for i in $(seq 10); do mount -o loop,ro {ext4} {mnt} && umount {mnt} || echo mfail $i; done",
        "losetup -a | wc -l",
    )
    run = run_container(tmp_path, script, policy=allow_policy(tmp_path), timeout=120)
    assert run.stdout.split() == ["0"], run.stderr


def test_concurrent_allocation_with_host_losetup(tmp_path: Path, images: dict[str, Path]) -> None:
    """Two containers and the host race for free host devices; nobody collides or fails."""
    ext4 = images["ext4"]
    script = sh(f"for i in $(seq 20); do losetup -f -r {ext4} && losetup -d /dev/loop0 || echo fail; done; echo done")
    policy = allow_policy(tmp_path)
    procs = [_start(tmp_path, f"race{i}", script, policy)[0] for i in range(2)]
    for _ in range(20):
        dev = subprocess.run(["losetup", "--show", "-f", "-r", str(ext4)], capture_output=True, text=True, check=True)
        subprocess.run(["losetup", "-d", dev.stdout.strip()], check=True)
    outputs = [proc.communicate(timeout=120)[0] for proc in procs]
    assert outputs == ["done\n", "done\n"]


def test_util_linux_in_a_rootfs(tmp_path: Path, debian_rootfs: Path) -> None:
    script = sh(
        "losetup --show -f -r /img/data.ext4",
        "losetup -a",
        "mount -o loop,ro /img/data.ext4 /mnt && cat /mnt/pub.txt && losetup -a | wc -l && umount /mnt",
        "losetup -D && losetup -a | wc -l",
    )
    run = run_container(tmp_path, script, policy=allow_policy(tmp_path), rootfs=debian_rootfs)
    lines = run.stdout.splitlines()
    assert lines[0] == "/dev/loop0", run.stderr
    assert lines[1].startswith("/dev/loop0: ") and lines[1].endswith("(/img/data.ext4)")
    assert lines[2:] == ["public", "1", "0"], run.stderr  # mount -o loop reused the device bound to the same file


def test_busybox_in_the_host_view(tmp_path: Path, images: dict[str, Path], mnt: Path) -> None:
    bb, ext4 = "/bin/busybox", images["ext4"]
    script = sh(
        f"{bb} losetup -f",
        f"{bb} losetup -r -f {ext4} && {bb} losetup -a",
        f"{bb} mount -o loop,ro {ext4} {mnt} && cat {mnt}/pub.txt && {bb} umount {mnt}",
        f"{bb} losetup -d /dev/loop0 && {bb} losetup -a | wc -l",
    )
    run = run_container(tmp_path, script, policy=allow_policy(tmp_path))
    lines = run.stdout.splitlines()
    assert lines[0] == "/dev/loop0", run.stderr
    assert lines[1].startswith("/dev/loop0: ") and lines[1].endswith(str(ext4))
    assert lines[2:] == ["public", "0"], run.stderr


RAW_IOCTLS = r"""
import errno, fcntl, os, struct, sys
image, copy = sys.argv[1], sys.argv[2]
INFO64 = struct.Struct("<5Q4I64s64s32s2Q")
OLD = struct.Struct("<i4xQQQiiii64s32s2Q4s4x")

def call(fd, request, arg=0):
    try:
        return fcntl.ioctl(fd, request, arg)
    except OSError as exc:
        return errno.errorcode[exc.errno]

def ok(result):
    return result if isinstance(result, str) else 0

ctl = os.open("/dev/loop-control", os.O_RDWR)
print("add-existing", call(ctl, 0x4C80, 5))
print("remove", call(ctl, 0x4C81, 5), os.path.exists("/dev/loop5"))
print("add", call(ctl, 0x4C80, 5), os.path.exists("/dev/loop5"))
print("remove-missing", call(ctl, 0x4C81, 9))
print("add-beyond-limit", call(ctl, 0x4C80, 9))
dev = os.open("/dev/loop0", os.O_RDWR)
print("status-unbound", call(dev, 0x4C05, bytes(INFO64.size)))
print("clear-unbound", call(dev, 0x4C01))
backing = os.open(image, os.O_RDONLY)
print("set-fd", call(dev, 0x4C00, backing))
print("set-fd-again", call(dev, 0x4C00, backing))
old = OLD.unpack(call(dev, 0x4C03, bytes(OLD.size)))
print("old-status", old[0], old[7] & 1, old[8].rstrip(b"\0").decode() == image)
info = list(INFO64.unpack(call(dev, 0x4C05, bytes(INFO64.size))))
info[8] |= 4  # autoclear
print("set-status64", ok(call(dev, 0x4C04, INFO64.pack(*info))), open("/sys/block/loop0/loop/autoclear").read().strip())
print("direct-io", call(dev, 0x4C08, 0))
print("block-size", call(dev, 0x4C09, 4096), open("/sys/block/loop0/queue/logical_block_size").read().strip())
other = os.open(copy, os.O_RDONLY)
print("change-fd", call(dev, 0x4C06, other), open("/sys/block/loop0/loop/backing_file").read().strip() == copy)
print("capacity", call(dev, 0x4C07))
print("clear", call(dev, 0x4C01), os.path.exists("/sys/block/loop0/loop"))
"""


def test_every_loop_request_with_its_errnos(tmp_path: Path, images: dict[str, Path], workdir: Path) -> None:
    copy = workdir / "img" / "copy.ext4"
    copy.write_bytes(images["ext4"].read_bytes())
    copy.chmod(0o644)
    try:
        run = run_container(
            tmp_path,
            ["/usr/bin/python3", "-c", RAW_IOCTLS, str(images["ext4"]), str(copy)],
            policy=allow_policy(tmp_path),
        )
    finally:
        copy.unlink()
    assert run.stdout.splitlines() == [
        "add-existing EEXIST",
        "remove 0 False",
        "add 5 True",
        "remove-missing ENODEV",
        "add-beyond-limit ENOSPC",
        "status-unbound ENXIO",
        "clear-unbound ENXIO",
        "set-fd 0",
        "set-fd-again EBUSY",
        "old-status 0 1 True",  # container number 0, read-only (the fd was), the container's path
        "set-status64 0 1",
        "direct-io 0",
        "block-size 0 4096",
        "change-fd 0 True",
        "capacity 0",
        "clear 0 False",
    ], run.stderr
