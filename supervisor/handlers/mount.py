"""mount(2): new image mounts through a host loop device, and remounts that keep forced flags.

Only calls that create a superblock or remount reach here (the filter lets binds, moves and
propagation changes run natively). Filesystems the kernel itself lets a user namespace mount
(tmpfs, proc, overlay, fuse, ...) are left to the kernel: whatever the container swaps into its
buffers afterwards, the kernel re-checks that. Everything else is an image mount, done by the
supervisor on its own copy of the arguments, or refused.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Final

from .. import mounting, mountopts
from .. import syscalls as s
from ..errors import KernelError
from ..loop import attach
from ..nshelper import Attach, SetAttr
from ..paths import Resolved
from ..policy import MountRequest
from ..probe import kernel_driver, probe_fd
from ..registry import Call
from ..seccomp.notify import Response
from ..session import MountRecord
from ..target import CAP_SYS_ADMIN, Target

USERNS_FILESYSTEMS: Final = frozenset(
    {"tmpfs", "ramfs", "proc", "sysfs", "devpts", "mqueue", "cgroup", "cgroup2", "overlay", "fuse", "binfmt_misc"}
)
_FSTYPE_MAX: Final = 256
_DATA_MAX: Final = 4096  # the kernel copies at most one page of mount data
_PER_MOUNT: Final = (
    s.MOUNT_ATTR_RDONLY
    | s.MOUNT_ATTR_NOSUID
    | s.MOUNT_ATTR_NODEV
    | s.MOUNT_ATTR_NOEXEC
    | s.MOUNT_ATTR_NODIRATIME
    | s.MOUNT_ATTR__ATIME
)


def handle(call: Call) -> Response:
    t, args = call.target, call.notif.args
    source = t.read_optional(args[0], what="source")
    target = t.read_cstring(args[1], what="target")
    fstype = t.read_optional(args[2], _FSTYPE_MAX, what="filesystem type")
    data = t.read_optional(args[4], _DATA_MAX, what="mount data")
    t.check()  # everything below acts on these copies only
    flags = args[3]
    call.audit.update(source=source, target=target, fstype=fstype, flags=f"{flags:#x}")
    call.audit["secret"] = {"data": data}  # mount data can carry credentials: trace level only
    if fstype and (fstype in USERNS_FILESYSTEMS or fstype.startswith("fuse.")) and not flags & s.MS_REMOUNT:
        call.audit.update(action="kernel-native", rule="userns-filesystem")
        return Response.continue_(call.notif.id)
    if not t.creds or not t.creds.has_cap(CAP_SYS_ADMIN):
        raise KernelError(errno.EPERM, "mounting needs CAP_SYS_ADMIN in the container")
    opts = mountopts.parse(flags, data)
    if flags & s.MS_REMOUNT:
        return _remount(call, target, flags, opts)
    if not source:
        raise KernelError(errno.EINVAL, "a disk image mount needs a source")
    return _mount_image(call, source, target, fstype, opts)


def _mount_image(call: Call, source: str, target: str, fstype: str | None, opts: mountopts.MountOptions) -> Response:
    t, session = call.target, call.session
    with t.resolve(target) as where:
        if not stat.S_ISDIR(where.st.st_mode):
            raise KernelError(errno.ENOTDIR, "the mount point is not a directory", where.path)
        image, fd = _open_image(t, source, os.O_RDONLY)
        try:
            facts = probe_fd(fd)
            call.audit.update(source=image.path, target=where.path, probed=facts.fstype, size=facts.size)
            if facts.fstype is None:
                raise KernelError(errno.EINVAL, "the image holds no filesystem mountwarden recognises", image.path)
            if fstype not in (None, "", "auto", "none") and kernel_driver(fstype) != kernel_driver(facts.fstype):
                raise KernelError(errno.EINVAL, f"the image is {facts.fstype}, not {fstype}", image.path)
            request = MountRequest(image.path, where.path, facts.fstype, opts.read_only, opts.fs_options)
            decision = session.policy.evaluate(request)
            call.audit.update(rule=decision.rule, action=decision.action, reason=decision.reason)
            if decision.action != "kernel":
                raise KernelError(decision.errno, decision.reason)
            final = opts.with_forced(decision.options)
            mountopts.check_fs_options(facts.fstype, final.fs_options)
            if not final.read_only:
                os.close(fd)
                fd = -1
                _, fd = _open_image(t, image.path, os.O_RDWR, resolved=image)
            record = _attach(call, image, where, fd, facts.fstype, final, decision.options, decision.rule)
        finally:
            image.close()
            if fd >= 0:
                os.close(fd)
    session.add(record)
    call.audit.update(loop=f"/dev/loop{record.loop}", options=final.describe())
    return Response.success(call.notif.id)


def _attach(
    call: Call,
    image: Resolved,
    where: Resolved,
    fd: int,
    fstype: str,
    opts: mountopts.MountOptions,
    forced: tuple[str, ...],
    rule: str | None,
) -> MountRecord:
    """Loop device, superblock, detached mount, then attach it in the container; undone on any failure."""
    device = attach(fd, read_only=opts.read_only, name=image.path)
    try:
        mnt = mounting.create(kernel_driver(fstype), device.path, opts)
    finally:
        device.close()  # from here the superblock holds the device; autoclear frees it with the mount
    try:
        call.target.check()  # a caller that died meanwhile gets no mount
        call.session.nshelper().call(Attach(), (mnt.fd, where.fd))
    finally:
        mnt.close()
    return MountRecord(
        mnt.mnt_id,
        mnt.dev,
        mnt.root_ino,
        image.path,
        where.path,
        fstype,
        device.number,
        opts.read_only,
        forced,
        rule,
    )


def _open_image(t: Target, source: str, mode: int, resolved: Resolved | None = None) -> tuple[Resolved, int]:
    """Open the image with the caller's own rights, so the supervisor never lends it root's."""
    image = resolved or t.resolve(source)
    try:
        if stat.S_ISBLK(image.st.st_mode):
            raise KernelError(
                errno.EPERM, "block devices are not mounted for containers; mount the image file", image.path
            )
        if not stat.S_ISREG(image.st.st_mode):
            raise KernelError(errno.ENOTBLK, "the source is not an image file", image.path)
        with t.as_caller():
            try:
                fd = os.open(f"/proc/self/fd/{image.fd}", mode | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
            except OSError as exc:
                need = "read" if mode == os.O_RDONLY else "write"
                raise KernelError(
                    exc.errno or errno.EACCES, f"the container's user may not {need} the image", image.path
                ) from None
    except BaseException:
        if resolved is None:
            image.close()
        raise
    return image, fd


def _remount(call: Call, target: str, flags: int, opts: mountopts.MountOptions) -> Response:
    """Remounts never run natively: a bare MS_REMOUNT|MS_BIND would strip forced flags (see filter)."""
    t, session = call.target, call.session
    with t.resolve(target) as where:
        record = session.record_for_dev(where.st.st_dev)
        call.audit.update(target=where.path, remount="bind" if flags & s.MS_BIND else "superblock")
        if record is None and not flags & s.MS_BIND:
            # Superblock remounts need rights over the superblock, which the kernel checks; the
            # supervisor's superblocks belong to the host, so a swapped path cannot reach them.
            call.audit.update(action="kernel-native", rule="foreign-superblock")
            return Response.continue_(call.notif.id)
        forced = ("nosuid", "nodev", *(record.forced if record else ()))
        if record is not None and not flags & s.MS_BIND:
            if record.read_only and not opts.read_only:
                raise KernelError(errno.EROFS, "this image was mounted read-only and stays so", where.path)
            if opts.fs_options:
                raise KernelError(errno.EPERM, "changing filesystem options on remount is not supported", where.path)
        final = opts.with_forced(forced if record else ())
        call.audit.update(action="remount", rule=record.rule if record else None, options=final.describe())
        attr_set = final.attr_flags
        attr_clr = _PER_MOUNT & ~attr_set
        if not final.attrs & {"noatime", "strictatime", "relatime", "nodiratime"}:
            attr_clr &= ~(s.MOUNT_ATTR__ATIME | s.MOUNT_ATTR_NODIRATIME)  # MS_REMOUNT keeps atime flags unless given
        session.nshelper().call(SetAttr(attr_set, attr_clr), (where.fd,))
    return Response.success(call.notif.id)
