"""Differential tests of loop(4) and the block ioctls (issue 12): the kernel's answers natively,
as root in a private mount namespace of the host, against the supervisor's in an unprivileged
`mountwarden run` container, for the same script.

The observations are tests/loopprobe.py's lines (one per ioctl: OK and a value, or the errno's
name; sysfs attributes; LOOP_GET_STATUS64 fields) and the unmodified tools' exit codes. Device
numbers never appear: natively they are the host's, in the container the pool's.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from conftest import Run, allow_policy, run_container

PROBE = Path(__file__).resolve().parent / "loopprobe.py"
HELD_FLSBUF = """
import errno, fcntl
try:
    print("OK", fcntl.ioctl(3, 0x1261, 0))
except OSError as exc:
    print(errno.errorcode[exc.errno])
"""
MIB = 1 << 20


@pytest.fixture
def scratch(workdir: Path) -> Path:
    """Images the container's root may write, and the probe where it may read it."""
    path = workdir / "parity-loop"
    path.mkdir(mode=0o777, exist_ok=True)
    path.chmod(0o777)
    shutil.copy(PROBE, path / "loopprobe.py")
    for name, size in (("a.img", 8 * MIB), ("b.img", 8 * MIB), ("c.img", 4 * MIB)):
        (path / name).unlink(missing_ok=True)
        subprocess.run(["truncate", "-s", str(size), str(path / name)], check=True)
        (path / name).chmod(0o666)
    return path


def probe(scratch: Path, *steps: str, prefix: str = "") -> str:
    """A shell line running the probe's steps (each "cmd args", IMG/ names relative to scratch)."""
    words = [w for i, s in enumerate(steps) for w in ([";"] * bool(i) + s.split())]
    args = " ".join(shlex.quote(str(scratch / w) if w.endswith(".img") else w) for w in words)
    return f"{prefix}/usr/bin/python3 {scratch / 'loopprobe.py'} {args}\n"


def native(text: str) -> list[str]:
    argv = ["unshare", "-m", "--propagation", "private", "sh", "-c", text]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False).stdout.splitlines()


def assert_same(tmp_path: Path, text: str, policy: Path | None = None) -> tuple[list[str], Run]:
    """Fail with both outputs unless the container saw what the kernel answers natively."""
    kernel = native(text)
    run = run_container(tmp_path, ["sh", "-c", text], policy=policy, timeout=120)
    assert run.stdout.splitlines() == kernel, f"native:\n{kernel}\ncontainer:\n{run.stdout}\n{run.stderr}"
    return kernel, run


def test_change_fd_refusals_are_the_kernels_einval(tmp_path: Path, scratch: Path) -> None:
    text = probe(
        scratch,
        "bind a.img rw",
        "ioctl dev LOOP_CHANGE_FD b.img",  # the device is not read-only
        "close dev",
        "bind a.img ro",
        "ioctl dev LOOP_CHANGE_FD c.img",  # another size
        "ioctl dev LOOP_CHANGE_FD /",  # neither a regular file nor a block device
        "ioctl dev LOOP_CHANGE_FD b.img",
        "status dev",
        "sys loop/backing_file size ro",
    )
    lines, run = assert_same(tmp_path, text)
    assert [line.rsplit(": ", 1)[1] for line in (lines[1], *lines[4:7])] == ["EINVAL", "EINVAL", "EINVAL", "OK"], lines
    assert f"loop/backing_file={scratch / 'b.img'}" in lines[-1]
    changes = [d for d in run.decisions("ioctl") if d.get("op") == "LOOP_CHANGE_FD"]
    assert [d["result"] for d in changes] == ["EINVAL", "EINVAL", "EINVAL", "OK"], changes


def test_sysfs_view_follows_every_change_at_once(tmp_path: Path, scratch: Path) -> None:
    attrs = "sys size ro loop/offset loop/sizelimit loop/dio loop/autoclear loop/partscan queue/logical_block_size"
    text = probe(
        scratch,
        "truncate a.img 8388608",  # each side starts from the same file
        "bind a.img rw",
        attrs,
        "truncate a.img 12582912",
        "ioctl dev LOOP_SET_CAPACITY",
        "sys size",
        "ioctl dev LOOP_SET_STATUS64 4096,1048576",
        attrs,
        "ioctl dev LOOP_SET_BLOCK_SIZE 4096",
        "sys queue/logical_block_size size",
        "ioctl dev LOOP_SET_BLOCK_SIZE 3",
        "ioctl dev LOOP_SET_BLOCK_SIZE 8589934592",  # wider than an int: the host device judges the very value
        "ioctl dev LOOP_SET_DIRECT_IO 1",
        "sys loop/dio",
        "ioctl dev BLKROSET 1",
        "sys ro",
        "ioctl dev BLKROSET 0",
        "sys ro",
        "status dev",
    )
    lines, _ = assert_same(tmp_path, text)
    assert "sys size: size=24576" in lines and "sys ro: ro=1" in lines, lines
    assert any("loop/offset=4096 loop/sizelimit=1048576" in line for line in lines), lines


