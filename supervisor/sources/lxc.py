"""LXC's seccomp notify proxy (``lxc.seccomp.notify.proxy``): wire format, socket, merged profile.

LXC's monitor (5.0.2) receives its container's notifications itself and forwards each one over
one SOCK_SEQPACKET connection per container: a 32-byte header, the 80-byte ``seccomp_notif``,
the 24-byte prefilled ``seccomp_notif_resp`` and the cookie, with three fds (``/proc/<pid>``,
its ``mem``, and the listener, which the supervisor uses only for ID_VALID). The answer is
exactly header + notif + resp, no fds; the monitor then does the SEND. Processes that
``lxc-attach`` into the container arrive on the same connection with their own listener.

Every message is checked before anything in it is believed: the struct sizes against this
kernel's (SECCOMP_GET_NOTIF_SIZES), the reserved field, the exact length, and three fds of the
right kinds. A message that fails is answered with an empty datagram, which makes LXC answer
ENOSYS at once rather than after its 30 s timeout, and a warning says why.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import stat
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final, Protocol

from .. import audit, dispatch, idmap
from ..errors import KernelError
from ..policy import ContainerInfo
from ..seccomp import filter as seccomp_filter
from ..seccomp import notify
from ..server import Server
from ..session import Session
from ..syscalls import MNT_FORCE
from . import sockets

# struct seccomp_notify_proxy_msg (lxc src/lxc/lxcseccomp.h): u64 __reserved; pid_t monitor_pid,
# init_pid; struct seccomp_notif_sizes {u16 notif, resp, data}; 2 bytes padding; u64 cookie_len.
HEADER: Final = struct.Struct("=QiiHHHxxQ")
MESSAGE_SIZE: Final = HEADER.size + notify.NOTIF.size + notify.RESP.size  # 136, and exactly the reply's size
SIZES: Final = (notify.NOTIF.size, notify.RESP.size, notify.SECCOMP_DATA_SIZE)
MAX_COOKIE: Final = 4096  # LXC sets no bound; a cookie names a container
FDS: Final = 3
# The monitor gives up after 30 s (lxc_socket_set_timeout(fd, 30, 30)) and answers ENOSYS, but
# still reads the next reply as the answer to its *next* request: a reply later than this is
# dropped, never sent.
REPLY_DEADLINE: Final = 25.0
_FD_KINDS: Final = (("/proc/<pid>", stat.S_IFDIR), ("/proc/<pid>/mem", stat.S_IFREG), ("the listener", 0))
_LISTENER_LINK: Final = "anon_inode:seccomp notify"


class Refused(KernelError):
    """A message that is not what LXC's monitor sends; the sentence says what is wrong with it."""

    def __init__(self, what: str) -> None:
        super().__init__(errno.EPROTO, what)


@dataclass(frozen=True)
class Message:
    """One forwarded notification, checked. `listener` is borrowed from the `Received` it came in."""

    header: bytes  # echoed in the reply
    raw_notif: bytes
    notif: notify.Notification
    monitor_pid: int
    init_pid: int
    cookie: str
    listener: int


@dataclass
class Received:
    """A datagram as it arrived, owning the fds it carried until `close` (idempotent)."""

    data: bytes
    fds: list[int]
    flags: int = 0
    arrived: float = field(default_factory=time.monotonic)

    def close(self) -> None:
        while self.fds:
            with contextlib.suppress(OSError):
                os.close(self.fds.pop())


def receive(sock: socket.socket) -> Received | None:
    """Take one datagram and its fds (close-on-exec); None if nothing is pending."""
    try:
        data, fds, flags, _ = socket.recv_fds(sock, MESSAGE_SIZE + MAX_COOKIE, FDS, socket.MSG_CMSG_CLOEXEC)
    except (BlockingIOError, InterruptedError):
        return None
    return Received(data, list(fds), flags)


