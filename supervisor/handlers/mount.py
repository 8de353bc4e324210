"""mount(2): image mounts (kernel, through the container's loop pool, or a FUSE daemon) and
remounts that keep the forced flags.

Only calls that create a superblock or remount reach here (the filter lets binds, moves and
propagation changes run natively). Filesystems the kernel itself lets a user namespace mount
(tmpfs, proc, overlay, fuse, ...) are left to the kernel: whatever the container swaps into its
buffers afterwards, the kernel re-checks that. Everything else is an image mount, decided by
policy and done by the supervisor on its own copy of the arguments, or refused.

Images pinned by digest: the sha256 is taken while the image's bytes are copied into a sealed
memfd (no writes, no growing or shrinking), and the kernel mounts that copy, read-only, from a
loop device of the container's pool bound to it. So what the kernel reads is what was hashed,
whatever the container writes to the file (or to the loop device it bound) afterwards. The copy
costs memory up to the image's size, so the digest is taken only when the image is no larger
than the largest `size.max` of the rules that list digests; an image above it is refused as
unmatched at once, however long a sparse file claims to be.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import os
import posixpath
import stat
from dataclasses import dataclass
from typing import Final

from .. import fdops, fuse, fuse_jail, mountopts, origin
from .. import syscalls as s
from ..errors import KernelError
from ..loop.abi import LO_FLAGS_AUTOCLEAR
from ..loop.pool import BindRequest, LoopPool, Slot
from ..nshelper import Attach, Mount, Reconfigure, SetAttr
from ..paths import Resolved
from ..policy import Decision, MountRequest, Policy, SourceOrigin
from ..probe import kernel_driver, probe_fd
from ..registry import Call
from ..seccomp.notify import Response
from ..session import MountRecord
from ..target import Target

USERNS_FILESYSTEMS: Final = frozenset(
    {"tmpfs", "ramfs", "proc", "sysfs", "devpts", "mqueue", "cgroup", "cgroup2", "overlay", "fuse", "binfmt_misc"}
)
_FSTYPE_MAX: Final = 256
_DATA_MAX: Final = 4096  # the kernel copies at most one page of mount data
_SEALS: Final = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL
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
    if call.caller == "fuse-daemon":
        return daemon_mount(call, fstype, args[3], data)
    if fstype and (fstype in USERNS_FILESYSTEMS or fstype.startswith("fuse.")) and not flags & s.MS_REMOUNT:
        call.audit.update(action="kernel-native", rule="userns-filesystem")
        return Response.continue_(call.notif.id)
    call.require_admin("mounting")
    opts = mountopts.parse(flags, data)
    if flags & s.MS_REMOUNT:
        return _remount(call, target, flags, opts)
    if not source:
        raise KernelError(errno.EINVAL, "a disk image mount needs a source")
    return _mount_image(call, source, target, fstype, opts)


@dataclass
class _Source:
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


def _open_source(call: Call, source: str) -> _Source:
    t = call.target
    image = t.resolve(source)
    try:
        if stat.S_ISBLK(image.st.st_mode):
            slot = _pool(call).slot_for(image.st)
            if slot is None:
                raise KernelError(errno.EPERM, "only the container's own loop devices can be mounted", image.path)
            call.audit.update(device=f"/dev/loop{slot.number}", backing_file=slot.backing_path)
            return _Source(image, os.dup(slot.host.fd), slot.backing_path, slot.backing_origin, slot)
        tree = call.session.tree_at_start
        judged = origin.judge(tree, proc_fd=t.proc, root_fd=t.root, fd=image.fd, path=image.path)
        return _Source(image, _open_as_caller(t, image, os.O_RDONLY), image.path, judged)
    except BaseException:
        image.close()
        raise


def _pool(call: Call) -> LoopPool:
    if call.session.pool is None:
        raise KernelError(errno.ENOSPC, "this container has no loop devices")
    return call.session.pool


def _mount_image(call: Call, source: str, target: str, fstype: str | None, opts: mountopts.MountOptions) -> Response:
    t, session = call.target, call.session
    with t.resolve(target) as where:
        if not stat.S_ISDIR(where.st.st_mode):
            raise KernelError(errno.ENOTDIR, "the mount point is not a directory", where.path)
        src = _open_source(call, source)
        try:
            facts = probe_fd(src.fd)
            call.audit.update(source=src.image.path, target=where.path, probed=facts.fstype, size=facts.size)
            if facts.fstype is None:
                raise KernelError(errno.EINVAL, "the image holds no filesystem mountwarden recognises", src.image.path)
            if fstype not in (None, "", "auto", "none") and kernel_driver(fstype) != kernel_driver(facts.fstype):
                raise KernelError(errno.EINVAL, f"the image is {facts.fstype}, not {fstype}", src.image.path)
            session.sweep()  # mounts the container dropped count no more
            request = MountRequest(
                src.policy_path, where.path, facts.fstype, opts.read_only, opts.fs_options, size=facts.size,
                container=session.info, loop_devices=_pool(call).held_count(), source_origin=src.origin,
            )  # fmt: skip
            copy = _pinned_copy(call, src.fd, request)
            if copy is not None:
                src.copies.append(copy[0])
                request = dataclasses.replace(request, sha256=copy[1])
            call.audit["source_origin"] = src.origin
            decision = _decide(call, request)
            final = opts.with_forced(decision.options)
            mountopts.check_fs_options(facts.fstype, final.fs_options)
            if decision.action == "fuse":
                return _fuse_mount(call, src, where, facts.fstype, final, decision)
            if copy is not None and _pins_digest(session.policy, decision):
                if not final.read_only:
                    raise KernelError(errno.EROFS, "an image pinned by its digest is mounted read-only", src.image.path)
                call.audit["backing"] = "sealed-copy"
                os.close(src.fd)
                src.fd, src.slot = os.dup(copy[0]), None  # a fresh slot on the copy, see the module docstring
            if not final.read_only and src.slot is None:
                os.close(src.fd)
                src.fd = -1
                src.fd = _open_as_caller(t, src.image, os.O_RDWR)
            record = _attach(call, src, where, facts.fstype, final, decision)
        finally:
            src.close()
    session.add(record)
    call.audit.update(loop=f"/dev/loop{record.slot}", host_loop=f"/dev/loop{record.loop}", options=final.describe())
    return Response.success(call.notif.id)


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


def _fuse_mount(
    call: Call, src: _Source, where: Resolved, fstype: str, opts: mountopts.MountOptions, decision: Decision
) -> Response:
    """Hand the mount to a jailed FUSE daemon, then attach its mount at the target (see fuse.py)."""
    from .. import dispatch  # the daemon's own calls are served while this one waits for them

    t, session = call.target, call.session
    program = fuse.daemon_for(fstype, decision.daemon)
    name = posixpath.basename(program)
    read_only = opts.read_only or name not in fuse.WRITABLE
    assert t.creds is not None
    host_ids = (t.creds.uid, t.creds.gid)
    ids = (host_ids[0] - session.owner[0], host_ids[1] - session.owner[1])
    if src.slot is not None:
        jail = fuse_jail.Jail(-1, src.slot.host.rdev, read_only, ids, host_ids)
    else:
        jail = fuse_jail.Jail(src.image.fd, 0, read_only, ids, host_ids)
    _pool(call).ensure_fuse()  # the device cgroup grant the daemon needs
    t.check()
    daemon, stderr = fuse.start(
        program, jail, sorted(opts.attrs), target=where.path, ns_pidfd=session.pidfd, cgroups=session.cgroup_paths
    )
    call.audit.update(daemon=name, daemon_pid=daemon.pid)
    daemon.attrs = (
        opts.attr_flags | s.MOUNT_ATTR_NOSUID | s.MOUNT_ATTR_NODEV | (s.MOUNT_ATTR_RDONLY if read_only else 0)
    )
    session.fuse_starting = daemon
    try:
        mount_fd = fuse.wait_mounted(daemon, stderr, lambda fd: dispatch.serve_one(session, fd, "fuse-daemon"))
        try:
            t.check()  # a caller that died meanwhile gets no mount
            mnt_id, dev = _attach_fuse(call, mount_fd, where)
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


def _attach_fuse(call: Call, mount_fd: int, where: Resolved) -> tuple[int, int]:
    """The daemon's detached FUSE mount, its flags set when it was made, landed by way of staging
    (flags locked) or attached directly; returns the container's mount id and the device."""
    session = call.session
    dev = fdops.identity(mount_fd)[1]
    if _locks_flags(call):
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
    if daemon is None or daemon.mount_fd >= 0 or flags & (s.MS_REMOUNT | s.MS_BIND | s.MS_MOVE):
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


