"""mount(2): image mounts (kernel, through the container's loop pool, or a FUSE daemon) and
remounts that keep the forced flags.

Only calls that create a superblock or remount reach here (the filter lets binds, moves and
propagation changes run natively). Filesystems the kernel itself lets a user namespace mount
(tmpfs, proc, overlay, fuse, ...) are left to the kernel: whatever the container swaps into its
buffers afterwards, the kernel re-checks that. Everything else is an image mount, decided by
policy and done by the supervisor on its own copy of the arguments, or refused.

This module decides (reads the arguments once, resolves, probes, asks the policy); what it
decided is done by supervisor/actions/ (a kernel mount through the pool, a FUSE handoff), and
images pinned by digest are copied and hashed by supervisor/digest.py.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import stat
from typing import Final

from .. import digest, mountopts
from .. import syscalls as s
from ..actions import fuse as actions_fuse
from ..actions import kernel
from ..call import Call
from ..errors import KernelError
from ..fuse import DEFAULT_DAEMONS
from ..image import ImageSource, open_as_caller, open_source, pool_of
from ..nshelper import Reconfigure, SetAttr
from ..paths import Resolved
from ..policy import Decision, MountRequest
from ..probe import kernel_driver, probe_fd
from ..seccomp import filter as seccomp_filter
from ..seccomp.notify import Response
from ..target import Target

USERNS_FILESYSTEMS: Final = frozenset(
    {"tmpfs", "ramfs", "proc", "sysfs", "devpts", "mqueue", "cgroup", "cgroup2", "overlay", "fuse", "binfmt_misc"}
)
_DATA_MAX: Final = 4096  # the kernel copies at most one page of mount data
_PER_MOUNT: Final = (
    s.MOUNT_ATTR_RDONLY
    | s.MOUNT_ATTR_NOSUID
    | s.MOUNT_ATTR_NODEV
    | s.MOUNT_ATTR_NOEXEC
    | s.MOUNT_ATTR_NODIRATIME
    | s.MOUNT_ATTR__ATIME
    | s.MOUNT_ATTR_NOSYMFOLLOW
)


def handle(call: Call) -> Response:
    t, args = call.target, call.notif.args
    # In the kernel's order: type, source and data are copied before the target is looked up.
    fstype = _mount_string(t, args[2], "filesystem type")
    source = _mount_string(t, args[0], "source")
    data = t.read_optional(args[4], _DATA_MAX, what="mount data")
    target = t.read_cstring(args[1], what="target")
    t.check()  # everything below acts on these copies only
    flags = args[3]
    if flags & s.MS_MGC_MSK == s.MS_MGC_VAL:  # the old magic number: the kernel drops bits 16-31
        flags &= ~s.MS_MGC_MSK
    call.audit.update(source=source, target=target, fstype=fstype, flags=f"{flags:#x}")
    call.audit["secret"] = {"data": data}  # mount data can carry credentials: trace level only
    if call.caller == "fuse-daemon":
        return actions_fuse.daemon_mount(call, fstype, flags, data)
    if not flags & s.MS_REMOUNT and flags & seccomp_filter.NO_NEW_SB:
        # A bind, move or propagation change (a runtime's profile notifies them, see
        # seccomp/filter.py): it copies flags unchanged and makes no superblock.
        call.audit.update(action="kernel-native", rule="bind-move-propagation")
        return Response.continue_(call.notif.id)
    if fstype and (fstype in USERNS_FILESYSTEMS or fstype.startswith("fuse.")) and not flags & s.MS_REMOUNT:
        call.audit.update(action="kernel-native", rule="userns-filesystem")
        return Response.continue_(call.notif.id)
    call.require_admin("mounting")
    opts = mountopts.parse(flags, data)
    if flags & s.MS_REMOUNT:
        return _remount(call, target, flags, opts)
    return _mount_image(call, source, target, fstype, opts)


def _mount_string(t: Target, addr: int, what: str) -> str | None:
    """Source or type, copied as the kernel's copy_mount_string does: one longer than PATH_MAX
    is EINVAL there (strndup_user), not ENAMETOOLONG as for a path it looks up."""
    try:
        return t.read_optional(addr, what=what)
    except KernelError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            raise KernelError(errno.EINVAL, exc.what) from None
        raise


def _known_type(fstype: str | None) -> str:
    """`fstype` as the kernel's do_new_mount judges it: EINVAL without one (nothing is probed for
    a caller that named no type), ENODEV for a name that is neither a filesystem of this kernel
    nor one mountwarden serves through a FUSE daemon."""
    if fstype is None:
        raise KernelError(errno.EINVAL, "a new mount needs a filesystem type")
    if fstype not in DEFAULT_DAEMONS and fstype not in _kernel_filesystems():
        raise KernelError(errno.ENODEV, f"there is no filesystem type {fstype!r} on this system")
    return fstype


def _kernel_filesystems() -> set[str]:
    """The names in /proc/filesystems (read each time: a module may register one later)."""
    with open("/proc/filesystems") as f:
        return {line.split()[-1] for line in f if line.strip()}


def _mount_image(
    call: Call, source: str | None, target: str, fstype: str | None, opts: mountopts.MountOptions
) -> Response:
    t, session = call.target, call.session
    with t.resolve(target) as where:
        fstype = _known_type(fstype)
        if not source:
            raise KernelError(errno.EINVAL, "a disk image mount needs a source")
        if not stat.S_ISDIR(where.st.st_mode):
            raise KernelError(errno.ENOTDIR, "the mount point is not a directory", where.path)
        src = open_source(call, source)
        try:
            facts = probe_fd(src.fd)
            call.audit.update(source=src.image.path, target=where.path, probed=facts.fstype, size=facts.size)
            if facts.fstype is None:
                raise KernelError(errno.EINVAL, "the image holds no filesystem mountwarden recognises", src.image.path)
            if kernel_driver(fstype) != kernel_driver(facts.fstype):
                raise KernelError(errno.EINVAL, f"the image is {facts.fstype}, not {fstype}", src.image.path)
            session.sweep()  # mounts the container dropped count no more
            request = MountRequest(
                src.policy_path, where.path, facts.fstype, opts.read_only, opts.fs_options, size=facts.size,
                container=session.info, loop_devices=pool_of(call).held_count(), source_origin=src.origin,
            )  # fmt: skip
            copy = digest.pinned_copy(call, src.fd, request)
            if copy is not None:
                src.copies.append(copy[0])
                request = dataclasses.replace(request, sha256=copy[1])
            call.audit["source_origin"] = src.origin
            decision = _decide(call, request)
            final = opts.with_forced(decision.options)
            mountopts.check_fs_options(facts.fstype, final.fs_options)
            if decision.action == "fuse":
                return actions_fuse.handoff(call, src, where, facts.fstype, final, decision)
            if copy is not None and digest.pins_digest(session.policy, decision):
                if not final.read_only:
                    raise KernelError(errno.EROFS, "an image pinned by its digest is mounted read-only", src.image.path)
                call.audit["backing"] = "sealed-copy"
                os.close(src.fd)
                src.fd, src.slot = os.dup(copy[0]), None  # a fresh slot on the copy, see the module docstring
            if not final.read_only and src.slot is None:
                os.close(src.fd)
                src.fd = -1
                src.fd = open_as_caller(t, src.image, os.O_RDWR)
            _refuse_same_again(call, src, where)
            record = kernel.attach(call, src, where, facts.fstype, final, decision)
        finally:
            src.close()
    session.add(record)
    call.audit.update(loop=f"/dev/loop{record.slot}", host_loop=f"/dev/loop{record.loop}", options=final.describe())
    return Response.success(call.notif.id)


def _refuse_same_again(call: Call, src: ImageSource, where: Resolved) -> None:
    """EBUSY for the device's filesystem on the mount point where it already is on top, as the
    kernel's do_add_mount refuses the same superblock on the same mount point."""
    record = call.session.record_for_dev(where.st.st_dev)
    if src.slot is not None and record is not None and record.slot == src.slot.number:
        if where.st.st_ino == record.root_ino:
            raise KernelError(errno.EBUSY, f"/dev/loop{record.slot} is already mounted here", where.path)