def decode(received: Received) -> Message:
    """The message in `received`, or Refused saying why it is not one of LXC's."""
    if received.flags & socket.MSG_TRUNC:
        raise Refused(f"the message is longer than {MESSAGE_SIZE + MAX_COOKIE} bytes (a cookie over {MAX_COOKIE})")
    if received.flags & socket.MSG_CTRUNC:
        raise Refused(f"the message carries more than {FDS} fds")
    data = received.data
    if len(data) < MESSAGE_SIZE:
        raise Refused(f"a {len(data)}-byte message is shorter than header, notification and response ({MESSAGE_SIZE})")
    reserved, monitor_pid, init_pid, *sizes, cookie_len = HEADER.unpack_from(data)
    if reserved != 0:
        raise Refused("the header's reserved field is not zero")
    if tuple(sizes) != SIZES:
        raise Refused(f"the message's seccomp struct sizes {tuple(sizes)} are not this kernel's {SIZES}")
    if len(data) != MESSAGE_SIZE + cookie_len:
        raise Refused(f"a {len(data)}-byte message does not hold {MESSAGE_SIZE} bytes and a {cookie_len}-byte cookie")
    if monitor_pid <= 0 or init_pid <= 0:
        raise Refused(f"the header names no monitor or init (pids {monitor_pid}, {init_pid})")
    raw_notif = data[HEADER.size : HEADER.size + notify.NOTIF.size]
    notif = notify.decode(raw_notif)
    (resp_id,) = struct.unpack_from("=Q", data, HEADER.size + notify.NOTIF.size)
    if resp_id != notif.id:
        raise Refused(f"the prefilled response's id {resp_id} is not the notification's {notif.id}")
    try:
        cookie = data[MESSAGE_SIZE:].decode()
    except UnicodeDecodeError:
        raise Refused("the cookie is not UTF-8") from None
    if not cookie.isprintable():
        raise Refused("the cookie holds control characters")
    _check_fds(received.fds, notif.pid)
    return Message(data[: HEADER.size], raw_notif, notif, monitor_pid, init_pid, cookie, received.fds[2])


def _check_fds(fds: Sequence[int], pid: int) -> None:
    if len(fds) != FDS:
        raise Refused(f"the message carries {len(fds)} fds, not three (/proc/<pid>, its mem, the listener)")
    wanted = (f"/proc/{pid}", f"/proc/{pid}/mem", _LISTENER_LINK)
    for fd, link, (what, kind) in zip(fds, wanted, _FD_KINDS, strict=True):
        # Our own fd table: readlink here reads nothing the container controls.
        got = os.readlink(f"/proc/self/fd/{fd}")
        if got != link or kind and stat.S_IFMT(os.fstat(fd).st_mode) != kind:
            raise Refused(f"the fd for {what} of caller {pid} is {got!r}")


def reply(message: Message, response: notify.Response) -> bytes:
    """The answer LXC reads: header, notification and response, and nothing else (no cookie)."""
    return message.header + message.raw_notif + response.pack()


class Daemon(Protocol):
    """What the proxy needs of `mountwarden serve` (supervisor/daemon.py)."""

    server: Server

    def adopt(self, key: str, init_pid: int, info: ContainerInfo, listener: int = -1) -> Session: ...

    def forget(self, key: str) -> None: ...


@dataclass
class _Connection:
    """One monitor's connection, and the container it speaks for."""

    sock: socket.socket
    monitor_pid: int
    init_pid: int
    key: str
    session: Session
    cookie: str | None = None  # from its first message on


