"""The notification loop: receive, pin, dispatch through the handler table, answer, audit.

One event loop, no thread or process per request. Every notification received gets exactly
one answer and one audit record, also when a handler fails: the answer is then the failure's
errno (EIO for a bug), never a silent CONTINUE. The answer goes out first; in a flood the
record is counted into the window's summary instead of written (supervisor/audit.py).
"""

from __future__ import annotations

import errno
import select
import time
import traceback
from typing import Any

from .errors import KernelError, errno_name
from .registry import NATIVE_ARCH, Call, abi_name, check_served, handlers, syscall_name
from .seccomp import notify
from .session import Session
from .target import Target

_HANDLERS = handlers()


def serve_one(session: Session, listener: int | None = None) -> None:
    """Take one pending notification from the session's listener (or a FUSE daemon's) and answer it."""
    fd = session.listener if listener is None else listener
    notif = notify.receive(fd)
    if notif is None:
        return
    started = time.perf_counter_ns()
    name = syscall_name(notif)
    audit: dict[str, Any] = {"container": session.name, "pid": notif.pid, "syscall": name or f"nr {notif.nr}"}
    if fd != session.listener:
        audit["caller"] = "fuse-daemon"
    if notif.arch != NATIVE_ARCH or abi_name(notif) == "x32":
        audit["abi"] = abi_name(notif)
    response = notify.Response.errno(notif.id, errno.EIO)
    error: str | None = None
    try:
        check_served(notif)
        handler = _HANDLERS.get(name or "")
        if handler is None:
            raise KernelError(errno.ENOSYS, f"mountwarden does not serve this call on the {abi_name(notif)} ABI")
        with Target(fd, notif) as target:
            response = handler(Call(session, notif, target, audit))
    except KernelError as exc:
        response = notify.Response.errno(notif.id, exc.errno or errno.EIO)
        error = str(exc)
    except Exception as exc:  # a bug: answer EIO and say so, never leave the caller hanging
        # In the decision record, so the flood control counts it like any other (no log of its own).
        error = f"internal error: {exc!r}"
        audit["traceback"] = traceback.format_exc(limit=-8)
    finally:
        delivered = notify.send(fd, response)
        _emit(session, audit, response, error, delivered, started)


def _emit(
    session: Session,
    audit: dict[str, Any],
    response: notify.Response,
    error: str | None,
    delivered: bool,
    started: int,
) -> None:
    secret = audit.pop("secret", None)
    if response.flags & notify.USER_NOTIF_FLAG_CONTINUE:
        result = "CONTINUE"
    else:
        result = errno_name(-response.error)
    audit.update(result=result, latency_us=round((time.perf_counter_ns() - started) / 1000, 1))
    audit.setdefault("action", "deny" if response.error else None)
    if error:
        audit["error"] = error
    if not delivered:
        audit["delivered"] = False
    session.audit.record({k: v for k, v in audit.items() if v is not None}, secret)


def run_until_exit(session: Session, child_pidfd: int, extra: dict[int, Any] | None = None) -> None:
    """Serve `session` until the process behind `child_pidfd` exits.

    `extra` maps further fds to callbacks (the signal fd); they run when readable.
    """
    poller = select.epoll()
    poller.register(session.listener, select.EPOLLIN)
    poller.register(child_pidfd, select.EPOLLIN)
    for fd in extra or {}:
        poller.register(fd, select.EPOLLIN)
    daemons: dict[int, str] = {}  # FUSE daemons' fds: "pidfd" (readable when one dies), "listener", "hung-up"
    try:
        while True:
            _watch_daemons(poller, session, daemons)
            for fd, events in poller.poll(session.audit.tick()):
                if fd == child_pidfd:
                    return
                if fd == session.listener:
                    if events & select.EPOLLIN:
                        serve_one(session)
                    elif events & select.EPOLLHUP:  # no task uses the filter any more
                        poller.unregister(fd)
                elif extra and fd in extra:
                    extra[fd]()
                elif daemons.get(fd) == "listener":  # a FUSE daemon's own seccomp listener
                    if events & select.EPOLLIN:
                        serve_one(session, fd)
                    elif events & select.EPOLLHUP:
                        poller.unregister(fd)
                        daemons[fd] = "hung-up"
                elif daemons.get(fd) == "pidfd":
                    poller.unregister(fd)
                    del daemons[fd]
                    session.reap_daemons()
                    _watch_daemons(poller, session, daemons)  # the reaped daemons' fds are closed
    finally:
        poller.close()


def _watch_daemons(poller: select.epoll, session: Session, watched: dict[int, str]) -> None:
    """Keep one registration per live daemon's pidfd and listener (a closed fd leaves epoll by itself)."""
    current = {fd: kind for d in session.daemons.values()
               for fd, kind in ((d.pidfd, "pidfd"), (d.listener, "listener")) if fd >= 0}  # fmt: skip
    for fd in list(watched):
        if fd not in current:
            del watched[fd]
    for fd, kind in current.items():
        if fd not in watched:
            poller.register(fd, select.EPOLLIN)
            watched[fd] = kind
