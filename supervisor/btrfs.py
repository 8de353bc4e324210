"""Which block device a btrfs superblock is made of, for the minter's check.

Every other filesystem the kernel path mounts reports the device it was made from as its
st_dev, so the minter checks that. btrfs reports an anonymous device number instead (one per
subvolume), and a btrfs filesystem may span several devices: the kernel assembles it from
every device it has scanned with the same fsid, so an image claiming the fsid of a filesystem
the host scanned could otherwise be joined to devices that are not the container's. The
kernel lists a filesystem's devices under /sys/fs/btrfs/FSID/devices (links to the block
devices); the superblock is accepted only when that list is exactly the one loop device.
"""

from __future__ import annotations

import errno
import fcntl
import os
import uuid
from typing import Final

from .errors import KernelError

# BTRFS_IOC_FS_INFO = _IOR(0x94, 31, struct btrfs_ioctl_fs_info_args), a 1 KiB struct that
# starts with max_id, num_devices (u64 each) and the 16-byte fsid.
_FS_INFO: Final = 0x8400941F
_FS_INFO_SIZE: Final = 1024
_SYSFS: Final = "/sys/fs/btrfs"


def sole_device(mount_fd: int) -> int:
    """The device number of the one device the btrfs filesystem on `mount_fd` consists of.

    Raises KernelError(EXDEV) when it has more than one device (or none the kernel names).
    """
    root = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=mount_fd)
    try:
        info = fcntl.ioctl(root, _FS_INFO, bytes(_FS_INFO_SIZE))
    finally:
        os.close(root)
    num_devices = int.from_bytes(info[8:16], "little")
    fsid = uuid.UUID(bytes=bytes(info[16:32]))
    devices = os.listdir(f"{_SYSFS}/{fsid}/devices")
    if num_devices != 1 or len(devices) != 1:
        raise KernelError(errno.EXDEV, f"the btrfs filesystem spans {max(num_devices, len(devices))} devices")
    with open(f"{_SYSFS}/{fsid}/devices/{devices[0]}/dev") as f:
        major, _, minor = f.read().strip().partition(":")
    return os.makedev(int(major), int(minor))