class LxcProxy:
    """The socket LXC's monitors connect to, on `daemon`'s loop.

    A container is adopted when its monitor connects, not at its first message: its loop pool
    (/dev/loop-control) must be there before its first loop call, which is what makes the
    first message. Its cookie arrives with that first message, before anything is decided
    (policy selector ``lxc_cookie``).

    Messages are decoded on the loop and served on the container's own session worker, in
    order, so a slow mount delays only the container that asked (its monitor serializes its
    notifications anyway); other containers' answers are unaffected. A reply that would come
    later than `REPLY_DEADLINE` is dropped (LXC has answered ENOSYS by then, and would take it
    for the next request's answer).

    Args:
        daemon: adopts a session per container (key ``lxc:<monitor pid>``) and forgets it when
            its connection ends.
        path: a filesystem path (LXC cuts the last character off abstract names).
        peer_uids: the uids a monitor may run as (SO_PEERCRED).
        group: a group to give the socket to (mode 0660); otherwise it is root's alone (0600).
    """

    def __init__(
        self, daemon: Daemon, path: str, *, peer_uids: frozenset[int] = frozenset({0}), group: int | None = None
    ) -> None:
        self.daemon = daemon
        self.path = path
        self.peer_uids = peer_uids
        self.group = group
        self.log: Any = audit.logger(source="lxc")
        self._listener: sockets.Listener | None = None
        self._conns: dict[int, _Connection] = {}

    def start(self) -> LxcProxy:
        """Check this kernel's struct sizes, bind and listen (on the loop from now on)."""
        notify.check_sizes()
        mode = 0o600 if self.group is None else 0o660
        self._listener = sockets.Listener(
            self.daemon.server, self.log, self.path, socket.SOCK_SEQPACKET, mode, self.group, self._admit
        )
        self.log.info("lxc-proxy-listening", path=self.path)
        return self

    def close(self) -> None:
        """Stop listening, end every connection and forget its container."""
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        for conn in list(self._conns.values()):
            self._end(conn)

    def _admit(self, sock: socket.socket) -> None:
        pid, uid, _gid = sockets.peer(sock)
        try:
            if uid not in self.peer_uids:
                raise KernelError(errno.EPERM, f"uid {uid} may not hand over containers")
            key = f"lxc:{pid}"
            if any(conn.key == key for conn in self._conns.values()):
                raise KernelError(errno.EALREADY, f"monitor {pid} is connected already (one connection per container)")
            init_pid = _container_init(pid)
            host_uid = idmap.root_of(init_pid)[0]
            info = ContainerInfo(name=_container_name(pid) or f"lxc-{init_pid}", host_uid=host_uid)
            session = self.daemon.adopt(key, init_pid, info)
        except (OSError, ValueError) as exc:
            self.log.warning("lxc-monitor-refused", monitor_pid=pid, uid=uid, reason=str(exc))
            sock.close()
            return
        self._conns[sock.fileno()] = _Connection(sock, pid, init_pid, key, session)
        self.daemon.server.watch(sock.fileno(), self._readable, select.EPOLLIN | select.EPOLLRDHUP)
        self.log.info("lxc-container-adopted", key=key, name=info.name, init_pid=init_pid, host_uid=host_uid)

    def _readable(self, fd: int, events: int) -> None:
        conn = self._conns[fd]
        try:
            received = receive(conn.sock)
        except OSError as exc:
            self.log.warning("lxc-connection-failed", key=conn.key, error=str(exc))
            self._end(conn)
            return
        if received is None:
            return
        if not received.data and not received.fds and events & (select.EPOLLHUP | select.EPOLLRDHUP):
            self._end(conn)  # the monitor closed it: the container stopped, or LXC died
            return
        try:
            message = decode(received)
            self._check_origin(conn, message)
        except Refused as exc:
            received.close()
            self._refuse(conn, str(exc))
            return
        self._serve(conn, message, received)

    def _check_origin(self, conn: _Connection, message: Message) -> None:
        """The message speaks for the connection's container; its cookie is recorded once."""
        if (message.monitor_pid, message.init_pid) != (conn.monitor_pid, conn.init_pid):
            raise Refused(
                f"the message names monitor {message.monitor_pid} and init {message.init_pid}, "
                f"not the connection's {conn.monitor_pid} and {conn.init_pid}"
            )
        if conn.cookie is None:
            conn.cookie = message.cookie
            session = conn.session
            self.daemon.server.submit(
                session, lambda: setattr(session, "info", replace(session.info, lxc_cookie=message.cookie or None))
            )
        elif message.cookie != conn.cookie:
            raise Refused("the cookie is not the one of the connection's first message")

    def _serve(self, conn: _Connection, message: Message, received: Received) -> None:
        deadline = received.arrived + REPLY_DEADLINE

        def deliver(response: notify.Response) -> bool:
            if time.monotonic() > deadline:
                self.log.error("lxc-reply-dropped", key=conn.key, id=message.notif.id,
                               reason=f"later than {REPLY_DEADLINE:.0f} s: LXC answered ENOSYS already")  # fmt: skip
                return False
            try:
                return conn.sock.send(reply(message, response)) == MESSAGE_SIZE
            except OSError:
                return False  # the monitor is gone; its EOF ends the connection on the loop

        def work() -> None:
            try:
                dispatch.serve(conn.session, message.notif, message.listener, deliver)
            finally:
                received.close()

        if not self.daemon.server.submit(conn.session, work):
            received.close()
            self._refuse(conn, f"{conn.key} is being released")

    def _refuse(self, conn: _Connection, why: str) -> None:
        """Answer a message that cannot be served: an empty reply, which LXC turns into ENOSYS at once."""
        self.log.warning("lxc-message-refused", key=conn.key, reason=why)
        with contextlib.suppress(OSError):
            conn.sock.send(b"")

    def _end(self, conn: _Connection) -> None:
        """Forget the connection and its container; the socket closes after the container's pending work."""
        self.daemon.server.unwatch(conn.sock.fileno())
        self._conns.pop(conn.sock.fileno(), None)
        if not self.daemon.server.submit(conn.session, conn.sock.close):
            conn.sock.close()
        self.daemon.forget(conn.key)
        self.log.info("lxc-container-forgotten", key=conn.key)


