"""Acting on a FUSE handoff a handler decided: a jailed daemon serves the image (fuse.py, fuse_jail.py).

The daemon's own mount(2) is served here too (`daemon_mount`): its superblock is made on its
/dev/fuse with the forced flags and never attached where the daemon, or the container through
it, could reach it; only the container's target gets it, by way of staging where there is one.
"""

from __future__ import annotations

import errno
import os
import posixpath
import stat

from .. import fdops, fuse, fuse_jail
from .. import syscalls as s
from ..call import Call
from ..errors import KernelError
from ..image import ImageSource, pool_of
from ..loop import device as loop_device
from ..mountopts import MountOptions
from ..nshelper import Attach
from ..paths import Resolved
from ..policy import Decision
from ..seccomp.notify import Response
from ..session import MountRecord
from .kernel import locks_flags


def handoff(
    call: Call, src: ImageSource, where: Resolved, fstype: str, opts: MountOptions, decision: Decision
) -> Response:
    """Hand the mount to a jailed FUSE daemon, then attach its mount at the target (see fuse.py)."""
    t, session = call.target, call.session
    program = fuse.daemon_for(fstype, decision.daemon)
    name = posixpath.basename(program)
    read_only = opts.read_only or name not in fuse.WRITABLE
    assert t.creds is not None
    host_ids = (t.creds.uid, t.creds.gid)
    ids = (host_ids[0] - session.owner[0], host_ids[1] - session.owner[1])
    if src.slot is not None and not opts.read_only and loop_device.read_only(src.slot.host.fd):
        # As the kernel answers a read-write mount of a read-only block device: mount(8) then
        # says "write-protected, mounting read-only" and asks again with MS_RDONLY.
        raise KernelError(errno.EACCES, "the loop device is read-only; mount it read-only", src.policy_path)
    pool = pool_of(call)
    pool.ensure_fuse()  # the device cgroup grant the daemon needs
    if src.slot is not None:
        node = pool.jail_node(src.slot, host_ids, 0o400 if read_only else 0o600)
        jail = fuse_jail.Jail(node, read_only, ids, host_ids)
    else:
        node = -1
        jail = fuse_jail.Jail(src.image.fd, read_only, ids, host_ids)
    try:
        t.check()
        daemon, stderr = fuse.start(
            program, jail, sorted(opts.attrs), target=where.path, ns_pidfd=session.pidfd, cgroups=session.cgroup_paths
        )
    finally:
        if node >= 0:
            os.close(node)
    call.audit.update(daemon=name, daemon_pid=daemon.pid)
    daemon.attrs = (
        opts.attr_flags | s.MOUNT_ATTR_NOSUID | s.MOUNT_ATTR_NODEV | (s.MOUNT_ATTR_RDONLY if read_only else 0)
    )
    session.fuse_starting = daemon
    try:
        mount_fd = fuse.wait_mounted(daemon, stderr, call.serve_daemon)
        try:
            t.check()  # a caller that died meanwhile gets no mount
            mnt_id, dev = _land_or_attach(call, mount_fd, where)
        finally:
            os.close(mount_fd)
    except BaseException:
        daemon.stop()
        daemon.close()
        raise
    finally:
        session.fuse_starting = None
    record = MountRecord(
        mnt_id, dev, -1, src.policy_path, where.path, f"fuse.{name}", -1, read_only, decision.options, decision.rule
    )  # fmt: skip
    session.add_daemon(record, daemon)
    call.audit["options"] = ",".join(["ro" if read_only else "rw", *sorted(opts.attrs)])
    return Response.success(call.notif.id)


def _land_or_attach(call: Call, mount_fd: int, where: Resolved) -> tuple[int, int]:
    """The daemon's detached FUSE mount, its flags set when it was made, landed by way of staging
    (flags locked) or attached directly; returns the container's mount id and the device."""
    session = call.session
    dev = fdops.identity(mount_fd)[1]
    if locks_flags(call):
        return int(session.nshelper().land(mount_fd, where.fd, session.landing, dev)["mnt_id"]), dev
    session.nshelper().call(Attach(), (mount_fd, where.fd))
    return fdops.identity(mount_fd)[0], dev


def daemon_mount(call: Call, fstype: str | None, flags: int, data: str | None) -> Response:
    """The FUSE daemon being started asks for its mount: make its superblock, never attach it.

    The daemon's own mount would live in its jail's namespace, which the container's root may
    enter (it owns its user namespace) and clone it from with its flags unlocked, before the
    supervisor could take it. So the daemon gets success and nothing at its mount point; the
    supervisor makes the superblock on the daemon's /dev/fuse, with the forced flags, detached,
    and attaches it only at the container's target (see `_fuse_mount`).
    """
    daemon, t = call.session.fuse_starting, call.target
    if (
        daemon is None
        or t.listener != daemon.listener
        or daemon.mount_fd >= 0
        or flags & (s.MS_REMOUNT | s.MS_BIND | s.MS_MOVE)
    ):
        raise KernelError(errno.EPERM, "a FUSE daemon of mountwarden's mounts its own file system once, nothing else")
    if fstype is None or (fstype != "fuse" and not fstype.startswith("fuse.")):
        raise KernelError(errno.EPERM, f"a FUSE daemon of mountwarden's mounts only FUSE, not {fstype}")
    fd, options = fuse.daemon_options(data, fstype)
    fuse_fd = t.take_fd(fd)
    try:
        st = os.fstat(fuse_fd)
        if not stat.S_ISCHR(st.st_mode) or st.st_rdev != fuse.FUSE_DEVICE:
            raise KernelError(errno.EINVAL, "the FUSE daemon's fd is not /dev/fuse")
        t.check()
        daemon.mount_fd = call.session.nshelper().fuse_mount(fuse_fd, call.session.userns_fd, options, daemon.attrs)
    finally:
        os.close(fuse_fd)
    call.audit.update(action="fuse-superblock", options=",".join(options))
    return Response.success(call.notif.id)
