"""Loop ioctls on /dev/loop-control and /dev/loopN.

Not served yet: the private loop pool that answers them comes later. Until then every loop
request gets ENOTTY (what the ioctl gives on a file that is not a loop device) with an audit
line, so tools report "not a loop device" instead of touching a host device.
"""

from __future__ import annotations

import errno

from ..errors import KernelError
from ..registry import Call
from ..seccomp.notify import Response


def handle(call: Call) -> Response:
    fd, request = call.notif.args[0], call.notif.args[1] & 0xFFFFFFFF
    call.audit.update(fd=fd, request=f"{request:#06x}")
    raise KernelError(errno.ENOTTY, "loop devices are not available in this container yet")
