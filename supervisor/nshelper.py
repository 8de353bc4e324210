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

from . import syscalls as s
from .errors import KernelError

_MAX_MSG: Final = 65536


@dataclass(frozen=True)
class Attach:
    """Attach the detached mount fds[0] onto the directory fds[1]."""

    op: ClassVar[str] = "attach"


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


Request = Attach | Unmount | SetAttr


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

    def call(self, request: Request, fds: tuple[int, ...] = ()) -> None:
        payload = {"op": request.op, **dataclasses.asdict(request)}
        socket.send_fds(self.sock, [json.dumps(payload).encode()], list(fds))
        reply = json.loads(self.sock.recv(_MAX_MSG) or b'{"errno": 5, "error": "helper exited"}')
        if reply["errno"]:
            raise KernelError(reply["errno"], reply["error"])

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
            _OPS[request.pop("op")](request, fds)
            reply: dict[str, Any] = {"errno": 0, "error": ""}
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


def _attach(req: dict[str, Any], fds: list[int]) -> None:
    s.move_mount(fds[0], fds[1])


def _umount(req: dict[str, Any], fds: list[int]) -> None:
    path = req["path"]
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if s.mount_id(fd) != req["mnt_id"]:
            raise KernelError(errno.EINVAL, "the mount point changed before it could be unmounted", path)
    finally:
        os.close(fd)
    s.umount2(path, req["flags"] | s.UMOUNT_NOFOLLOW)


def _setattr(req: dict[str, Any], fds: list[int]) -> None:
    s.mount_setattr(fds[0], req["attr_set"], req["attr_clr"])


_OPS: Final = {Attach.op: _attach, Unmount.op: _umount, SetAttr.op: _setattr}
