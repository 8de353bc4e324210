"""Serving one notification: pin, dispatch through the handler table, answer, audit.

Every notification received gets exactly one answer and one audit record, also when a handler
fails: the answer is then the failure's errno (EIO for a bug), never a silent CONTINUE. The
answer goes out first; in a flood the record is counted into the window's summary instead of
written (supervisor/audit.py). How the notification arrived (a listener the supervisor reads
itself, or a runtime's proxy that forwards it) is the caller's: `serve` takes the way back.
"""

from __future__ import annotations

import errno
import functools
import time
import traceback
from collections.abc import Callable
from typing import Any, Final

from .call import Call, Handler
from .errors import KernelError, errno_name
from .handlers import loop_ioctl, mount, umount
from .registry import NATIVE_ARCH, abi_name, check_served, syscall_name
from .seccomp import notify
from .session import Session
from .target import Target

Deliver = Callable[[notify.Response], bool]
HANDLERS: Final[dict[str, Handler]] = {
    "mount": mount.handle,
    "umount2": umount.handle,
    "umount": umount.handle_old,
    "ioctl": loop_ioctl.handle,
}


def serve_one(session: Session, listener: int, caller: str | None = None) -> None:
    """Take one pending notification from a listener of the session (or of its FUSE daemon,
    `caller` "fuse-daemon") and answer it."""
    notif = notify.receive(listener)
    if notif is not None:
        serve(session, notif, listener, lambda response: notify.send(listener, response), caller)


def _serve_daemon(session: Session, listener: int) -> None:
    serve_one(session, listener, "fuse-daemon")


def serve(
    session: Session, notif: notify.Notification, listener: int, deliver: Deliver, caller: str | None = None
) -> None:
    """Decide `notif` (from `listener`, which pins it: ID_VALID), `deliver` the answer, audit it.

    `deliver` sends the response the way the notification came (the listener itself, or a
    runtime's proxy connection) and says whether anyone was still waiting for it. `caller`
    names a caller that is not the container's own (its FUSE daemon) in the audit record.
    """
    started = time.perf_counter_ns()
    name = syscall_name(notif)
    audit: dict[str, Any] = {"container": session.name, "pid": notif.pid, "syscall": name or f"nr {notif.nr}"}
    if caller is not None:
        audit["caller"] = caller
    if notif.arch != NATIVE_ARCH or abi_name(notif) == "x32":
        audit["abi"] = abi_name(notif)
    response = notify.Response.errno(notif.id, errno.EIO)
    error: str | None = None
    try:
        check_served(notif)
        handler = HANDLERS.get(name or "")
        if handler is None:
            raise KernelError(errno.ENOSYS, f"mountwarden does not serve this call on the {abi_name(notif)} ABI")
        with Target(listener, notif) as target:
            response = handler(Call(session, notif, target, audit, caller, functools.partial(_serve_daemon, session)))
    except KernelError as exc:
        response = notify.Response.errno(notif.id, exc.errno or errno.EIO)
        error = str(exc)
    except Exception as exc:  # a bug: answer EIO and say so, never leave the caller hanging
        # In the decision record, so the flood control counts it like any other (no log of its own).
        error = f"internal error: {exc!r}"
        audit["traceback"] = traceback.format_exc(limit=-8)
    finally:
        delivered = deliver(response)
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
