"""OCI runtimes (runc, crun): the seccomp agent socket of `linux.seccomp.listenerPath`.

The runtime connects (SOCK_STREAM), sends one ContainerProcessState JSON document with the
listener fd (`fds` names it `seccompFd`) over SCM_RIGHTS, and expects no answer. Quirks that
shape this module (shared runtime-facts §3):

- runc 1.1.5 never closes the connection after sending, so a document is taken as soon as it
  parses, never at EOF; crun sends it pretty-printed, possibly over several reads (the fds
  come with the first);
- each `exec` opens a new connection with a new listener for the same container: the
  container is known by `state.id`, and crun's exec says `pid: 0` and `bundle: "."`;
- only a runtime may talk here: the socket is 0600 (or a group's), and the peer's uid is
  checked with SO_PEERCRED.

Reading happens on the loop, non-blocking, bounded in size and in connections waiting; a
peer that sends garbage is logged and dropped with every fd it sent closed.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from ..errors import KernelError
from ..policy import ContainerInfo
from ..seccomp import filter as seccomp_filter
from . import control, sockets

if TYPE_CHECKING:
    from ..daemon import Daemon

MAX_DOCUMENT: Final = 64 * 1024  # runc sends about 250 bytes, crun about 400
MAX_PENDING: Final = 64  # connections that have not finished their document
_MAX_FDS: Final = 8
SECCOMP_FD_NAME: Final = "seccompFd"


class BadState(ValueError):
    """A ContainerProcessState this agent cannot use; the message says what is wrong."""


@dataclass(frozen=True)
class ProcessState:
    """What one connection told: the container, the process whose filter this listener is for."""

    container_id: str
    init_pid: int  # state.pid: the container's init (0 from crun's exec)
    pid: int  # the process that installed the filter (0 from crun's exec)
    status: str
    bundle: str
    annotations: tuple[tuple[str, str], ...]
    metadata: str
    fd_index: int  # which received fd is the listener


def parse_state(raw: bytes) -> ProcessState:
    """The ContainerProcessState in `raw` (one complete JSON document), checked field by field."""
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadState(f"not a JSON document: {exc}") from None
    except RecursionError:
        raise BadState("the document is nested too deeply") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("state"), dict):
        raise BadState("no 'state' object")
    fds, state = doc.get("fds"), doc["state"]
    if not isinstance(fds, list) or SECCOMP_FD_NAME not in fds:
        raise BadState(f"'fds' does not name {SECCOMP_FD_NAME}")
    container_id = state.get("id")
    if not isinstance(container_id, str) or not container_id or len(container_id) > 1024:
        raise BadState("'state.id' is not a container id")
    annotations = state.get("annotations") or {}
    if not isinstance(annotations, dict) or not all(isinstance(v, str) for v in annotations.values()):
        raise BadState("'state.annotations' is not a map of strings")
    return ProcessState(
        container_id=container_id,
        init_pid=_pid(state.get("pid", 0), "state.pid"),
        pid=_pid(doc.get("pid", 0), "pid"),
        status=str(state.get("status", "")),
        bundle=str(state.get("bundle", "")),
        annotations=tuple(sorted((str(k), v) for k, v in annotations.items())),
        metadata=str(doc.get("metadata") or ""),
        fd_index=fds.index(SECCOMP_FD_NAME),
    )


def _pid(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 22:
        raise BadState(f"'{what}' is not a pid")
    return value


def complete(buffer: bytes) -> bytes | None:
    """The first complete JSON document at the start of `buffer`, or None while it is incomplete.

    BadState for one no parser could take (nested deeper than Python recurses).
    """
    text = buffer.decode("utf-8", errors="surrogateescape")
    try:
        _, end = json.JSONDecoder().raw_decode(text.lstrip())
    except ValueError:
        return None
    except RecursionError:
        raise BadState("the document is nested too deeply") from None
    skipped = len(text) - len(text.lstrip())
    return text[: skipped + end].encode("utf-8", errors="surrogateescape")


@dataclass
class _Pending:
    sock: socket.socket
    uid: int  # SO_PEERCRED: the runtime's user
    data: bytes = b""
    fds: list[int] = field(default_factory=list)

    def close(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()
        self.sock.close()


class OciSource:
    """The listening socket at `path`, and the connections on it, served on the daemon's loop."""

    def __init__(self, daemon: Daemon, path: str, *, gid: int | None = None, users: bool = False) -> None:
        """`users`: ordinary users' runtimes (rootless podman) may connect too, each for its own
        containers only (see `_announce`); else only root's."""
        self.daemon, self.users = daemon, users
        self._pending: dict[int, _Pending] = {}
        mode = 0o666 if users else 0o600 if gid is None else 0o660
        self.listener = sockets.Listener(daemon.server, daemon.log, path, socket.SOCK_STREAM, mode, gid, self._admit)

    def close(self) -> None:
        for pending in list(self._pending.values()):
            self._drop(pending)
        self.listener.close()

    def _admit(self, conn: socket.socket) -> None:
        uid = sockets.peer(conn)[1]
        if uid != 0 and not self.users:
            self.daemon.log.warning("oci-peer-refused", uid=uid, reason="only root's runtimes may connect")
            conn.close()
            return
        if len(self._pending) >= MAX_PENDING:
            oldest = next(iter(self._pending.values()))
            self.daemon.log.warning("oci-connection-dropped", reason="too many connections without a document")
            self._drop(oldest)
        pending = _Pending(conn, uid)
        self._pending[conn.fileno()] = pending
        self.daemon.server.watch(conn.fileno(), lambda fd, events: self._read(fd))

    def _read(self, fd: int) -> None:
        pending = self._pending[fd]
        try:
            data, ancdata, flags, _ = pending.sock.recvmsg(
                MAX_DOCUMENT, socket.CMSG_SPACE(_MAX_FDS * 4), socket.MSG_CMSG_CLOEXEC
            )
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.daemon.log.warning("oci-connection-failed", error=str(exc))
            self._drop(pending)
            return
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(payload) - len(payload) % 4
                pending.fds.extend(int.from_bytes(payload[i : i + 4], "little") for i in range(0, usable, 4))
        pending.data += data
        try:
            if len(pending.fds) > _MAX_FDS or flags & socket.MSG_CTRUNC:
                raise BadState(f"more than {_MAX_FDS} fds on one connection")
            document = complete(pending.data)
            if document is None and data and len(pending.data) < MAX_DOCUMENT:
                return  # runc keeps the connection open: wait for the rest of the document, not for EOF
            if document is None:
                raise BadState("the connection ended before a complete document" if not data else "document too large")
            self._announce(parse_state(document), pending)
        except (BadState, KernelError) as exc:
            self.daemon.log.warning("oci-state-refused", error=str(exc), bytes=len(pending.data), uid=pending.uid)
        except Exception as exc:
            self.daemon.log.error("oci-container-not-served", error=str(exc))
        self._drop(pending)

    def _announce(self, state: ProcessState, pending: _Pending) -> None:
        if state.fd_index >= len(pending.fds):
            raise BadState(f"{SECCOMP_FD_NAME} was named but not sent")
        listener = pending.fds.pop(state.fd_index)
        try:
            if os.readlink(f"/proc/self/fd/{listener}") != "anon_inode:seccomp notify":
                raise BadState(f"{SECCOMP_FD_NAME} is not a seccomp listener")
            # An ordinary user's runtime names containers in its own space, and only ones it owns.
            user = pending.uid
            key = f"oci:{state.container_id}" if user == 0 else f"oci:{user}:{state.container_id}"
            pidfd = -1
            if self.daemon.find(key) is None:
                if state.init_pid <= 0:
                    raise BadState(f"container {state.container_id!r} is not known and its state names no init pid")
                if user != 0:
                    if self.daemon.count(user) >= control.MAX_CONTAINERS_PER_USER:
                        raise BadState(f"uid {user} already runs {control.MAX_CONTAINERS_PER_USER} containers")
                    pidfd = control.pinned_owned(state.init_pid, user)
        except BaseException:
            os.close(listener)
            raise
        info = ContainerInfo(
            name=state.container_id, oci_id=state.container_id, oci_annotations=state.annotations,
            host_uid=None if user == 0 else user,
        )  # fmt: skip
        self.daemon.adopt(key, state.init_pid, info, listener, pidfd=pidfd)
        self.daemon.log.info("oci-listener", key=key, status=state.status, pid=state.pid, init_pid=state.init_pid)

    def _drop(self, pending: _Pending) -> None:
        self._pending.pop(pending.sock.fileno(), None)
        self.daemon.server.unwatch(pending.sock.fileno())
        pending.close()


