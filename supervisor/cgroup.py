"""Device cgroups for the container, so nodev on the supervisor's mounts is not the only wall.

The container's cgroups deny every device but the usual character devices; grants for the
pool's loop devices and /dev/fuse are added later through `allow`. Both mechanisms are used
where the host has them: the v1 devices controller (devices.allow) and, on the cgroup v2
hierarchy, a BPF device program (`supervisor.devfilter`). A host with neither gets none, and
`create` returns an empty list so the caller can say so.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Sequence
from typing import Final, Protocol

from . import devfilter

V1_ROOT: Final = "/sys/fs/cgroup/devices"
V2_ROOTS: Final = ("/sys/fs/cgroup/unified", "/sys/fs/cgroup")
GROUP: Final = "mountwarden"
BASE_RULES: Final[tuple[devfilter.Rule, ...]] = (
    ("c", 1, 3),  # null
    ("c", 1, 5),  # zero
    ("c", 1, 7),  # full
    ("c", 1, 8),  # random
    ("c", 1, 9),  # urandom
    ("c", 5, 0),  # tty
    ("c", 5, 2),  # ptmx
    ("c", 136, None),  # pts
)


class DeviceCgroup(Protocol):
    path: str

    def add(self, pid: int) -> None: ...
    def allow(self, rule: devfilter.Rule) -> None: ...
    def deny(self, rule: devfilter.Rule) -> None: ...
    def remove(self, timeout: float = 5.0) -> None: ...


class _Dir:
    """A cgroup directory of ours: joined by writing cgroup.procs, removed once empty."""

    def __init__(self, path: str) -> None:
        self.path = path

    def add(self, pid: int) -> None:
        with open(os.path.join(self.path, "cgroup.procs"), "w") as f:
            f.write(str(pid))

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


class V1DeviceCgroup(_Dir):
    def allow(self, rule: devfilter.Rule) -> None:
        self._write("devices.allow", rule)

    def deny(self, rule: devfilter.Rule) -> None:
        self._write("devices.deny", rule)

    def _write(self, name: str, rule: devfilter.Rule) -> None:
        kind, major, minor = rule
        try:
            with open(os.path.join(self.path, name), "w") as f:
                f.write(f"{kind} {major}:{'*' if minor is None else minor} rwm")
        except FileNotFoundError:
            if name != "devices.deny":
                raise
            # A runtime removed its container's cgroup first (the container ended): the grant went with it.


class V2DeviceCgroup(_Dir):
    """The fixed rules live in a BPF program attached once; grants are entries of its map."""

    def __init__(self, path: str, rules: Sequence[devfilter.Rule]) -> None:
        super().__init__(path)
        self.filter = devfilter.DeviceFilter(rules)
        dirfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            self.filter.attach(dirfd)
        finally:
            os.close(dirfd)

    def allow(self, rule: devfilter.Rule) -> None:
        kind, major, minor = rule
        if minor is None:
            raise ValueError("device grants on cgroup v2 name one device")
        self.filter.grant(kind, major, minor)

    def deny(self, rule: devfilter.Rule) -> None:
        kind, major, minor = rule
        if minor is not None:
            self.filter.revoke(kind, major, minor)

    def remove(self, timeout: float = 5.0) -> None:
        super().remove(timeout)  # removing the cgroup detaches its program
        self.filter.close()


def _v2_root() -> str | None:
    for root in V2_ROOTS:
        if os.path.isfile(os.path.join(root, "cgroup.controllers")):
            return root
    return None


def create(name: str) -> list[DeviceCgroup]:
    """Fresh device cgroups for one container, one per mechanism the host has.

    The directories are named after the supervisor's pid, so `collect_stale` can tell the
    cgroups of a supervisor that was killed (and could not remove them) from live ones.
    """
    made: list[DeviceCgroup] = []
    leaf = f"{os.getpid()}.{name}"
    try:
        if os.path.isfile(os.path.join(V1_ROOT, "devices.allow")):
            v1 = V1DeviceCgroup(_mkdir(V1_ROOT, leaf))
            made.append(v1)
            with open(os.path.join(v1.path, "devices.deny"), "w") as f:
                f.write("a")
            for rule in BASE_RULES:
                v1.allow(rule)
        if (root := _v2_root()) is not None:
            path = _mkdir(root, leaf)
            try:
                made.append(V2DeviceCgroup(path, BASE_RULES))
            except BaseException:
                os.rmdir(path)
                raise
    except BaseException:
        for group in made:
            with contextlib.suppress(OSError):
                group.remove(0)
        raise
    return made


def _mkdir(root: str, leaf: str) -> str:
    parent = os.path.join(root, GROUP)
    os.makedirs(parent, exist_ok=True)
    path = os.path.join(parent, leaf)
    os.mkdir(path)
    return path


def collect_stale() -> list[str]:
    """Remove the empty cgroups of supervisors that are gone; returns what was removed."""
    removed = []
    for root in (V1_ROOT, *V2_ROOTS):
        parent = os.path.join(root, GROUP)
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            for entry in os.listdir(parent):
                owner = entry.split(".", 1)[0]
                path = os.path.join(parent, entry)
                if owner.isdigit() and os.path.isdir(path) and not os.path.exists(f"/proc/{owner}"):
                    with contextlib.suppress(OSError):  # EBUSY: tasks still inside, leave it
                        os.rmdir(path)
                        removed.append(path)
    return removed


def of_process(pid: int) -> list[DeviceCgroup]:
    """The device cgroup a runtime put process `pid` in, to grant the pool's devices there.

    Only the v1 devices controller can be widened from outside: on the v2 hierarchy a
    runtime's BPF device program decides alone (a second program could only narrow it), so a
    host without v1 devices gets an empty list and its runtime's rules stay as they are.
    """
    if not os.path.isfile(os.path.join(V1_ROOT, "devices.allow")):
        return []
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            if "devices" in controllers.split(","):
                if path == "/":
                    return []  # the root cgroup allows every device and cannot be changed
                group = os.path.realpath(os.path.join(V1_ROOT, path.lstrip("/")))
                if os.path.commonpath([group, V1_ROOT]) == V1_ROOT and os.path.isfile(
                    os.path.join(group, "devices.allow")
                ):
                    return [V1DeviceCgroup(group)]
    return []
