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


def test_o_path_fd_on_a_free_node_gets_no_served_block_ioctl(tmp_path: Path, scratch: Path) -> None:
    """Hole (fixed): an ioctl on an O_PATH fd is EBADF in the kernel (the file was never opened;
    it grants no I/O and no device access). handlers/block_ioctl.py took the fd, fstat()ed it
    (which works on O_PATH), found the slot by the placeholder node's inode and, the slot being
    bound now, ran BLKFLSBUF/BLKRASET/BLKBSZSET/BLKROSET on the pool's own O_RDWR fd of the
    device: a file nobody opened got device requests done with the supervisor's open file.

    Fixed: an O_PATH file is left to the kernel (EBADF) before any lookup, every request (FITRIM
    too); loop(4) requests on one are answered EBADF (never passed on: see the next test)."""
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


LOOP_SCRIPT = r"""
import errno, fcntl, os
for path, name, request in (("/dev/loop-control", "LOOP_CTL_GET_FREE", 0x4C82), ("/dev/loop0", "LOOP_GET_STATUS64",
                            0x4C05)):
    held = os.open(path, os.O_PATH)
    try:
        fcntl.ioctl(held, request, bytes(232) if request == 0x4C05 else 0)
        print(name, "OK")
    except OSError as exc:
        print(name, errno.errorcode[exc.errno])
    os.close(held)
"""


def test_loop_requests_on_an_o_path_fd_are_ebadf(tmp_path: Path, scratch: Path) -> None:
    """The same for loop(4): an O_PATH fd of /dev/loop-control or /dev/loopN is EBADF, as
    natively, and answered so by the supervisor rather than passed to the kernel, which would
    run a loop request natively on whatever file the fd number names by then."""
    (scratch / "loop.py").write_text(LOOP_SCRIPT)
    run = run_container(tmp_path, ["/usr/bin/python3", str(scratch / "loop.py")], policy=allow_policy(tmp_path))
    assert run.stdout.splitlines() == ["LOOP_CTL_GET_FREE EBADF", "LOOP_GET_STATUS64 EBADF"], run.stderr