def _locks_flags(call: Call) -> bool:
    """Whether the mount can come by way of staging, so the kernel locks its flags (stager.py)."""
    locked = call.session.landing >= 0
    call.audit["flags_locked"] = locked
    if not locked:
        call.audit["flags_unlocked_because"] = "the container's namespaces were not made by mountwarden run"
    return locked


def _pinned_copy(call: Call, fd: int, request: MountRequest) -> tuple[int, str] | None:
    """A sealed memfd copy of the image and its sha256, when a digest rule could accept it."""
    policy, size = call.session.policy, request.size or 0
    if not policy.needs_digest:
        return None
    if not policy.digest_could_match(request):
        call.audit["sha256"] = "not computed: no digest rule could match this image whatever its digest"
        return None
    bound = _digest_bound(policy)
    if size > bound:
        call.audit["sha256"] = f"not computed: the image is larger than any digest rule allows ({bound} bytes)"
        return None
    return _sealed_copy(fd, size)


def _digest_bound(policy: Policy) -> int:
    """The largest image some digest rule could match: its size.max, or the policy's digest_max_size."""
    bounds = []
    for rule in policy.rules:
        match = rule.match
        if match is not None and match.sha256 is not None:
            own = match.size.max if match.size is not None else None
            bounds.append(min(own, policy.limits.digest_max_size) if own is not None else policy.limits.digest_max_size)
    return max(bounds, default=0)