DEFAULT_SOCKET: Final = "/run/mountwarden/oci.sock"
_OURS: Final = frozenset({"mount", "umount", "umount2", "ioctl", *seccomp_filter.RUNTIME_REFUSED_SYSCALLS})
_ALLOW: Final = "SCMP_ACT_ALLOW"


class ProfileError(ValueError):
    """A base profile mountwarden's rules cannot be merged into; the message says why."""


def profile(
    base: dict[str, Any] | None, listener_path: str, *, runtime: str = "runc", metadata: str = ""
) -> dict[str, Any]:
    """The `linux.seccomp` section for a container served by `mountwarden serve`: the rules of
    `run`'s filter (seccomp/filter.py), merged into `base` (default: allow everything).

    The base's rules naming the calls mountwarden intercepts are replaced by its own. A base
    whose default action is not to allow cannot be merged: libseccomp lets an unconditional
    rule for a call win over conditional ones, so the base's `ioctl` allow would hide every
    loop request. crun gets WAIT_KILLABLE_RECV (a signal then cannot make the kernel restart a
    mount the supervisor is serving); runc 1.1 refuses every filter flag.
    """
    section: dict[str, Any] = dict(base or {"defaultAction": _ALLOW})
    if section.get("defaultAction") != _ALLOW:
        raise ProfileError(
            f"the base profile's defaultAction is {section.get('defaultAction')!r}: mountwarden merges only into "
            "profiles that allow by default (deny with rules instead)"
        )
    rules: list[dict[str, Any]] = []
    for rule in section.get("syscalls") or []:
        names = [n for n in rule.get("names", []) if n not in _OURS]
        if names:
            rules.append({**rule, "names": names})
    rules += _notify_rules()
    rules.append({"names": sorted(seccomp_filter.RUNTIME_REFUSED_SYSCALLS), "action": "SCMP_ACT_ERRNO", "errnoRet": 38})
    section["syscalls"] = rules
    section["listenerPath"] = listener_path
    if metadata:
        section["listenerMetadata"] = metadata
    section.setdefault("architectures", ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"])
    if runtime == "crun":
        section["flags"] = sorted({*section.get("flags", []), "SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV"})
    else:
        section.pop("flags", None)
    return section


def _notify_rules() -> list[dict[str, Any]]:
    def masked(index: int, mask: int, value: int) -> dict[str, Any]:
        return {"index": index, "value": mask, "valueTwo": value, "op": "SCMP_CMP_MASKED_EQ"}

    notify = "SCMP_ACT_NOTIFY"
    rules: list[dict[str, Any]] = [
        {"names": ["mount"], "action": notify},  # binds and moves too: the container may run before adoption
        {"names": ["umount2", "umount"], "action": notify},
    ]
    for mask, value in seccomp_filter.LOOP_IOCTL_MASKS:
        rules.append({"names": ["ioctl"], "action": notify, "args": [masked(1, mask, value)]})
    for request in seccomp_filter.EXACT_IOCTLS:
        rules.append({"names": ["ioctl"], "action": notify, "args": [masked(1, 0xFFFFFFFF, request)]})
    return rules
