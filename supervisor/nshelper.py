"""The long-lived helper inside a container's mount namespace.

A mount can be attached, unmounted or changed only from inside the namespace that holds it,
and a multithreaded or busy supervisor cannot setns itself, so each container gets one helper,
forked once when its session starts (no fork or exec per request). It is host root in the
container's mount namespace with CAP_SYS_ADMIN only: it never resolves a path the container
gave with host credentials (it works on fds the supervisor resolved; an unmount, which only a
path can name, runs as the container's root), and it never makes a superblock (the minter
does, from the host device itself). For `run`'s containers a mount comes by way of the
staging namespace, where the kernel locks its flags, and the helper attaches a clone of the
copy that propagated in (`Land`, see stager.py). Before the container's
command runs the helper hands the supervisor private copies of the container's /dev and /sys
views (`CloneViews`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import signal
import socket
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Final

import prctl

from . import fdops, helperproc, minter, stager
from . import syscalls as s
from .errors import KernelError
from .helperproc import HelperProcess, Reply


@dataclass(frozen=True)
class Mount:
    """Make a superblock on host loop device `rdev`, shown as /dev/loop`number`, and attach it on fds[0].

    The superblock is made by the minter (below) from a node of `rdev` in its own private
    /dev, never from a path the container could swap; this helper then idmaps the detached
    mount with fds[1] (the container's user namespace) when asked and attaches it.
    Replies with the new mount's id, device and root inode.
    """

    op: ClassVar[str] = "mount"
    idmap: bool
    driver: str
    number: int
    rdev: int
    read_only: bool
    attrs: list[str]
    sb_flags: list[str]
    fs_options: list[str]


@dataclass(frozen=True)
class Attach:
    """Attach the detached mount fds[0] on fds[1], as it is (a view the supervisor made)."""

    op: ClassVar[str] = "attach"


@dataclass(frozen=True)
class FuseMount:
    """Make the FUSE superblock a jailed daemon asked for, detached, with `attrs` set: fds[0] is
    the daemon's /dev/fuse, fds[1] the container's user namespace. Replies with the mount's fd.

    FUSE takes a connection only from a mounter of the user namespace that opened /dev/fuse,
    so the superblock is made by a child that is root of the container's user namespace, as
    the daemon's own mount(2) would have made it; but it is never attached where the daemon
    (or the container, through the daemon) could reach it before its flags are set.
    """

    op: ClassVar[str] = "fuse-mount"
    options: list[str]  # key[=value] for fsconfig, checked by the supervisor
    attrs: int


@dataclass(frozen=True)
class Guard:
    """Take the container's loop devices back if the supervisor dies first (a runtime's container
    outlives it): fds[0] is the pool's node directory (readable), fds[1:] the container's device
    cgroup directories, all opened by the supervisor outside the container's tree.

    The helper then asks for SIGTERM at its parent's death (not SIGKILL) and, on it, denies in
    those cgroups every loop device (block major 7) and /dev/fuse the cgroup lists, and disowns
    and removes every node (fds kept on them open nothing any more): else a device that autoclear
    frees and the host binds again would still be the container's to read.
    """

    op: ClassVar[str] = "guard"
    supervisor: int  # its pid: a parent other than this one means it is gone already


@dataclass(frozen=True)
class Keep:
    """Hold fds[0], host loop device `number` that the pool shows the container, until LetGo.

    If the supervisor dies, the device then stays bound until the guard has disowned its nodes:
    detached first (by its last other opener's close), it could be opened unbound through a
    node not yet disowned, and read once the host binds it again.
    """

    op: ClassVar[str] = "keep"
    number: int


@dataclass(frozen=True)
class LetGo:
    """Close the fd Keep holds on host loop device `number` (its nodes are disowned by now)."""

    op: ClassVar[str] = "let-go"
    number: int


@dataclass(frozen=True)
class Land:
    """Clone the mount in slot `slot` of the landing (fds[0], the container's copy of it), check it
    is on device `dev`, make the clone private and attach it on fds[1]. Replies with its mount id.

    The copy propagated in from staging with its flags locked; the clone keeps the locks, and
    private, nothing later mounted in staging or the landing reaches it.
    """

    op: ClassVar[str] = "land"
    slot: str
    dev: int


@dataclass(frozen=True)
class Unmount:
    """Unmount `path` (in the namespace's terms) with the container root's own credentials.

    The path is walked again, so the kernel must judge it as it would the container's own
    call: the unmount runs as root of the container's user namespace, where MNT_FORCE needs
    a capability the container lacks (EPERM) and only the container's own mounts can go.
    """

    op: ClassVar[str] = "umount"
    path: str
    flags: int


@dataclass(frozen=True)
class SetAttr:
    """Change per-mount attributes of the mount fds[0] refers to (mount_setattr)."""

    op: ClassVar[str] = "setattr"
    attr_set: int
    attr_clr: int


@dataclass(frozen=True)
class Reconfigure:
    """Remount the mount fds[0] refers to, with the container root's own credentials (fds[1] is
    its user namespace): for mounts that are not the supervisor's.

    On the fd the supervisor resolved, never a path walked again: a remount the kernel re-walked
    could meet a mount the container owns the superblock of (a FUSE mount the supervisor
    attached) and take its forced flags. `superblock` reconfigures the filesystem as well
    (MS_REMOUNT without MS_BIND); the per-mount flags are then set as the kernel's remount sets them.
    """

    op: ClassVar[str] = "reconfigure"
    superblock: bool
    read_only: bool
    sb_flags: list[str]
    fs_options: list[str]
    attr_set: int
    attr_clr: int


@dataclass(frozen=True)
class CloneViews:
    """Detached copies of the mounts at `paths` under fds[0] (the container's root), in order.

    Taken once, before the container's command runs: the supervisor writes the container's
    /dev and /sys views in these copies, which no bind or mount the container makes can reach.
    Replies with `missing` (paths that do not exist) and one fd per path that does.
    """

    op: ClassVar[str] = "clone-views"
    paths: list[str]


Request = Mount | Attach | FuseMount | Guard | Keep | LetGo | Land | Unmount | SetAttr | Reconfigure | CloneViews


class NsHelper:
    """Client side of the namespace helper and of the minter that makes its superblocks."""

    def __init__(self, helper: HelperProcess, minter: HelperProcess, stager_: HelperProcess | None = None) -> None:
        self.helper, self.minter, self.stager = helper, minter, stager_
        self._slots = 0  # landing slots used so far: each mount lands in a fresh one

    @property
    def pid(self) -> int:
        return self.helper.pid

    @classmethod
    def start(cls, pidfd: int, staging_pidfd: int = -1, landing_fd: int = -1) -> NsHelper:
        """Fork the minter, the helper moved into the mount namespace of the task behind `pidfd`,
        and, given `staging_pidfd` (the waiter of `run`), the stager in the staging namespace,
        where `landing_fd` is the landing (stager.py)."""
        started: list[HelperProcess] = []
        try:
            started.append(minter.start())
            caps = (prctl.CAP_SYS_ADMIN, prctl.CAP_SETUID, prctl.CAP_SETGID, prctl.CAP_CHOWN)  # CHOWN: Guard
            started.append(HelperProcess.spawn("mw-nshelper", caps, lambda: _enter(pidfd), _OPS, keep=(pidfd,)))
            if staging_pidfd >= 0:
                started.append(stager.start(staging_pidfd, landing_fd))
        except BaseException:
            for proc in started:
                proc.close()
            raise
        return cls(started[1], started[0], started[2] if len(started) > 2 else None)

    def call(self, request: Request, fds: tuple[int, ...] = ()) -> dict[str, Any]:
        """Send one request and wait for its reply; the reply's fields, or KernelError."""
        reply, got = self.helper.call({"op": request.op, **dataclasses.asdict(request)}, fds)
        for fd in got:
            os.close(fd)
        return reply

    def mount(self, request: Mount, target_fd: int, userns_fd: int, landing_fd: int = -1) -> dict[str, Any]:
        """Mint the superblock from the host device, then idmap and attach it on `target_fd`:
        by way of staging given the container's `landing_fd` (flags locked), else directly."""
        minted, got = self.minter.call({"op": "mint", **dataclasses.asdict(request)})
        try:
            if len(got) != 1:
                raise KernelError(errno.EIO, "the minter sent no mount")
            if landing_fd < 0:
                attached = self.call(request, (got[0], target_fd, userns_fd))
            else:
                attached = self.land(got[0], target_fd, landing_fd, minted["dev"], userns_fd if request.idmap else -1)
        finally:
            for fd in got:
                os.close(fd)
        return {**minted, **attached}

    def land(self, mnt_fd: int, target_fd: int, landing_fd: int, dev: int, idmap_userns: int = -1) -> dict[str, Any]:
        """Attach the detached mount `mnt_fd` (on device `dev`) on `target_fd` by way of the staging
        namespace (stager.py), idmapped first given `idmap_userns`. Replies with `mnt_id` and `idmapped`."""
        assert self.stager is not None, "landing needs the staging namespace of `run`"
        self._slots += 1
        slot = str(self._slots)
        fds = (mnt_fd, idmap_userns) if idmap_userns >= 0 else (mnt_fd,)
        staged, _ = self.stager.call({"op": "stage", "slot": slot}, fds)
        try:
            landed = self.call(Land(slot, dev), (landing_fd, target_fd))
        finally:
            self.stager.call({"op": "unstage", "slot": slot})
        return {**staged, **landed}

    def tmpfs(self, name: str, *, devices: bool = False) -> tuple[int, int]:
        """A fresh host-owned tmpfs (see minter.py): an fd to attach, and the supervisor's own copy."""
        _, got = self.minter.call({"op": "tmpfs", "name": name, "devices": devices})
        if len(got) != 2:
            for fd in got:
                os.close(fd)
            raise KernelError(errno.EIO, "the minter sent no tmpfs")
        return got[0], got[1]

    def fuse_mount(self, fuse_fd: int, userns_fd: int, options: list[str], attrs: int) -> int:
        """The detached FUSE mount for a daemon's /dev/fuse `fuse_fd` (see FuseMount)."""
        _, got = self.helper.call(
            {"op": FuseMount.op, **dataclasses.asdict(FuseMount(options, attrs))}, (fuse_fd, userns_fd)
        )
        if len(got) != 1:
            for fd in got:
                os.close(fd)
            raise KernelError(errno.EIO, "the namespace helper sent no FUSE mount")
        return got[0]

    def guard(self, nodes_fd: int, cgroup_dirs: list[int]) -> None:
        """See Guard."""
        self.call(Guard(os.getpid()), (nodes_fd, *cgroup_dirs))

    def keep(self, device_fd: int, number: int) -> None:
        """See Keep."""
        self.call(Keep(number), (device_fd,))

    def let_go(self, number: int) -> None:
        """See LetGo."""
        self.call(LetGo(number))

    def clone_views(self, root_fd: int, paths: list[str]) -> dict[str, int]:
        """Private detached copies of the container's mounts at `paths`; absent ones are left out."""
        reply, got = self.helper.call({"op": CloneViews.op, "paths": paths}, (root_fd,))
        present = [p for p in paths if p not in reply["missing"]]
        if len(got) != len(present):
            for fd in got:
                os.close(fd)
            raise KernelError(errno.EIO, "the namespace helper sent the wrong number of views")
        return dict(zip(present, got, strict=True))

    def close(self, timeout: float = 5.0) -> None:
        """Stop both; the helper's exit drops the last hold on the container's mount namespace."""
        self.helper.close(timeout)
        self.minter.close(timeout)
        if self.stager is not None:
            self.stager.close(timeout)


def _enter(pidfd: int) -> None:  # pragma: no cover - runs in the helper process
    s.setns(pidfd, s.CLONE_NEWNS)
    os.close(pidfd)


def _attach(req: dict[str, Any], fds: list[int]) -> tuple[Reply, list[int]]:  # pragma: no cover - in the helper
    mnt_fd, target_fd, userns_fd = fds
    idmapped = req["idmap"] and stager.idmap(mnt_fd, userns_fd)
    s.move_mount(mnt_fd, target_fd)
    return {"idmapped": idmapped}, []


def _attach_as_is(req: dict[str, Any], fds: list[int]) -> tuple[Reply, list[int]]:  # pragma: no cover - helper
    s.move_mount(fds[0], fds[1])
    return {}, []


def _fuse_mount(req: dict[str, Any], fds: list[int]) -> tuple[Reply, list[int]]:  # pragma: no cover - helper
    fuse_fd, userns_fd = fds

    def make() -> int:
        fsfd = s.fsopen("fuse")
        try:
            s.fsconfig(fsfd, s.FSCONFIG_SET_STRING, "fd", str(fuse_fd))
            for opt in req["options"]:
                key, eq, value = str(opt).partition("=")
                s.fsconfig(fsfd, s.FSCONFIG_SET_STRING if eq else s.FSCONFIG_SET_FLAG, key, value if eq else None)
            s.fsconfig(fsfd, s.FSCONFIG_CMD_CREATE)
            return s.fsmount(fsfd, int(req["attrs"]))
        finally:
            os.close(fsfd)

    return {}, [_as_container_root(userns_fd, make, "FUSE mount")]


_guarded: list[int] = []  # in the helper: Guard's fds
_kept: dict[int, int] = {}  # in the helper: Keep's fds by host device number


def _keep(req: dict[str, Any], fds: list[int]) -> tuple[Reply, list[int]]:  # pragma: no cover - in the helper
    number = int(req["number"])
    if number in _kept:
        os.close(_kept.pop(number))
    _kept[number] = os.dup(fds[0])
    return {}, []


def _let_go(req: dict[str, Any], fds: list[int]) -> tuple[Reply, list[int]]:  # pragma: no cover - in the helper
    fd = _kept.pop(int(req["number"]), -1)
    if fd >= 0:
        os.close(fd)
    return {}, []


def _guard(req: dict[str, Any], fds: list[int]) -> tuple[Reply, list[int]]:  # pragma: no cover - in the helper
    _guarded[:] = [os.dup(fd) for fd in fds]
    helperproc.AT_END.append(_take_back)
    signal.signal(signal.SIGTERM, _orphaned)
    prctl.set_pdeathsig(signal.SIGTERM)
    if os.getppid() != int(req["supervisor"]):  # it died before the death signal was asked for
        _orphaned(signal.SIGTERM, None)
    return {}, []


def _orphaned(signum: int, frame: object) -> None:  # pragma: no cover - in the helper
    _take_back()
    os._exit(0)


def _take_back() -> None:  # pragma: no cover - in the helper
    """The supervisor is gone (or done with the container): deny the pool's devices, remove its nodes."""
    nodes, *groups = _guarded
    for group in groups:
        with contextlib.suppress(OSError):
            with open(os.open("devices.list", os.O_RDONLY | os.O_CLOEXEC, dir_fd=group)) as f:
                granted = [" ".join(line.split()[:2]) for line in f if line.startswith(("b 7:", "c 10:229 "))]
            # Each grant the cgroup lists (an allow list removes only exact entries), and the
            # whole of both, for a cgroup that allows every device by default.
            for rule in (*granted, "b 7:*", "c 10:229"):
                deny = os.open("devices.deny", os.O_WRONLY | os.O_CLOEXEC, dir_fd=group)
                try:
                    with contextlib.suppress(OSError):
                        os.write(deny, f"{rule} rwm".encode())
                finally:
                    os.close(deny)
    _remove_all(nodes)
    for fd in _kept.values():  # only now may the devices detach
        os.close(fd)
    _kept.clear()


def _remove_all(dir_fd: int) -> None:  # pragma: no cover - in the helper
    for name in os.listdir(dir_fd):
        with contextlib.suppress(OSError):
            if stat.S_ISDIR(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
                sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
                try:
                    _remove_all(sub)
                finally:
                    os.close(sub)
                os.rmdir(name, dir_fd=dir_fd)
            else:
                _disown(dir_fd, name)
                os.unlink(name, dir_fd=dir_fd)


def _disown(dir_fd: int, name: str) -> None:  # pragma: no cover - in the helper
    """A device node goes host root's before it goes: see LoopPool on nodes kept by O_PATH fds."""
    fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        if stat.S_ISBLK(os.fstat(fd).st_mode):
            fdops.disown(fd)
    finally:
        os.close(fd)


def _land(req: dict[str, Any], fds: list[int]) -> tuple[Reply, list[int]]:  # pragma: no cover - in the helper
    landing_fd, target_fd = fds
    clone = fdops.clone_tree(landing_fd, str(req["slot"]), recursive=False)
    try:
        if fdops.identity(clone)[1] != int(req["dev"]):
            raise KernelError(errno.EXDEV, "the landed mount is not on the expected device")
        s.mount_setattr(clone, 0, 0, propagation=s.MS_PRIVATE)
        s.move_mount(clone, target_fd)
        mnt_id = fdops.identity(clone)[0]  # a FUSE mount refuses host root the mask mount_id asks for
    finally:
        os.close(clone)
    return {"mnt_id": mnt_id}, []


def _umount(req: dict[str, Any], fds: list[int]) -> tuple[Reply, list[int]]:  # pragma: no cover - in the helper
    """umount2 in a child that is root of the container's user namespace (fds[0]), nothing more."""
    (userns_fd,) = fds
    path, flags = str(req["path"]), int(req["flags"])

    def unmount() -> None:
        s.umount2(path, flags | s.UMOUNT_NOFOLLOW)

    _as_container_root(userns_fd, unmount, "unmount", path)
    return {}, []


def _reconfigure(req: dict[str, Any], fds: list[int]) -> tuple[Reply, list[int]]:  # pragma: no cover - in helper
    mnt_fd, userns_fd = fds

    def remount() -> None:
        if req["superblock"]:
            fsfd = s.fspick(mnt_fd)
            try:
                s.fsconfig(fsfd, s.FSCONFIG_SET_FLAG, "ro" if req["read_only"] else "rw")
                for flag in req["sb_flags"]:
                    s.fsconfig(fsfd, s.FSCONFIG_SET_FLAG, flag)
                for opt in req["fs_options"]:
                    key, eq, value = str(opt).partition("=")
                    s.fsconfig(fsfd, s.FSCONFIG_SET_STRING if eq else s.FSCONFIG_SET_FLAG, key, value if eq else None)
                s.fsconfig(fsfd, s.FSCONFIG_CMD_RECONFIGURE)
            finally:
                os.close(fsfd)
        s.mount_setattr(mnt_fd, req["attr_set"], req["attr_clr"])

    _as_container_root(userns_fd, remount, "remount")
    return {}, []


def _as_container_root(
    userns_fd: int, action: Callable[[], int | None], what: str, path: str | None = None
) -> int:  # pragma: no cover - in the helper
    """Run `action` in a child that is root of the container's user namespace and nothing more,
    so the kernel judges it exactly as the container's own call; its errno becomes ours. An fd
    `action` returns comes back to the helper (-1 if it returns None)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:
        try:
            ours.close()
            s.setns(userns_fd, s.CLONE_NEWUSER)
            if os.getgroups():  # none since spawn (helperproc); an ordinary user's namespace denies setgroups
                os.setgroups([])
            os.setresgid(0, 0, 0)
            os.setresuid(0, 0, 0)
            made = action()
            socket.send_fds(theirs, [b"0"], [] if made is None else [made])
        except OSError as exc:
            with contextlib.suppress(OSError):
                theirs.send(str(exc.errno or errno.EIO).encode())
        finally:
            os._exit(0)
    theirs.close()
    try:
        msg, got, _, _ = socket.recv_fds(ours, 16, 1)
    finally:
        ours.close()
        os.waitpid(pid, 0)
    err = int(msg) if msg.isdigit() else errno.EIO
    if err:
        for fd in got:
            os.close(fd)
        raise KernelError(err, f"the kernel refused the {what}", path)
    return got[0] if got else -1


def _setattr(req: dict[str, Any], fds: list[int]) -> tuple[Reply, list[int]]:  # pragma: no cover - in the helper
    """mount_setattr; a read-only flag the kernel locked stays, as the read-only superblock under it does.

    The kernel locks the flags a mount had when it propagated in from staging (stager.py),
    against host root too: ro when the superblock is read-only (mountopts sets both), nosuid,
    nodev, noexec, and the atime mode. A bind-remount that only drops ro keeps working (the
    superblock stays read-only either way); clearing any other locked flag is refused.
    """
    attr_set, attr_clr = int(req["attr_set"]), int(req["attr_clr"])
    try:
        s.mount_setattr(fds[0], attr_set, attr_clr)
    except KernelError as exc:
        if exc.errno != errno.EPERM:
            raise
        if not attr_clr & s.MOUNT_ATTR_RDONLY:
            raise KernelError(errno.EPERM, _LOCKED) from None
        try:
            s.mount_setattr(fds[0], attr_set, attr_clr & ~s.MOUNT_ATTR_RDONLY)
        except KernelError:
            raise KernelError(errno.EPERM, _LOCKED) from None
    return {}, []


_LOCKED: Final = (
    "the kernel locked this mount's flags (it reached the container from mountwarden's staging namespace): "
    "nosuid, nodev, noexec and ro given at mount time, and its atime mode, stay as they are"
)


def _clone_views(req: dict[str, Any], fds: list[int]) -> tuple[Reply, list[int]]:  # pragma: no cover - in the helper
    (root_fd,) = fds
    missing: list[str] = []
    out: list[int] = []
    try:
        for path in req["paths"]:
            try:
                out.append(fdops.clone_tree(root_fd, path))
            except KernelError as exc:
                if exc.errno != errno.ENOENT:
                    raise
                missing.append(path)
    except BaseException:
        for fd in out:
            os.close(fd)
        raise
    return {"missing": missing}, out


_OPS: Final = {
    Mount.op: _attach, Attach.op: _attach_as_is, FuseMount.op: _fuse_mount, Guard.op: _guard, Land.op: _land,
    Keep.op: _keep, LetGo.op: _let_go,
    Unmount.op: _umount, SetAttr.op: _setattr, Reconfigure.op: _reconfigure, CloneViews.op: _clone_views,
}  # fmt: skip
