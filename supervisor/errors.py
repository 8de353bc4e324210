"""The one error type library code raises: it carries the errno the container will see."""

from __future__ import annotations

import errno as _errno
import os


class KernelError(OSError):
    """A failed step, with the errno to answer and a sentence a user can act on.

    Library modules raise only this; the dispatcher is the one place that turns it into a
    seccomp response, so the container always sees a real errno rather than a silent CONTINUE.
    """

    def __init__(self, err: int, what: str, path: str | None = None) -> None:
        super().__init__(err, what if path is None else f"{what}: {path}")
        self.what = what
        self.path = path

    @property
    def errno_name(self) -> str:
        return _errno.errorcode.get(self.errno or 0, str(self.errno))

    def __str__(self) -> str:
        text = f"{self.what} ({self.errno_name}: {os.strerror(self.errno or 0)})"
        return text if self.path is None else f"{text}: {self.path}"


def errno_name(err: int) -> str:
    """Symbolic name of an errno value (0 becomes "OK"), for audit records."""
    return "OK" if err == 0 else _errno.errorcode.get(err, str(err))
