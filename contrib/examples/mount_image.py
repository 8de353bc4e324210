#!/usr/bin/env python3
"""Mount a disk image with a plain mount(2) call, read it, and unmount it.

Run inside a container started by `mountwarden run`: the call is intercepted and the
supervisor performs the mount. Usage: mount_image.py IMAGE MOUNTPOINT [FSTYPE]
Without FSTYPE the type is read from the image with blkid, as mount(8) does: mount(2), like
the kernel, answers ENODEV to a type that does not exist, such as "auto".
"""

import ctypes
import os
import subprocess
import sys

MS_RDONLY = 1


def blkid_type(image: str) -> str:
    probe = ["blkid", "-o", "value", "-s", "TYPE", image]
    return subprocess.run(probe, capture_output=True, text=True, check=True).stdout.strip()


def main() -> int:
    image, mountpoint = sys.argv[1], sys.argv[2]
    fstype = sys.argv[3] if len(sys.argv) > 3 else blkid_type(image)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(image.encode(), mountpoint.encode(), fstype.encode(), MS_RDONLY, None) != 0:
        err = ctypes.get_errno()
        print(f"mount {image} on {mountpoint}: {os.strerror(err)}", file=sys.stderr)
        return 1
    print(f"mounted {image} on {mountpoint}")
    with open("/proc/self/mountinfo") as f:
        print("".join(line for line in f if f" {mountpoint} " in line), end="")
    for name in sorted(os.listdir(mountpoint)):
        path = os.path.join(mountpoint, name)
        if os.path.isfile(path):
            with open(path) as f:
                print(f"{name}: {f.read().strip()}")
    if libc.umount2(mountpoint.encode(), 0) != 0:
        print(f"umount {mountpoint}: {os.strerror(ctypes.get_errno())}", file=sys.stderr)
        return 1
    print(f"unmounted {mountpoint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