def test_sysfs_view_is_always_readable_while_it_changes(tmp_path: Path, scratch: Path) -> None:
    """A reader in a loop never sees a missing or empty attribute while the device changes."""
    lines, _ = assert_same(tmp_path, probe(scratch, "bind a.img rw", "hammer a.img 150"))
    assert "OK bad=0" in lines, lines


def test_block_ioctls_on_an_own_device_have_the_kernels_semantics(tmp_path: Path, scratch: Path) -> None:
    text = probe(
        scratch,
        "bind a.img rw",
        "ioctl dev BLKBSZGET",
        "ioctl dev BLKBSZSET 1024",
        "ioctl dev BLKBSZGET",
        "ioctl dev BLKBSZSET 100",
        "ioctl dev BLKBSZSET 8192",  # above the page size: 6.18 takes it (large block sizes)
        "ioctl dev BLKBSZSET null",
        "open x rwx",
        "ioctl dev BLKBSZSET 2048",  # claims the device: another open holds it exclusively
        "ioctl x BLKBSZSET 2048",  # the exclusive open itself sets it
        "ioctl x BLKBSZGET",
        "ioctl dev BLKRRPART",  # no LO_FLAGS_PARTSCAN
        "close x",
        "ioctl dev BLKFLSBUF",
        "ioctl dev BLKROSET 1",
        "ioctl dev BLKROGET",
        "ioctl dev BLKROSET null",
        "ioctl dev BLKROSET 0",
        "ioctl dev BLKRASET 256",
        "ioctl dev BLKRAGET",
        "ioctl dev BLKFRASET 512",
        "ioctl dev BLKRAGET",
        "close dev",
        "bind b.img rw+p",
        "ioctl dev BLKRRPART",
        "open x rwx",
        "ioctl dev BLKRRPART",  # the scan claims the device: EBUSY
        "ioctl x BLKRRPART",
        "sys loop/partscan",
    )
    lines, run = assert_same(tmp_path, text)
    assert [line.rsplit(": ", 1)[1] for line in lines[2:7]] == ["OK", "OK 1024", "EINVAL", "OK", "EINVAL"], lines
    assert lines[8].endswith("EBUSY") and lines[9].endswith("OK") and lines[26].endswith("EBUSY"), lines
    served = [d for d in run.decisions("ioctl") if d.get("action") == "served"]
    assert {d["op"] for d in served} >= {"BLKBSZSET", "BLKROSET", "BLKFLSBUF", "BLKRASET", "BLKRRPART"}, served
    assert all(d["device"] == "/dev/loop0" or d["device"] == "/dev/loop1" for d in served), served


def test_block_ioctls_need_the_callers_cap_sys_admin(tmp_path: Path, scratch: Path) -> None:
    """Without CAP_SYS_ADMIN the kernel's EACCES, in the container as natively."""
    requests = ("BLKBSZSET 1024", "BLKROSET 1", "BLKRRPART", "BLKFLSBUF")
    steps = ["bind a.img rw+p", *(f"ioctl dev {r}" for r in requests)]
    lines, _ = assert_same(tmp_path, probe(scratch, *steps, prefix="setpriv --bounding-set=-sys_admin "))
    assert [line.rsplit(": ", 1)[1] for line in lines] == ["OK", "EACCES", "EACCES", "EACCES", "EACCES"], lines