def _decide(call: Call, request: MountRequest) -> Decision:
    """Policy's verdict; in learn mode a denial is served the safest way and remembered."""
    session = call.session
    decision = session.policy.evaluate(request)
    call.audit.update(rule=decision.rule, action=decision.action, reason=decision.reason)
    if session.learned is not None:
        session.learned.append(request)
        if decision.action == "deny":
            call.audit["action"] = "would-deny"
            decision = dataclasses.replace(
                decision, action="kernel", errno=0, options=("ro", "noexec"), reason="learn mode: served read-only"
            )
    if decision.action not in ("kernel", "fuse"):
        raise KernelError(decision.errno, decision.reason)
    return decision


def _remount(call: Call, target: str, flags: int, opts: mountopts.MountOptions) -> Response:
    """Remounts never run natively: a bare MS_REMOUNT|MS_BIND would strip forced flags (see filter)."""
    t, session = call.target, call.session
    with t.resolve(target) as where:
        record = session.record_for_dev(where.st.st_dev)
        call.audit.update(target=where.path, remount="bind" if flags & s.MS_BIND else "superblock")
        forced = ("nosuid", "nodev", *(record.forced if record else ()))
        if record is not None and not flags & s.MS_BIND:
            if record.read_only and not opts.read_only:
                if _device_read_only(record.dev):
                    raise KernelError(errno.EACCES, "the loop device is read-only", where.path)
                raise KernelError(errno.EROFS, "this image was mounted read-only and stays so", where.path)
            if opts.fs_options:
                raise KernelError(errno.EPERM, "changing filesystem options on remount is not supported", where.path)
        final = opts.with_forced(forced if record else ())
        call.audit.update(action="remount", rule=record.rule if record else None, options=final.describe())
        attr_set = final.attr_flags
        attr_clr = _PER_MOUNT & ~attr_set
        if final.attrs & {"noatime", "strictatime", "relatime", "nodiratime"}:
            attr_clr |= s.MOUNT_ATTR__ATIME  # mount_setattr changes the atime mode only as a whole field
        else:
            attr_clr &= ~(s.MOUNT_ATTR__ATIME | s.MOUNT_ATTR_NODIRATIME)  # MS_REMOUNT keeps atime flags unless given
        if record is None:  # the container's own mount: changed with its own rights, on our fd
            superblock = not flags & s.MS_BIND
            request = Reconfigure(
                superblock, final.read_only, final.remount_sb_flags, list(final.fs_options), attr_set, attr_clr
            )
            session.nshelper().call(request, (where.fd, session.userns_fd))
        else:
            if not flags & s.MS_BIND and record.mnt_id not in session.daemons:
                # Not on a FUSE superblock: reconfiguring it would wait on the container's daemon.
                _reconfigure_flags(where, final)
            session.nshelper().call(SetAttr(attr_set, attr_clr), (where.fd,))
    return Response.success(call.notif.id)


def _device_read_only(dev: int) -> bool:
    """Whether the superblock `dev` is on a read-only block device (its sysfs `ro`, the host's own
    view); a FUSE superblock has no block device."""
    try:
        with open(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/ro") as f:
            return f.read().strip() == "1"
    except FileNotFoundError:
        return False


def _reconfigure_flags(where: Resolved, opts: mountopts.MountOptions) -> None:
    """The superblock flags of a remount (ro, sync, lazytime, mand) on a superblock the supervisor made.

    Its filesystem options stay as the policy allowed them; fspick acts on the superblock of
    the mount root `where.fd` is (EINVAL on any other directory, as MS_REMOUNT there is), and
    needs no entry into the container's mount namespace.
    """
    fsfd = s.fspick(where.fd)
    try:
        for flag in opts.remount_sb_flags:
            s.fsconfig(fsfd, s.FSCONFIG_SET_FLAG, flag)
        s.fsconfig(fsfd, s.FSCONFIG_CMD_RECONFIGURE)
    finally:
        os.close(fsfd)