def _container_init(monitor_pid: int) -> int:
    """The monitor's child in a pid namespace of its own: the container's init.

    LXC connects to the proxy after it started the init (lxc_poll), so it is there.
    """
    with open(f"/proc/{monitor_pid}/task/{monitor_pid}/children") as f:
        children = [int(pid) for pid in f.read().split()]
    own = os.stat(f"/proc/{monitor_pid}/ns/pid").st_ino
    for child in children:
        with contextlib.suppress(OSError):
            if os.stat(f"/proc/{child}/ns/pid").st_ino != own:
                return child
    raise KernelError(errno.ESRCH, f"monitor {monitor_pid} has no container init among its children")


def _container_name(monitor_pid: int) -> str | None:
    """The name the monitor was started with (``lxc-start -n NAME``), for audit records."""
    with open(f"/proc/{monitor_pid}/cmdline", "rb") as f:
        args = f.read().decode(errors="replace").split("\0")
    for i, arg in enumerate(args):
        if arg in ("-n", "--name") and i + 1 < len(args):
            return args[i + 1] or None
        if arg.startswith("--name="):
            return arg.removeprefix("--name=") or None
    return None


# --- the seccomp profile (lxc.seccomp.profile) ---------------------------------------------------

DEBIAN_BASE: Final = "/usr/share/lxc/config/common.seccomp"
_LOW32: Final = 0xFFFFFFFF
_LIST_KINDS: Final = ("denylist", "allowlist", "blacklist", "whitelist")
_MANAGED: Final = ("mount", "umount", "umount2", "ioctl", "seccomp", *seccomp_filter.RUNTIME_REFUSED_SYSCALLS)


def profile(base_text: str) -> str:
    """`base_text` (an LXC v2 seccomp profile, such as Debian's common.seccomp) with mountwarden's rules.

    The rules match `run`'s filter (supervisor/seccomp/filter.py): mount notifies when it can
    make a superblock or remounts, umount2 and umount notify (a forced umount2 keeps the base's
    ``reject_force_umount`` answer), ioctl notifies for the loop and block-size requests
    (compared on their low 32 bits, all the kernel reads), the new mount API answers ENOSYS so
    tools fall back to mount(2), and no process may ask for a listener of its own (as Incus).
    ``lxc.seccomp.profile`` takes one file, hence the merge.
    """
    lines = base_text.splitlines()
    if len(lines) < 2 or lines[0].strip() != "2" or not lines[1].startswith(_LIST_KINDS):
        raise KernelError(errno.EINVAL, "the base profile is not an LXC version 2 profile (first lines: 2, denylist)")
    for number, line in enumerate(lines[2:], start=3):
        words = line.split()
        if words and words[0] in _MANAGED:
            raise KernelError(
                errno.EEXIST, f"line {number} of the base profile has a rule for {words[0]}, which mountwarden sets; "
                "remove it from the base",
            )  # fmt: skip
    rules = [
        "[all]",
        "# mountwarden: served by `mountwarden serve` (lxc.seccomp.notify.proxy)",
        "mount notify",
        f"umount2 notify [1,0,SCMP_CMP_MASKED_EQ,{MNT_FORCE}]",
        "umount notify",
    ]
    rules += [f"ioctl notify [1,{value},SCMP_CMP_MASKED_EQ,{mask}]" for mask, value in seccomp_filter.LOOP_IOCTL_MASKS]
    rules += [f"ioctl notify [1,{request},SCMP_CMP_MASKED_EQ,{_LOW32}]" for request in seccomp_filter.EXACT_IOCTLS]
    rules += ["# mountwarden: the new mount API is refused (ENOSYS) so that every mount goes through mount(2)"]
    rules += [f"{name} errno {errno.ENOSYS}" for name in seccomp_filter.RUNTIME_REFUSED_SYSCALLS]
    rules += ["# mountwarden: no listener of the container's own (SECCOMP_FILTER_FLAG_NEW_LISTENER)"]
    rules += [f"seccomp errno {errno.EINVAL} [1,{seccomp_filter.SECCOMP_FILTER_FLAG_NEW_LISTENER},SCMP_CMP_MASKED_EQ,"
              f"{seccomp_filter.SECCOMP_FILTER_FLAG_NEW_LISTENER}]"]  # fmt: skip
    return "\n".join([*lines, *rules]) + "\n"
