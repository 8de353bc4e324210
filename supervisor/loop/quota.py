"""A per-host-uid limit on loop devices, shared by every supervisor process on the machine.

Each device held counts as one BSD lock on a numbered file under /run/mountwarden/quota/<uid>/.
Locks belong to open fds, so the count is exact across processes, and a killed supervisor's
share is returned by the kernel when its fds close: nothing to clean up, nothing to go stale.
"""

from __future__ import annotations

import errno
import fcntl
import os
from typing import Final

from ..errors import KernelError

QUOTA_DIR: Final = "/run/mountwarden/quota"


class Ticket:
    """One unit of a uid's quota; held until `release` (or until the process dies)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def acquire(uid: int, limit: int) -> Ticket:
    """Take a free unit of `uid`'s quota, or fail with ENOSPC naming the limit."""
    directory = os.path.join(QUOTA_DIR, str(uid))
    os.makedirs(directory, mode=0o700, exist_ok=True)
    for slot in range(limit):
        fd = os.open(os.path.join(directory, str(slot)), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        return Ticket(fd)
    raise KernelError(errno.ENOSPC, f"host uid {uid} already holds its limit of {limit} loop devices")
