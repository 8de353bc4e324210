"""The long-lived helper inside a container's mount namespace.

A mount can be attached, unmounted or changed only from inside the namespace that holds it,
and a multithreaded or busy supervisor cannot setns itself, so each container gets one helper,
forked once when its session starts (no fork or exec per request). It is host root in the
container's mount namespace and nothing else: it never resolves a path the container gave
(the supervisor hands it fds it already resolved), and it dies with the supervisor (parent
death signal). Requests and replies are typed messages over a SOCK_SEQPACKET pair; fds travel
with SCM_RIGHTS.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import signal
import socket
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Final

from . import mounting
from . import syscalls as s
from .errors import KernelError
from .mountopts import MountOptions

_MAX_MSG: Final = 65536


@dataclass(frozen=True)
class Mount:
    """Mount the block device `source` (a path in the container) on the directory fds[0].

    The superblock is created here, in the container's mount namespace but with host root's
    credentials, so mountinfo names the device as the container does. `source` is a path the
    container could swap, so the new superblock's device must be `expected_dev`, or nothing
    is attached. Replies with the new mount's id, device and root inode.
    """

    op: ClassVar[str] = "mount"
    idmap: bool  # fds[1] is the container's user namespace: map the mount's ids through it
    driver: str
    source: str
    expected_dev: int
    read_only: bool
    attrs: list[str]
    sb_flags: list[str]
    fs_options: list[str]


@dataclass(frozen=True)
class Unmount:
    """Unmount `path` (in the namespace's terms) if it is still the mount `mnt_id`."""

    op: ClassVar[str] = "umount"
    path: str
    flags: int
    mnt_id: int


@dataclass(frozen=True)
class SetAttr:
    """Change per-mount attributes of the mount fds[0] refers to (mount_setattr)."""

    op: ClassVar[str] = "setattr"
    attr_set: int
    attr_clr: int


Request = Mount | Unmount | SetAttr


class NsHelper:
    """Client side of the helper; `call` raises KernelError with the helper's errno."""

    def __init__(self, pid: int, sock: socket.socket) -> None:
        self.pid = pid
        self.sock = sock

    @classmethod
    def start(cls, pidfd: int) -> NsHelper:
        """Fork the helper and move it into the mount namespace of the task behind `pidfd`."""
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        supervisor = os.getpid()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the helper process
            try:
                parent.close()
                s.prctl(s.PR_SET_PDEATHSIG, signal.SIGKILL)
                if os.getppid() != supervisor:
                    os._exit(1)
                s.setns(pidfd, s.CLONE_NEWNS)
                # Hold nothing of the supervisor's: a stray loop fd would keep a device bound.
                os.closerange(3, child.fileno())
                os.closerange(child.fileno() + 1, os.sysconf("SC_OPEN_MAX"))
                _serve(child)
            finally:
                os._exit(0)
        child.close()
        helper = cls(pid, parent)
        return helper

    def call(self, request: Request, fds: tuple[int, ...] = ()) -> dict[str, Any]:
        """Send one request and wait for its reply; the reply's fields, or KernelError."""
        payload = {"op": request.op, **dataclasses.asdict(request)}
        socket.send_fds(self.sock, [json.dumps(payload).encode()], list(fds))
        reply: dict[str, Any] = json.loads(self.sock.recv(_MAX_MSG) or b'{"errno": 5, "error": "helper exited"}')
        if reply["errno"]:
            raise KernelError(reply["errno"], reply["error"])
        return reply

    def close(self, timeout: float = 5.0) -> None:
        """Stop the helper; its exit drops the last hold on the container's mount namespace."""
        if self.pid <= 0:
            return
        self.sock.close()
        _reap(self.pid, timeout)
        self.pid = -1


def _reap(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return
        time.sleep(0.005)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def _serve(sock: socket.socket) -> None:  # pragma: no cover - runs in the helper process
    while True:
        msg, fds, _flags, _addr = socket.recv_fds(sock, _MAX_MSG, 4)
        if not msg:
            return
        try:
            request: dict[str, Any] = json.loads(msg)
            reply: dict[str, Any] = {"errno": 0, "error": "", **_OPS[request.pop("op")](request, fds)}
        except KernelError as exc:
            reply = {"errno": exc.errno or errno.EIO, "error": exc.what}
        except OSError as exc:
            reply = {"errno": exc.errno or errno.EIO, "error": str(exc)}
        except Exception as exc:  # a bug must still produce an answer, never a hang
            reply = {"errno": errno.EIO, "error": f"helper error: {exc!r}"}
        finally:
            for fd in fds:
                os.close(fd)
        sock.send(json.dumps(reply).encode())


def _mount(req: dict[str, Any], fds: list[int]) -> dict[str, Any]:
    opts = MountOptions(req["read_only"], frozenset(req["attrs"]), tuple(req["sb_flags"]), tuple(req["fs_options"]))
    mnt = mounting.create(req["driver"], req["source"], opts)
    try:
        if mnt.dev != req["expected_dev"]:
            raise KernelError(errno.EXDEV, "the device node changed while it was being mounted", req["source"])
        idmapped = req["idmap"] and _idmap(mnt.fd, fds[1])
        s.move_mount(mnt.fd, fds[0])
    finally:
        mnt.close()
    return {"mnt_id": mnt.mnt_id, "dev": mnt.dev, "root_ino": mnt.root_ino, "idmapped": idmapped}


def _idmap(mnt_fd: int, userns_fd: int) -> bool:
    """Idmap the detached mount; False where the filesystem does not support idmapped mounts."""
    try:
        s.mount_setattr(mnt_fd, s.MOUNT_ATTR_IDMAP, 0, userns_fd)
    except KernelError as exc:
        if exc.errno == errno.EINVAL:  # the filesystem lacks FS_ALLOW_IDMAP
            return False
        raise
    return True


def _umount(req: dict[str, Any], fds: list[int]) -> dict[str, Any]:
    path = req["path"]
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if s.mount_id(fd) != req["mnt_id"]:
            raise KernelError(errno.EINVAL, "the mount point changed before it could be unmounted", path)
    finally:
        os.close(fd)
    s.umount2(path, req["flags"] | s.UMOUNT_NOFOLLOW)
    return {}


def _setattr(req: dict[str, Any], fds: list[int]) -> dict[str, Any]:
    s.mount_setattr(fds[0], req["attr_set"], req["attr_clr"])
    return {}


_OPS: Final = {Mount.op: _mount, Unmount.op: _umount, SetAttr.op: _setattr}
