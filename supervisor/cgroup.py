"""A device cgroup for the container, so nodev on the supervisor's mounts is not the only wall.

With the v1 devices controller the container's cgroup denies every device but the usual
character devices; grants for the pool's loop devices and /dev/fuse are added later through
`allow`. A host without the v1 controller (pure cgroup v2) gets no device cgroup yet, and
`create` returns None so the caller can say so.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from dataclasses import dataclass
from typing import Final

V1_ROOT: Final = "/sys/fs/cgroup/devices"
BASE_ALLOW: Final = (
    "c 1:3 rwm",  # null
    "c 1:5 rwm",  # zero
    "c 1:7 rwm",  # full
    "c 1:8 rwm",  # random
    "c 1:9 rwm",  # urandom
    "c 5:0 rwm",  # tty
    "c 5:2 rwm",  # ptmx
    "c 136:* rwm",  # pts
)


@dataclass
class DeviceCgroup:
    path: str

    def add(self, pid: int) -> None:
        with open(os.path.join(self.path, "cgroup.procs"), "w") as f:
            f.write(str(pid))

    def allow(self, rule: str) -> None:
        with open(os.path.join(self.path, "devices.allow"), "w") as f:
            f.write(rule)

    def remove(self, timeout: float = 5.0) -> None:
        """Remove the cgroup once its last task is gone (task exit is reported asynchronously)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError as exc:
                if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)


PARENT: Final = os.path.join(V1_ROOT, "mountwarden")


def create(name: str) -> DeviceCgroup | None:
    """A fresh device cgroup for one container, or None without the v1 devices controller.

    The directory is named after the supervisor's pid, so `collect_stale` can tell the
    cgroups of a supervisor that was killed (and could not remove them) from live ones.
    """
    if not os.path.isfile(os.path.join(V1_ROOT, "devices.allow")):
        return None
    os.makedirs(PARENT, exist_ok=True)
    path = os.path.join(PARENT, f"{os.getpid()}.{name}")
    os.mkdir(path)
    group = DeviceCgroup(path)
    try:
        with open(os.path.join(path, "devices.deny"), "w") as f:
            f.write("a")
        for rule in BASE_ALLOW:
            group.allow(rule)
    except BaseException:
        with contextlib.suppress(OSError):
            os.rmdir(path)
        raise
    return group


def collect_stale() -> list[str]:
    """Remove the empty cgroups of supervisors that are gone; returns what was removed."""
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for entry in os.listdir(PARENT):
            owner = entry.split(".", 1)[0]
            if owner.isdigit() and not os.path.exists(f"/proc/{owner}"):
                with contextlib.suppress(OSError):  # EBUSY: tasks still inside, leave it
                    os.rmdir(os.path.join(PARENT, entry))
                    removed.append(entry)
    return removed
