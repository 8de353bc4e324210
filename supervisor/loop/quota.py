"""A per-host-uid limit on loop devices, shared by every supervisor process on the machine.

Each device held counts as one BSD lock on a numbered file under /run/mountwarden/quota/<uid>/.
Locks belong to open fds, so the count is exact across processes, and a killed supervisor's
share is returned by the kernel when its fds close: nothing to clean up, nothing to go stale.

A device can outlive its container: someone still holds it open (an ordinary user's own process
outside the container may), and the kernel detaches it only at the last close. Its ticket then
lingers here, still counted, until that happens.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
from collections.abc import Callable
from typing import Final

from ..errors import KernelError

QUOTA_DIR: Final = "/run/mountwarden/quota"
_lingering: list[tuple[Ticket, Callable[[], bool]]] = []
_lingering_lock = threading.Lock()  # pools of several containers close and bind on their own threads


class Ticket:
    """One unit of a uid's quota; held until `release` (or until the process dies)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def linger(ticket: Ticket, held: Callable[[], bool]) -> None:
    """Keep `ticket` past its container's end for as long as `held()` (its device is bound)."""
    with _lingering_lock:
        _lingering.append((ticket, held))


def settle() -> None:
    """Return the tickets of lingering devices the kernel has detached since."""
    with _lingering_lock:
        gone = [entry for entry in _lingering if not entry[1]()]
        for entry in gone:
            _lingering.remove(entry)
            entry[0].release()


def acquire(uid: int, limit: int) -> Ticket:
    """Take a free unit of `uid`'s quota, or fail with ENOSPC naming the limit."""
    settle()
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
