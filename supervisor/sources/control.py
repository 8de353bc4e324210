"""The control socket: ordinary users hand `serve` the containers they start with `mountwarden run`.

An unprivileged `run` (sources/client.py) makes its container in a user namespace of its own,
loads the filter, and sends `serve` one request, {"op": "adopt", "name", "init_pid"}, with the
listener. `serve` knows the user only by SO_PEERCRED and believes nothing else it says:

- the init must live in a user namespace whose owner is that uid, and its mount namespace must
  be owned by that user namespace: the supervisor acts as host root only in a mount namespace
  the user could have changed anyway, never in the host's or another user's;
- the fd must be a seccomp listener;
- the container is known as `user:<uid>:<name>` and policy sees host_uid = the peer's uid, so a
  user gets only the rules that select that uid and cannot claim another's container.

`serve` puts the init in device cgroups of its own (the user's session may sit in a cgroup that
allows every device) before answering {"ok": true}; the client starts its command only then,
so the pool exists before the command runs and the mount table is recorded first. The
connection stays open for the container's life: its end (the client exits) ends the session.
The socket is world-reachable (0666) unless a group is named.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import select
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from .. import syscalls as s
from ..errors import KernelError
from ..policy import ContainerInfo
from . import sockets

if TYPE_CHECKING:
    from ..daemon import Daemon

DEFAULT_SOCKET: Final = "/run/mountwarden/control.sock"
MAX_CONTAINERS_PER_USER: Final = 16  # each costs helpers, a thread, mounts: an ordinary user gets this many
NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_MAX_MSG: Final = 4096


@dataclass
class _Peer:
    sock: socket.socket
    uid: int
    key: str = ""


class ControlSource:
    """The control socket at `path`, served on the daemon's loop."""

    def __init__(self, daemon: Daemon, path: str, *, gid: int | None = None) -> None:
        self.daemon = daemon
        self._peers: dict[int, _Peer] = {}
        mode = 0o666 if gid is None else 0o660
        self.listener = sockets.Listener(daemon.server, daemon.log, path, socket.SOCK_SEQPACKET, mode, gid, self._admit)

    def close(self) -> None:
        for peer in list(self._peers.values()):
            self._drop(peer)
        self.listener.close()

    def _admit(self, conn: socket.socket) -> None:
        peer = _Peer(conn, sockets.peer(conn)[1])
        self._peers[conn.fileno()] = peer
        self.daemon.server.watch(conn.fileno(), lambda fd, events: self._read(fd))

    def _read(self, fd: int) -> None:
        peer = self._peers[fd]
        try:
            msg, fds, _, _ = socket.recv_fds(peer.sock, _MAX_MSG, 1, socket.MSG_CMSG_CLOEXEC)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            msg, fds = b"", []
        if not msg:  # the client and its container are gone
            self._drop(peer)
            return
        try:
            if peer.key:
                raise KernelError(errno.EBUSY, "one container per connection")
            request = json.loads(msg)
            if not isinstance(request, dict):
                raise KernelError(errno.EINVAL, "a request is one JSON object")
            self._adopt(peer, request, fds)
        except Exception as exc:  # whatever the user sent: a refusal, never a leak or a dead socket
            for extra in fds:
                os.close(extra)
            self.daemon.log.warning("control-request-refused", uid=peer.uid, error=str(exc))
            self._answer(peer, {"ok": False, "error": str(exc)})

    def _adopt(self, peer: _Peer, request: dict[str, Any], fds: list[int]) -> None:
        if request.get("op") != "adopt" or len(fds) != 1:
            raise KernelError(errno.EINVAL, "send {'op': 'adopt', 'name', 'init_pid'} with the listener")
        name, init_pid = str(request["name"]), request["init_pid"]
        if not isinstance(init_pid, int) or isinstance(init_pid, bool) or not 0 < init_pid < 1 << 22:
            raise KernelError(errno.EINVAL, "init_pid is not a pid")
        if not NAME.fullmatch(name):
            raise KernelError(errno.EINVAL, f"the name {name!r} is not up to 63 letters, digits, '.', '_' or '-'")
        if os.readlink(f"/proc/self/fd/{fds[0]}") != "anon_inode:seccomp notify":
            raise KernelError(errno.EINVAL, "the fd sent is not a seccomp listener")
        key = f"user:{peer.uid}:{name}"
        if self.daemon.find(key) is not None:
            raise KernelError(errno.EEXIST, f"you already run a container named {name!r}")
        if self.daemon.count(peer.uid) >= MAX_CONTAINERS_PER_USER:
            raise KernelError(errno.EAGAIN, f"you already run {MAX_CONTAINERS_PER_USER} containers under serve")
        pidfd = pinned_owned(init_pid, peer.uid)
        peer.key = key
        info = ContainerInfo(name=name, host_uid=peer.uid)
        listener = fds.pop()  # the daemon's from here on
        self.daemon.adopt(
            key, init_pid, info, listener, own_cgroups=True, ready=lambda error: self._ready(peer, error), pidfd=pidfd
        )

    def _ready(self, peer: _Peer, error: str | None) -> None:
        self._answer(peer, {"ok": error is None, **({"error": error} if error else {})})

    def _answer(self, peer: _Peer, reply: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):
            peer.sock.send(json.dumps(reply).encode())

    def _drop(self, peer: _Peer) -> None:
        self._peers.pop(peer.sock.fileno(), None)
        self.daemon.server.unwatch(peer.sock.fileno())
        if peer.key:
            self.daemon.forget(peer.key)
        peer.sock.close()


def pinned_owned(pid: int, uid: int) -> int:
    """A pidfd on process `pid`, checked with `check_owned` while pinned: a pid that exits and is
    given to someone else's process meanwhile is caught (the pidfd then says it exited)."""
    try:
        pidfd = s.pidfd_open(pid)
    except KernelError:
        raise KernelError(errno.ESRCH, f"no process {pid}") from None
    try:
        check_owned(pid, uid)
        if select.select([pidfd], [], [], 0)[0]:
            raise KernelError(errno.ESRCH, f"process {pid} exited while it was being checked")
    except BaseException:
        os.close(pidfd)
        raise
    return pidfd


def check_owned(pid: int, uid: int) -> None:
    """KernelError unless process `pid` lives in a user namespace `uid` owns (not the host's) and
    its mount namespace belongs to that user namespace: all the supervisor may act in for `uid`."""
    try:
        userns = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        raise KernelError(errno.ESRCH, f"no process {pid}") from None
    try:
        mine = os.stat("/proc/self/ns/user")
        theirs = os.fstat(userns)
        if (theirs.st_dev, theirs.st_ino) == (mine.st_dev, mine.st_ino):
            raise KernelError(errno.EPERM, f"process {pid} is not in a user namespace of its own")
        if s.ns_get_owner_uid(userns) != uid:
            raise KernelError(errno.EPERM, f"process {pid} is not in a user namespace you own")
        mntns = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        try:
            owner = s.ns_get_userns(mntns)
        finally:
            os.close(mntns)
        try:
            owning = os.fstat(owner)
        finally:
            os.close(owner)
        if (owning.st_dev, owning.st_ino) != (theirs.st_dev, theirs.st_ino):
            raise KernelError(errno.EPERM, f"the mount namespace of process {pid} is not its user namespace's")
    finally:
        os.close(userns)
