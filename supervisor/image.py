"""The image a mount reads: resolved and opened with the caller's rights, judged for origin, or
one of the container's own pool devices."""

from __future__ import annotations

import dataclasses
import errno
import os
import stat
from dataclasses import dataclass

from . import origin
from .call import Call
from .errors import KernelError
from .loop.pool import LoopPool, Slot
from .paths import Resolved
from .policy import SourceOrigin
from .target import Target


@dataclass
class ImageSource:
    """What a mount will read: an fd to probe, the path policy sees, the pool slot if it is one.

    A /dev/loopN of the container's own pool is used as it is (the container bound it to a file
    it opened itself); a regular file is opened with the caller's rights and, once policy
    allows it, bound to a free slot of the pool with autoclear, as `mount -o loop` would.
    """

    image: Resolved
    fd: int
    policy_path: str
    origin: SourceOrigin
    slot: Slot | None = None
    copies: list[int] = dataclasses.field(default_factory=list)  # sealed copies made for a digest

    def close(self) -> None:
        self.image.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        while self.copies:
            os.close(self.copies.pop())


def open_source(call: Call, source: str) -> ImageSource:
    t = call.target
    image = t.resolve(source)
    try:
        if stat.S_ISBLK(image.st.st_mode):
            slot = pool_of(call).slot_for(image.st)
            if slot is None:
                raise KernelError(errno.EPERM, "only the container's own loop devices can be mounted", image.path)
            call.audit.update(device=f"/dev/loop{slot.number}", backing_file=slot.backing_path)
            return ImageSource(image, os.dup(slot.host.fd), slot.backing_path, slot.backing_origin, slot)
        tree = call.session.tree_at_start
        judged = origin.judge(tree, proc_fd=t.proc, root_fd=t.root, fd=image.fd, path=image.path)
        return ImageSource(image, open_as_caller(t, image, os.O_RDONLY), image.path, judged)
    except BaseException:
        image.close()
        raise


def pool_of(call: Call) -> LoopPool:
    if call.session.pool is None:
        raise KernelError(errno.ENOSPC, "this container has no loop devices")
    return call.session.pool


def open_as_caller(t: Target, image: Resolved, mode: int) -> int:
    """Open the image with the caller's own rights, so the supervisor never lends it root's."""
    if not stat.S_ISREG(image.st.st_mode):
        raise KernelError(errno.ENOTBLK, "the source is not an image file", image.path)
    with t.as_caller():
        try:
            return os.open(f"/proc/self/fd/{image.fd}", mode | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
        except OSError as exc:
            need = "read" if mode == os.O_RDONLY else "write"
            raise KernelError(
                exc.errno or errno.EACCES, f"the container's user may not {need} the image", image.path
            ) from None
