"""The per-container owner: everything made for one container is released here, in one place.

A Session holds the container's listener fd, a pidfd on its init, the namespace helper, the
mounts it made and the host loop devices behind them. `close` is idempotent and runs however
the container ended (normal exit, SIGKILL, or the supervisor shutting down); for a supervisor
that is itself killed, the kernel does the same work: the helper dies by its parent-death
signal, the container's namespaces die with it, and autoclear detaches the loop devices.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import loop
from .cgroup import DeviceCgroup
from .loop.pool import LoopPool
from .loop.sysview import SysView
from .nshelper import NsHelper
from .policy import ContainerInfo, MountRequest, Policy
from .syscalls import pidfd_open


@dataclass(frozen=True)
class MountRecord:
    """A mount the supervisor attached in the container."""

    mnt_id: int
    dev: int
    root_ino: int
    source: str
    target: str
    fstype: str
    loop: int
    read_only: bool
    forced: tuple[str, ...]
    rule: str | None
    slot: int = -1  # the container's own number for the loop device


@dataclass
class Session:
    """One container, from its listener's arrival to its end."""

    name: str
    listener: int
    init_pid: int
    policy: Policy
    log: Any
    mounts: dict[int, MountRecord] = field(default_factory=dict)
    loops: set[int] = field(default_factory=set)
    pidfd: int = -1
    helper: NsHelper | None = None
    pool: LoopPool | None = None
    userns_fd: int = -1
    learned: list[MountRequest] | None = None  # learn mode: every image mount requested
    info: ContainerInfo = field(default_factory=ContainerInfo)  # what policy selectors see
    closed: bool = False
    _dirs: list[int] = field(default_factory=list)

    def start(self, owner: tuple[int, int], cgroups: Sequence[DeviceCgroup]) -> Session:
        """Pin the container's init, start the helper in its mount namespace, set up its loop pool.

        `owner` is the host uid and gid of the container's root; the pool's nodes belong to it.
        Call before the container's command runs: the directories are opened now, while they
        are certainly the ones made for the container.
        """
        self.pidfd = pidfd_open(self.init_pid)
        self.helper = NsHelper.start(self.pidfd)
        self.userns_fd = os.open(f"/proc/{self.init_pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
        root = f"/proc/{self.init_pid}/root"
        dev = self._dir(f"{root}/dev")
        views = [self._dir(f"{root}/sys/{view}") for view in ("block", "class/block", "dev/block")]
        self.pool = LoopPool(
            dev_fd=dev,
            sysview=SysView(*views),
            owner=owner,
            limit=self.policy.limits.loop_devices,
            host_uid=owner[0],
            per_uid_limit=self.policy.limits.loop_devices_per_host_uid,
            cgroups=cgroups,
        )
        self.pool.start()
        return self

    def _dir(self, path: str) -> int:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        self._dirs.append(fd)
        return fd

    def reload(self, policy: Policy) -> None:
        """Use `policy` from the next request on; loop limits apply to devices bound from now on."""
        self.policy = policy
        if self.pool is not None:
            self.pool.per_uid_limit = policy.limits.loop_devices_per_host_uid
            self.pool.limit = policy.limits.loop_devices

    def nshelper(self) -> NsHelper:
        assert self.helper is not None, "session not started"
        return self.helper

    def record_for_dev(self, dev: int) -> MountRecord | None:
        """The supervisor's mount whose superblock is `dev` (any bind of it shares the device)."""
        return next((r for r in self.mounts.values() if r.dev == dev), None)

    def add(self, record: MountRecord) -> None:
        self.mounts[record.mnt_id] = record
        self.loops.add(record.loop)

    def unmounted(self, record: MountRecord) -> None:
        """The supervisor unmounted `record`: forget it, and let an autoclear pool device go."""
        del self.mounts[record.mnt_id]
        if self.pool is not None and not any(m.loop == record.loop for m in self.mounts.values()):
            self.pool.last_use_ended(record.loop)

    def close(self) -> list[int]:
        """Release everything; returns host loop devices that failed to detach in time (a leak).

        Each step runs even if an earlier one failed: a failure is logged, never allowed to
        strand the rest.
        """
        if self.closed:
            return []
        self.closed = True
        self._step("releasing the loop pool", self._close_pool)
        self._step("stopping the namespace helper", self._close_helper)
        for fd in (*self._dirs, self.listener, self.pidfd, self.userns_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._dirs.clear()
        self.listener = self.pidfd = self.userns_fd = -1
        self.mounts.clear()
        # Autoclear runs asynchronously once the namespace's last holder is gone.
        stuck = loop.wait_detached(sorted(self.loops))
        if stuck:
            self.log.error("loop-devices-still-bound", devices=[f"/dev/loop{n}" for n in stuck])
        return stuck

    def _step(self, what: str, action: Callable[[], None]) -> None:
        try:
            action()
        except Exception:
            self.log.exception("cleanup-step-failed", step=what)

    def _close_pool(self) -> None:
        if self.pool is not None:
            pool, self.pool = self.pool, None
            self.loops.update(pool.close(on_error=lambda what: self.log.exception("cleanup-step-failed", step=what)))

    def _close_helper(self) -> None:
        if self.helper is not None:
            helper, self.helper = self.helper, None
            helper.close()
