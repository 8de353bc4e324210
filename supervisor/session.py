"""The per-container owner: everything made for one container is released here, in one place.

A Session holds the container's listener fd, a pidfd on its init, the namespace helper, the
mounts it made and the host loop devices behind them. `close` is idempotent and runs however
the container ended (normal exit, SIGKILL, or the supervisor shutting down); for a supervisor
that is itself killed, the kernel does the same work: the helper dies by its parent-death
signal, the container's namespaces die with it, and autoclear detaches the loop devices.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import select
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from . import adopted, fdops, idmap, loop, mountinfo, stager
from .audit import AuditLimiter
from .cgroup import DeviceCgroup
from .errors import KernelError
from .fuse import FuseDaemon
from .loop.pool import Keeper, LoopPool
from .loop.sysview import SysView
from .nshelper import NsHelper
from .origin import Tree
from .policy import ContainerInfo, MountRequest, Policy
from .seccomp import notify
from .syscalls import pidfd_open

_DEV_VIEW: Final = "dev"
_SYS_VIEWS: Final = ("sys/block", "sys/class/block", "sys/dev/block")


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
    mounts: dict[int, MountRecord] = field(default_factory=dict)  # mount id of the original -> record
    superblocks: dict[int, MountRecord] = field(default_factory=dict)  # st_dev -> record, see `sweep`
    loops: set[int] = field(default_factory=set)
    pidfd: int = -1
    helper: NsHelper | None = None
    pool: LoopPool | None = None
    userns_fd: int = -1
    mntns: tuple[int, int] = (-1, -1)  # the container's mount namespace (st_dev, st_ino): the only one served
    learned: list[MountRequest] | None = None  # learn mode: every image mount requested
    info: ContainerInfo = field(default_factory=ContainerInfo)  # what policy selectors see
    owner: tuple[int, int] = (0, 0)  # host uid and gid of the container's root
    cgroup_paths: list[str] = field(default_factory=list)
    own_cgroups: list[DeviceCgroup] = field(default_factory=list)  # made for it by `serve`, removed at close
    daemons: dict[int, FuseDaemon] = field(default_factory=dict)  # mount id -> the FUSE daemon serving it
    fuse_starting: FuseDaemon | None = None  # the daemon whose mount(2) is awaited (handlers/mount.py)
    extra_listeners: list[int] = field(default_factory=list)  # of processes a runtime exec'd into it
    tree_at_start: Tree | None = None  # mounts before the command ran: what "the host's file" means
    landing: int = -1  # the container's landing directory, for `run`'s containers (stager.py)
    closed: bool = False
    _dirs: list[int] = field(default_factory=list)
    audit: AuditLimiter = field(init=False)  # the container's share of the audit log

    def __post_init__(self) -> None:
        self.audit = AuditLimiter(self.log)

    def start(self, owner: tuple[int, int], cgroups: Sequence[DeviceCgroup], staging_pid: int = -1) -> Session:
        """Set up `run`'s container: pin its init, start the helpers, set up its loop pool.

        `owner` is the host uid and gid of the container's root; the pool's nodes belong to it.
        `staging_pid` is `run`'s waiter (a child of ours, so the pid is stable until we reap
        it): the stager joins its mount namespace, and mounts land by way of it with locked
        flags (stager.py); the waiter's working directory is the landing there.
        Call before the container's command runs: the directories are opened now, while they
        are certainly the ones made for the container.
        """
        with contextlib.ExitStack() as stack:
            staging = landing = -1
            if staging_pid > 0:
                staging = _closing(stack, pidfd_open(staging_pid))
                landing = _closing(stack, _landing(f"/proc/{staging_pid}/cwd"))
            self._begin(owner, cgroups, staging, landing)
            root = _closing(stack, os.open(f"/proc/{self.init_pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))
            if landing >= 0:
                self.landing = _landing(stager.LANDING, root)
                if _inode(self.landing) != _inode(landing):
                    raise KernelError(errno.EXDEV, "the container's landing is not the staging one", stager.LANDING)
            # The pool works in private copies of these mounts: a dirfd on the container's own
            # mount would still walk into binds the container puts over names below it.
            clones = self.nshelper().clone_views(root, [_DEV_VIEW, *_SYS_VIEWS])
        self._dirs.extend(clones.values())
        if _DEV_VIEW not in clones or _SYS_VIEWS[0] not in clones:
            raise KernelError(errno.ENOENT, "the container has no /dev or /sys/block of its own to manage")
        views = [clones.get(view) for view in _SYS_VIEWS]
        self._open_pool(clones[_DEV_VIEW], SysView(clones[_SYS_VIEWS[0]], views[1], views[2]), cgroups)
        return self

    def adopt(self, cgroups: Sequence[DeviceCgroup]) -> Session:
        """Set up a container a runtime made (adopted.py): helpers, the pool's views, the pool.

        The container may already run: the runtime hands over its listener as it starts it.
        """
        owner = idmap.root_of(self.init_pid)
        user_owned = self.info.host_uid is not None  # an ordinary user's (sources/control.py, oci --oci-users)
        if self.info.host_uid is None:  # else the peer's uid, which policy selects on (sources/control.py)
            self.info = dataclasses.replace(self.info, host_uid=owner[0])
        self._begin(owner, cgroups)
        limit = self.policy.limits.loop_devices
        names = ["loop-control", *(f"loop{n}" for n in range(limit))]
        self.check_alive()
        kept, sysview = adopted.views(self.nshelper(), self.init_pid, owner, names, self.check_alive)
        self._dirs.extend(kept)
        self._open_pool(kept[0], sysview, cgroups, keeper=self.nshelper(), user_owned=user_owned)
        with contextlib.ExitStack() as stack:
            nodes = _closing(stack, os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=kept[0]))
            groups = [_closing(stack, os.open(g.path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)) for g in cgroups]
            self.nshelper().guard(nodes, groups)  # the container outlives us: see nshelper.Guard
        return self

    def _begin(
        self, owner: tuple[int, int], cgroups: Sequence[DeviceCgroup], staging: int = -1, landing: int = -1
    ) -> None:
        self.owner = owner
        self.cgroup_paths = [group.path for group in cgroups]
        for listener in self.listeners():
            notify.set_sync_wakeup(listener)
        if self.pidfd < 0:
            self.pidfd = pidfd_open(self.init_pid)
        self.tree_at_start = Tree.take(self.init_pid)
        self.helper = NsHelper.start(self.pidfd, staging, landing)
        self.userns_fd = os.open(f"/proc/{self.init_pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
        mntns = os.stat(f"/proc/{self.init_pid}/ns/mnt")
        self.mntns = (mntns.st_dev, mntns.st_ino)
        self.check_alive()  # so what was opened by pid above is the init's, not a reused pid's

    def check_alive(self) -> None:
        """KernelError once the init has exited: a pid read after that may be someone else's."""
        if select.select([self.pidfd], [], [], 0)[0]:
            raise KernelError(errno.ESRCH, "the container's init exited while it was being set up")

    def _open_pool(
        self, dev: int, sysview: SysView, cgroups: Sequence[DeviceCgroup], keeper: Keeper | None = None,
        user_owned: bool = False,
    ) -> None:
        self.pool = LoopPool(
            dev_fd=dev,
            sysview=sysview,
            owner=self.owner,
            limit=self.policy.limits.loop_devices,
            host_uid=self.owner[0] if self.info.host_uid is None else self.info.host_uid,
            per_uid_limit=self.policy.limits.loop_devices_per_host_uid,
            cgroups=cgroups,
            keeper=keeper,
            user_owned=user_owned,
        )
        self.pool.start()

    def reload(self, policy: Policy) -> None:
        """Use `policy` from the next request on; loop limits apply to devices bound from now on."""
        self.policy = policy
        if self.pool is not None:
            self.pool.per_uid_limit = policy.limits.loop_devices_per_host_uid
            self.pool.limit = policy.limits.loop_devices

    def listeners(self) -> list[int]:
        """The container's listeners: its init's, and those of processes exec'd into it (none
        where a runtime's proxy forwards each notification: LXC)."""
        return [fd for fd in (self.listener, *self.extra_listeners) if fd >= 0]

    def nshelper(self) -> NsHelper:
        assert self.helper is not None, "session not started"
        return self.helper

    def record_for_dev(self, dev: int) -> MountRecord | None:
        """The supervisor's mount whose superblock is `dev`, also through binds and moves of it.

        Kept after the original is unmounted while a bind of it is left, so a remount of that
        bind still gets the rule's forced flags.
        """
        return self.superblocks.get(dev)

    def add(self, record: MountRecord) -> None:
        self.mounts[record.mnt_id] = record
        self.superblocks[record.dev] = record
        self.loops.add(record.loop)

    def unmounted(self, record: MountRecord) -> None:
        """The supervisor unmounted `record`; its superblock is forgotten only once nothing holds it."""
        self.mounts.pop(record.mnt_id, None)
        daemon = self.daemons.pop(record.mnt_id, None)
        if daemon is not None:
            daemon.stop()
            daemon.close()
        self.sweep()

    def loop_in_use(self, host_number: int) -> bool:
        """Whether a mount in the container still shows a superblock made on `host_number`."""
        live = self.sweep()
        return any(r.loop == host_number and r.dev in live for r in self.superblocks.values())

    def sweep(self) -> set[int]:
        """Forget superblocks no mount in the container's namespace shows any more; free their slots.

        The container may bind, move or unmount (natively: binds are not the supervisor's)
        what the supervisor mounted, so its records follow the superblock (st_dev), not the
        mount. A superblock none of the container's mounts shows (mountinfo) may still live in
        a namespace the container made: its record stays while the pool still holds its loop
        device (bound or retired), so a remount there keeps the forced flags too. Returns the
        devices of the container's mounts.
        """
        if not self.superblocks:
            return set()
        live = self._live_devs()
        for dev, record in list(self.superblocks.items()):
            if dev in live:
                continue
            self.mounts.pop(record.mnt_id, None)  # the original went with a parent (MNT_DETACH)
            if record.loop >= 0 and self.pool is not None:
                self.pool.last_use_ended(record.loop)
            if record.loop < 0 or self.pool is None or not self.pool.holds(record.loop):
                del self.superblocks[dev]
        return live

    def _live_devs(self) -> set[int]:
        try:
            with open(f"/proc/{self.init_pid}/mountinfo") as f:
                text = f.read()
        except OSError:  # the container is gone, and its mounts with it
            return set()
        devs = set()
        for line in text.splitlines():
            fields = line.split(" ", 3)
            if len(fields) > 2 and ":" in fields[2]:
                major, minor = fields[2].split(":", 1)
                devs.add(os.makedev(int(major), int(minor)))
        return devs

    def close(self) -> list[int]:
        """Release everything; returns host loop devices that failed to detach in time (a leak).

        Each step runs even if an earlier one failed: a failure is logged, never allowed to
        strand the rest.
        """
        if self.closed:
            return []
        self.closed = True
        self.audit.flush()
        for daemon in self.daemons.values():
            daemon.stop()
            daemon.close()
        self.daemons.clear()
        pool = self.pool
        self._step("releasing the loop pool", self._close_pool)
        self._step("stopping the namespace helper", self._close_helper)
        while self.own_cgroups:
            self._step("removing a device cgroup", self.own_cgroups.pop().remove)
        for fd in (*self._dirs, *self.listeners(), self.pidfd, self.userns_fd, self.landing):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._dirs.clear()
        self.extra_listeners.clear()
        self.listener = self.pidfd = self.userns_fd = self.landing = -1
        self.mounts.clear()
        self.superblocks.clear()
        # Autoclear runs asynchronously once the namespace's last holder is gone.
        stuck = loop.wait_detached(sorted(self.loops))
        if stuck:
            self.log.error("loop-devices-still-bound", devices=[f"/dev/loop{n}" for n in stuck])
        if pool is not None:
            pool.settle()  # the quota of what did detach goes back; the stuck keep theirs
            pool.hand_over()
        return stuck

    def add_daemon(self, record: MountRecord, daemon: FuseDaemon) -> None:
        """Track a FUSE mount and its daemon (which ends by itself once its last mount is gone)."""
        self.mounts[record.mnt_id] = record
        self.superblocks[record.dev] = record
        self.daemons[record.mnt_id] = daemon

    def reap_daemons(self) -> None:
        """Forget FUSE daemons that ended; one that died under a live mount is an error to log.

        The container may unmount a FUSE mount itself (it belongs to its user namespace), and
        the daemon then exits by itself: that is the normal end, not a failure.
        """
        exited = {m: d for m, d in self.daemons.items() if not d.alive()}
        if not exited:
            return
        try:
            with open(f"/proc/{self.init_pid}/mountinfo") as f:
                live = set(mountinfo.parse(f.read()))
        except OSError:  # the container is gone, and its mounts with it
            live = set()
        for mnt_id, daemon in exited.items():
            record = self.mounts.pop(mnt_id, None)
            if mnt_id in live:
                self.log.error(
                    "fuse-daemon-exited", daemon=daemon.name, pid=daemon.pid,
                    target=record.target if record else None,
                    effect="the mount now fails with ENOTCONN until it is unmounted",
                )  # fmt: skip
            daemon.close()
            del self.daemons[mnt_id]

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


def _closing(stack: contextlib.ExitStack, fd: int) -> int:
    stack.callback(os.close, fd)
    return fd


def _landing(path: str, dir_fd: int | None = None) -> int:
    """An O_PATH fd on a landing directory (stager.py), checked to be host root's and closed to others.

    Opened before the container's command runs, so no process of the container has had a
    chance to change the tree; the checks only make a mistake in the set-up loud.
    """
    if dir_fd is None:
        fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    else:
        fd = fdops.openat2(dir_fd, path, os.O_PATH | os.O_DIRECTORY, fdops.RESOLVE_BENEATH | fdops.RESOLVE_NO_SYMLINKS)
    st = os.fstat(fd)
    if st.st_uid != 0 or stat.S_IMODE(st.st_mode) != 0o700:
        os.close(fd)
        raise KernelError(errno.EPERM, "the landing directory is not host root's alone", path)
    return fd


def _inode(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino
