"""umount2(2) (and i386's umount(2)).

A mount the supervisor made is unmounted by the helper, which, as a path is the only way to
name a mount to umount2 without holding it busy, walks it again as root of the container's
user namespace: a path swapped meanwhile (RENAME_EXCHANGE) then gets exactly what the
container's own call would (MNT_FORCE is EPERM there, a host mount EINVAL), never host root's
rights. The supervisor forgets its mount only once the mount is really gone from the
namespace. Anything else is left to the kernel (CONTINUE): that is safe even if the container
swaps the path afterwards, because the kernel re-checks every permission itself, and the
supervisor's own mounts are ones the container's root may unmount anyway.
"""

from __future__ import annotations

import errno
import posixpath

from .. import syscalls as s
from ..call import Call
from ..errors import KernelError
from ..nshelper import Unmount
from ..seccomp.notify import Response

_KNOWN_FLAGS = s.MNT_FORCE | s.MNT_DETACH | s.MNT_EXPIRE | s.UMOUNT_NOFOLLOW


def handle(call: Call) -> Response:
    return _umount(call, call.notif.args[1] & 0xFFFFFFFF)


def handle_old(call: Call) -> Response:
    """i386's umount(path): umount2 with no flags."""
    return _umount(call, 0)


def _umount(call: Call, flags: int) -> Response:
    t = call.target
    path = t.read_cstring(call.notif.args[0], what="target")
    t.check()
    call.audit.update(target=path, flags=f"{flags:#x}")
    if flags & ~_KNOWN_FLAGS or flags & s.MNT_EXPIRE and flags & (s.MNT_FORCE | s.MNT_DETACH):
        raise KernelError(errno.EINVAL, "invalid umount2 flags")
    if flags & s.MNT_EXPIRE:
        return _expire(call, path, flags)
    try:
        where = t.resolve(path, follow_last=not flags & s.UMOUNT_NOFOLLOW)
    except KernelError as exc:
        # Not ours: the supervisor can look up all of its own mounts. (A FUSE mount of the
        # container's user namespace refuses the supervisor's lookups, EACCES.)
        call.audit.update(action="kernel-native", note=exc.what)
        return Response.continue_(call.notif.id)
    with where:
        mnt_id, ino, canonical = s.mount_id(where.fd), where.st.st_ino, where.path
    # Our fd on the mount point is closed now: held open, it would make the unmount EBUSY.
    record = call.session.mounts.get(mnt_id)
    if record is None or ino != record.root_ino:
        call.audit.update(action="kernel-native")
        return Response.continue_(call.notif.id)
    call.require_admin("unmounting")
    call.audit.update(target=canonical, action="unmount", source=record.source, loop=f"/dev/loop{record.loop}")
    ns_path = posixpath.join(t.root_path, canonical.lstrip("/"))
    session = call.session
    session.nshelper().call(Unmount(ns_path, flags), (session.userns_fd,))
    if record.mnt_id in _mount_ids(session.init_pid):
        # The path led elsewhere when the helper walked it: the container unmounted one of
        # its own mounts, with its own rights; ours is still there and still tracked.
        call.audit.update(note="the path no longer led to the supervisor's mount; it stays")
    else:
        session.unmounted(record)
    return Response.success(call.notif.id)


def _expire(call: Call, path: str, flags: int) -> Response:
    """MNT_EXPIRE, without touching the mount: any reference the supervisor took and dropped
    on it (resolving the path does) clears the kernel's expiry mark, so the second call would
    answer EAGAIN again. Only the parent is resolved here; the helper's umount2, as the
    container's root, walks the last component itself (the kernel's umount2 keeps the mark).
    A caller the supervisor does not act for is left to the kernel."""
    t, session = call.target, call.session
    parent, name = posixpath.split(path.rstrip("/") or "/")
    try:
        call.require_admin("unmounting")
        if name in ("", ".", ".."):
            raise KernelError(errno.EINVAL, "no last component to leave unresolved")
        with t.resolve(parent or ".") as where:
            canonical = where.path
    except KernelError as exc:
        call.audit.update(action="kernel-native", note=exc.what)
        return Response.continue_(call.notif.id)
    ns_path = posixpath.join(t.root_path, canonical.lstrip("/"), name)
    call.audit.update(target=posixpath.join(canonical, name), action="unmount")
    try:
        session.nshelper().call(Unmount(ns_path, flags), (session.userns_fd,))
    finally:
        present = _mount_ids(session.init_pid)
        for record in [r for r in session.mounts.values() if r.mnt_id not in present]:
            session.unmounted(record)
    return Response.success(call.notif.id)


def _mount_ids(pid: int) -> set[int]:
    """Ids of the mounts in the mount namespace of `pid` (mountinfo's first field); none once it is gone."""
    try:
        with open(f"/proc/{pid}/mountinfo") as f:
            return {int(line.split(maxsplit=1)[0]) for line in f if line.strip()}
    except (FileNotFoundError, ProcessLookupError):
        return set()
