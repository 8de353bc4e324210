"""The listening sockets of `serve`'s sources (OCI, LXC, control): made where only root can put
them, and accepted so that running out of fds sheds one connection instead of the socket.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import KernelError

if TYPE_CHECKING:
    from ..server import Server

_reserve = -1  # an fd kept free, to accept and shed connections when serve is out of fds


def listen(path: str, kind: int, mode: int, gid: int | None = None) -> socket.socket:
    """A non-blocking unix socket of `kind` (SOCK_STREAM, SOCK_SEQPACKET) listening at `path`
    with `mode`, group `gid` if given.

    The directory must be root's and writable by root alone: else someone could swap the socket
    file for one of their own. A stale socket left by a killed daemon is replaced; anything else
    at `path`, or a live daemon listening there, is an error.
    """
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, mode=0o755, exist_ok=True)
    st = os.stat(parent)
    if st.st_uid != 0 or st.st_mode & 0o022:
        raise KernelError(errno.EPERM, "the socket's directory must be root's and writable by root alone", parent)
    _remove_stale(path, kind)
    sock = socket.socket(socket.AF_UNIX, kind | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        # bind() gives the new inode the socket's own mode less the umask: set it here rather
        # than change the process-wide umask under running threads.
        os.fchmod(sock.fileno(), 0o600)
        sock.bind(path)
        if gid is not None:
            os.chown(path, 0, gid)
        os.chmod(path, mode)
        sock.listen(64)
    except BaseException:
        sock.close()
        raise
    keep_reserve()
    return sock


class Listener:
    """A listening socket on the daemon's loop: every connection is accepted, made non-blocking
    and handed to `admit`; `close` stops listening and removes the socket file if it is still
    this one's (a successor may have replaced it)."""

    def __init__(
        self, server: Server, log: Any, path: str, kind: int, mode: int, gid: int | None,
        admit: Callable[[socket.socket], None],
    ) -> None:  # fmt: skip
        self.server, self.log, self.path, self._admit = server, log, path, admit
        self.sock = listen(path, kind, mode, gid)
        self._inode = os.stat(path).st_ino
        server.watch(self.sock.fileno(), lambda fd, events: self._accept())

    def close(self) -> None:
        self.server.unwatch(self.sock.fileno())
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        self.sock.close()

    def _accept(self) -> None:
        while (conn := accept(self.sock, self.log)) is not None:
            conn.setblocking(False)
            self._admit(conn)


def _remove_stale(path: str, kind: int) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise KernelError(errno.EEXIST, "something other than a socket is in the way of serve's socket", path)
    with socket.socket(socket.AF_UNIX, kind | socket.SOCK_CLOEXEC) as probe:
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)  # nobody listens: left by a daemon that was killed
            return
        except OSError as exc:
            raise KernelError(exc.errno or errno.EIO, "serve's socket cannot be checked", path) from None
    raise KernelError(errno.EADDRINUSE, "another mountwarden serve listens on this socket", path)


def peer(conn: socket.socket) -> tuple[int, int, int]:
    """SO_PEERCRED: the pid, uid and gid of the process that connected (the kernel's word)."""
    pid, uid, gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return pid, uid, gid


def keep_reserve() -> None:
    """Hold the reserve fd `accept` sheds with: taken when a socket starts listening."""
    global _reserve
    if _reserve < 0:
        _reserve = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)


def accept(sock: socket.socket, log: Any) -> socket.socket | None:
    """The next connection on `sock`, or None when there is none (now).

    Out of fds (EMFILE), the pending connection is accepted on a reserve fd and closed, with a
    log line: else it would wait in the backlog, the loop would wake for it forever, and the
    socket would serve no one.
    """
    global _reserve
    try:
        return sock.accept()[0]
    except (BlockingIOError, InterruptedError, ConnectionAbortedError):
        return None
    except OSError as exc:
        if exc.errno not in (errno.EMFILE, errno.ENFILE):
            raise
    os.close(_reserve)
    with contextlib.suppress(OSError):
        sock.accept()[0].close()
    _reserve = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    log.error("connection-shed", error="serve is out of file descriptors", socket=sock.getsockname())
    return None
