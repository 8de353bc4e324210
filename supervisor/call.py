"""One notification being served: what a handler needs, and the audit fields it adds."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import KernelError
from .seccomp.notify import Notification, Response
from .target import CAP_SYS_ADMIN, Target

if TYPE_CHECKING:
    from .session import Session


@dataclass
class Call:
    """One notification being served: what the handler needs, and the audit fields it adds."""

    session: Session
    notif: Notification
    target: Target
    audit: dict[str, Any] = field(default_factory=dict)
    caller: str | None = None  # "fuse-daemon": a FUSE daemon of the session's, not the container itself
    # Serves one pending call of the session's FUSE daemon (from its listener), while a handler
    # waits for that daemon: the dispatcher's own way, handed down so handlers need not import it.
    serve_daemon: Callable[[int], None] = lambda listener: None

    def require_admin(self, doing: str) -> None:
        """EPERM unless the caller may do mount work in the container's own mount namespace.

        The supervisor acts only there, so the caller must be in it (a mount namespace the
        container made of its own is not served: a user who unshares one owns it, but owns
        nothing of the container's) and hold CAP_SYS_ADMIN over it, as the kernel would ask.
        """
        t = self.target
        st = os.fstat(t.mntns)
        if (st.st_dev, st.st_ino) != self.session.mntns:
            raise KernelError(errno.EPERM, f"{doing} is served only in the container's own mount namespace")
        if not t.creds or not t.creds.has_cap(CAP_SYS_ADMIN):
            raise KernelError(errno.EPERM, f"{doing} needs CAP_SYS_ADMIN in the container")


Handler = Callable[[Call], Response]