def test_mkfs_xfs_on_a_pool_device(tmp_path: Path, scratch: Path) -> None:
    image = scratch / "xfs.img"
    subprocess.run(["truncate", "-s", "320M", str(image)], check=True)
    image.chmod(0o666)
    text = (
        f"dev=$(losetup -f --show {image})\n"
        'mkfs.xfs -f -q "$dev"; echo "mkfs $?"\n'
        'blkid -o value -s TYPE "$dev"\n'
        # not gated: the kernel answers the container itself (the loop driver has no secure erase)
        'blkdiscard -f -o 0 -l 1048576 "$dev"; echo "discard $?"\n'
        'blkdiscard -f -z -o 0 -l 1048576 "$dev"; echo "zeroout $?"\n'
        'blkdiscard -f -s -o 0 -l 1048576 "$dev" 2>/dev/null; echo "secure $?"\n'
        'losetup -d "$dev"\n'
    )
    lines, run = assert_same(tmp_path, text)
    assert lines == ["mkfs 0", "xfs", "discard 0", "zeroout 0", "secure 1"], run.stderr
    assert any(d.get("op") == "BLKBSZSET" and d["result"] == "OK" for d in run.decisions("ioctl"))


def test_fstrim_on_an_own_mount(tmp_path: Path, scratch: Path, mnt: Path) -> None:
    image = scratch / "trim.img"
    image.unlink(missing_ok=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image), "32M"], check=True)
    image.chmod(0o666)
    text = (
        f"mount -o loop {image} {mnt} || exit 3\n"
        f'fstrim {mnt}; echo "fstrim $?"\n'
        f"setpriv --bounding-set=-sys_admin fstrim {mnt} 2>&1 | sed 's/.*: //'\n"
        f"umount -d {mnt}\n"
    )
    lines, run = assert_same(tmp_path, text, policy=allow_policy(tmp_path))
    assert lines == ["fstrim 0", "Operation not permitted"], run.stderr
    trims = [d for d in run.decisions("ioctl") if d.get("op") == "FITRIM"]
    assert [d["result"] for d in trims] == ["OK", "EPERM"] and trims[0]["action"] == "served", trims


def test_gated_requests_on_what_is_not_the_containers_own_get_the_unprivileged_answer(
    tmp_path: Path, scratch: Path, mountcall: Path
) -> None:
    """Deliberately unlike host root: a cleared device the container still holds open, and the
    host's own filesystem, are not its own; the kernel answers them as it answers any
    unprivileged caller (the requests run natively)."""
    text = (
        f"dev=$(losetup -f --show {scratch / 'a.img'})\n"
        'exec 3<"$dev"\n'
        'losetup -d "$dev"\n'
        f"/usr/bin/python3 -c {shlex.quote(HELD_FLSBUF)}\n"  # BLKFLSBUF on the cleared device, on the fd held
        f'{mountcall} ioctl-arg "$dev" 0x1261 0\n'  # the free slot, as an unbound device
        "fstrim / 2>&1 | sed 's/.*: //'\n"
    )
    run = run_container(tmp_path, ["sh", "-c", text])
    assert run.stdout.splitlines() == ["EACCES", "OK 0", "Operation not permitted"], run.stderr
    actions = [(d["op"], d["action"]) for d in run.decisions("ioctl") if d["op"] in ("BLKFLSBUF", "FITRIM")]
    assert actions == [("BLKFLSBUF", "kernel-native"), ("BLKFLSBUF", "served"), ("FITRIM", "kernel-native")]


def test_a_read_only_flag_set_in_the_container_leaves_with_it(tmp_path: Path, scratch: Path) -> None:
    """The kernel keeps a BLKROSET on a loop device across detach and the next binding: the
    pool clears it when the device leaves the container, so the host's next user of that
    device does not get it read-only."""
    text = (
        f"dev=$(losetup -f --show {scratch / 'a.img'})\n"
        'blockdev --setro "$dev" && blockdev --getro "$dev"\n'
        'losetup -d "$dev"\n'
    )
    run = run_container(tmp_path, ["sh", "-c", text])
    assert run.stdout.split() == ["1"], run.stderr
    [host] = {d["host_device"] for d in run.decisions("ioctl") if d.get("op") == "LOOP_CONFIGURE"}
    deadline = time.monotonic() + 10
    while subprocess.run(["losetup", host], capture_output=True).returncode == 0 and time.monotonic() < deadline:
        time.sleep(0.05)  # autoclear detaches asynchronously
    subprocess.run(["losetup", host, str(scratch / "b.img")], check=True)
    try:
        ro = subprocess.run(["blockdev", "--getro", host], capture_output=True, text=True, check=True).stdout
    finally:
        subprocess.run(["losetup", "-d", host], check=True)
    assert ro.strip() == "0"