def _pins_digest(policy: Policy, decision: Decision) -> bool:
    rule = next((r for r in policy.rules if r.name == decision.rule), None)
    return rule is not None and rule.match is not None and rule.match.sha256 is not None


def _sealed_copy(fd: int, size: int, chunk: int = 1 << 20) -> tuple[int, str]:
    """Copy the first `size` bytes behind `fd` into a memfd, hashing them; seal it against change."""
    h = hashlib.sha256()
    copy = os.memfd_create("mountwarden-pinned-image", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        offset = 0
        while offset < size and (data := os.pread(fd, min(chunk, size - offset), offset)):
            h.update(data)
            view = memoryview(data)
            while view:
                view = view[os.pwrite(copy, view, offset + len(data) - len(view)) :]
            offset += len(data)
        fcntl.fcntl(copy, fcntl.F_ADD_SEALS, _SEALS)
    except BaseException:
        os.close(copy)
        raise
    return copy, h.hexdigest()


def _attach(
    call: Call, src: _Source, where: Resolved, fstype: str, opts: mountopts.MountOptions, decision: Decision
) -> MountRecord:
    """Superblock on the slot's device, landed by way of staging (flags locked) or attached directly;
    undone on failure."""
    pool = _pool(call)
    slot = src.slot
    if slot is None:
        slot = pool.slots[pool.get_free()]
        bind = BindRequest(src.fd, src.policy_path, opts.read_only, flags=LO_FLAGS_AUTOCLEAR, backing_origin=src.origin)
        pool.bind(slot, bind)
    device = slot.host
    try:
        call.target.check()  # a caller that died meanwhile gets no mount
        request = Mount(
            decision.idmap, kernel_driver(fstype), slot.number, device.rdev, opts.read_only,
            sorted(opts.attrs), list(opts.sb_flags), list(opts.fs_options),
        )  # fmt: skip
        landing = call.session.landing if _locks_flags(call) else -1
        made = call.session.nshelper().mount(request, where.fd, call.session.userns_fd, landing)
        call.audit["idmapped"] = made["idmapped"]
    except BaseException:
        if src.slot is None:
            pool.last_use_ended(device.number)  # the slot bound for this mount alone
        raise
    return MountRecord(
        made["mnt_id"], made["dev"], made["root_ino"], src.policy_path, where.path, fstype, device.number,
        opts.read_only, decision.options, decision.rule, slot=slot.number,
    )  # fmt: skip


def _open_as_caller(t: Target, image: Resolved, mode: int) -> int:
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


def _remount(call: Call, target: str, flags: int, opts: mountopts.MountOptions) -> Response:
    """Remounts never run natively: a bare MS_REMOUNT|MS_BIND would strip forced flags (see filter)."""
    t, session = call.target, call.session
    with t.resolve(target) as where:
        record = session.record_for_dev(where.st.st_dev)
        call.audit.update(target=where.path, remount="bind" if flags & s.MS_BIND else "superblock")
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
        if final.attrs & {"noatime", "strictatime", "relatime", "nodiratime"}:
            attr_clr |= s.MOUNT_ATTR__ATIME  # mount_setattr changes the atime mode only as a whole field
        else:
            attr_clr &= ~(s.MOUNT_ATTR__ATIME | s.MOUNT_ATTR_NODIRATIME)  # MS_REMOUNT keeps atime flags unless given
        if record is None:  # the container's own mount: changed with its own rights, on our fd
            superblock = not flags & s.MS_BIND
            request = Reconfigure(
                superblock, final.read_only, list(final.sb_flags), list(final.fs_options), attr_set, attr_clr
            )
            session.nshelper().call(request, (where.fd, session.userns_fd))
        else:
            session.nshelper().call(SetAttr(attr_set, attr_clr), (where.fd,))
    return Response.success(call.notif.id)
