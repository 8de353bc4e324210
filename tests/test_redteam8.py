"""Red-team pass 8: the kernel-parity work of issue 12 (served block ioctls, loop(4), mount(2)).

Each test runs the same script natively as root in a private mount namespace of the host and
as root of an unprivileged `mountwarden run` container, and compares the answers: a served
block ioctl must act only where the kernel would act for a privileged caller, on the caller's
own open file.
"""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest
from conftest import allow_policy, run_container

MIB = 1 << 20
# One line per request: OK or the errno's name. argv: image, mount point ("" for none), then
# "opath" (an O_PATH fd on the free device's node, taken before the bind) or "early" (an
# O_RDONLY fd there) or "late" (an O_PATH fd on the node after the bind).
SCRIPT = r"""
import errno, fcntl, os, struct, subprocess, sys
img, mnt, how = sys.argv[1:4]
dev = subprocess.run(["losetup", "-f"], capture_output=True, text=True, check=True).stdout.strip()
if how in ("opath", "early"):
    held = os.open(dev, os.O_PATH if how == "opath" else os.O_RDONLY)
subprocess.run(["losetup", dev, img], check=True)
if how == "late":
    held = os.open(dev, os.O_PATH)
if mnt:
    subprocess.run(["mount", "-t", "ext4", dev, mnt], check=True)
requests = [("BLKFLSBUF", 0x1261, 0), ("BLKRASET", 0x1262, 256), ("BLKBSZSET", 0x40081271, struct.pack("i", 4096)),
            ("BLKROSET", 0x125D, struct.pack("i", 0))]
for name, request, arg in requests:
    try:
        fcntl.ioctl(held, request, arg)
        print(name, "OK")
    except OSError as exc:
        print(name, errno.errorcode[exc.errno])
os.close(held)
if mnt:
    subprocess.run(["umount", mnt], check=True)
subprocess.run(["losetup", "-d", dev], check=True)
"""


@pytest.fixture
def scratch(workdir: Path) -> Path:
    path = workdir / "redteam8"
    path.mkdir(mode=0o777, exist_ok=True)
    path.chmod(0o777)
    (path / "probe.py").write_text(SCRIPT)
    image = path / "e.img"
    image.unlink(missing_ok=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image), "16M"], check=True)
    image.chmod(0o666)
    return path


def _both(tmp_path: Path, scratch: Path, mnt: str, how: str) -> tuple[list[str], list[str], str]:
    text = f"/usr/bin/python3 {scratch / 'probe.py'} {scratch / 'e.img'} {shlex.quote(mnt)} {how}"
    argv = ["unshare", "-m", "--propagation", "private", "sh", "-c", text]
    native = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    run = run_container(tmp_path, ["sh", "-c", text], policy=allow_policy(tmp_path))
    return native.stdout.splitlines(), run.stdout.splitlines(), run.stderr


@pytest.mark.xfail(
    strict=True,
    reason="block_ioctl serves an O_PATH fd of a placeholder node on the pool's own fd (kernel: EBADF)",
)
def test_o_path_fd_on_a_free_node_gets_no_served_block_ioctl(tmp_path: Path, scratch: Path) -> None:
    """What is wrong: an ioctl on an O_PATH fd is EBADF in the kernel (the file was never opened;
    it grants no I/O and no device access). handlers/block_ioctl.py takes the fd, fstat()s it
    (which works on O_PATH), finds the slot by the placeholder node's inode and, the slot being
    bound now, runs BLKFLSBUF/BLKRASET/BLKBSZSET/BLKROSET on the pool's own O_RDWR fd of the
    device (`_device_fd` returns `slot.device.fd`): a file nobody opened gets device requests
    done with the supervisor's open file. The same O_PATH fd on the bound node gets EBADF only
    because the caller's own (O_PATH) file is used there.

    Fix: in block_ioctl.handle, right after `take_fd`, answer EBADF when the taken file is
    O_PATH (`fcntl.fcntl(ours, fcntl.F_GETFL) & os.O_PATH`), before any lookup, for every
    request (FITRIM too); and in `_device_fd` substitute the pool's fd only for a file that
    was really opened on the placeholder (the same check), as the kernel's bdev_file would be.
    """
    native, contained, stderr = _both(tmp_path, scratch, "", "opath")
    assert native == ["BLKFLSBUF EBADF", "BLKRASET EBADF", "BLKBSZSET EBADF", "BLKROSET EBADF"], native
    assert contained == native, stderr


def test_o_path_fd_on_a_bound_node_gets_ebadf(tmp_path: Path, scratch: Path) -> None:
    """Guard: the caller's own O_PATH file is what the request runs on, so EBADF as natively."""
    native, contained, stderr = _both(tmp_path, scratch, "", "late")
    assert native == ["BLKFLSBUF EBADF", "BLKRASET EBADF", "BLKBSZSET EBADF", "BLKROSET EBADF"], native
    assert contained == native, stderr


def test_block_size_of_a_mounted_device_through_an_early_fd_is_ebusy(
    tmp_path: Path, scratch: Path, mnt: Path
) -> None:
    """Guard: an fd opened on the free node before the bind is served on the pool's fd; that
    fd is not an O_EXCL open, so BLKBSZSET still claims the device and is EBUSY while the
    container's ext4 holds it, as natively."""
    native, contained, stderr = _both(tmp_path, scratch, str(mnt), "early")
    assert native == ["BLKFLSBUF OK", "BLKRASET OK", "BLKBSZSET EBUSY", "BLKROSET OK"], native
    assert contained == native, stderr
