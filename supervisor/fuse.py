"""The FUSE handoff: an image policy does not trust to the kernel is served by a user-space daemon.

The daemon is the host's program run in a jail (supervisor/fuse_jail.py): the host's /usr, a
locked mount namespace of the container's user namespace, the caller's ids, CAP_SYS_ADMIN there
only, a clean environment and the container's own seccomp filter, whose listener the supervisor
serves like the container's. It opens the image (a bind of the supervisor's fd) with the
caller's rights and mounts FUSE on its private mount point, which the kernel allows a user
namespace; the supervisor then clones that mount, sets the forced flags on the clone and
attaches it at the container's target, by way of the staging namespace where there is one
(stager.py), so that the kernel locks those flags against every process of the container. A hostile image
can at worst crash an unprivileged process of the container, and a daemon the container takes
over can do nothing the container's root cannot.
The daemon lives in the container's pid namespace and cgroups, so it ends with the container
whatever way the container or the supervisor ends, and it ends with its mount: the container's
mount is the superblock's only one, so unmounting it ends the FUSE connection.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import shutil
import signal
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

import prctl

from . import fuse_jail
from . import syscalls as s
from .errors import KernelError
from .policy import Policy
from .seccomp import filter as seccomp_filter

DEFAULT_DAEMONS: Final = {
    "ext2": "fuse2fs",
    "ext3": "fuse2fs",
    "ext4": "fuse2fs",
    "squashfs": "squashfuse",
    "erofs": "erofsfuse",
    # Filesystems this kernel may lack a driver for (Debian 12's kernels build them; a
    # minimal kernel answers ENODEV on the kernel path): Debian has read-only daemons.
    "vfat": "fusefat",
    "iso9660": "fuseiso",
}
WRITABLE: Final = frozenset({"fuse2fs"})  # daemons that can serve a read-write mount
START_TIMEOUT: Final = 10.0
_STDERR_MAX: Final = 400


@dataclass
class FuseDaemon:
    """A running daemon: its host pid, a pidfd to watch it, and what it serves."""

    name: str
    pid: int
    pidfd: int
    target: str
    listener: int = -1  # the daemon's own seccomp listener, served in the session's loop
    attrs: int = 0  # the forced mount attributes its FUSE mount gets (MOUNT_ATTR_*)
    mount_fd: int = -1  # its FUSE mount, detached, once its mount(2) was served (`daemon_mount`)

    def alive(self) -> bool:
        return not select.select([self.pidfd], [], [], 0)[0]

    def stop(self) -> None:
        """Ask the daemon to go (it also exits by itself once its mount is gone)."""
        if self.pidfd >= 0:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(self.pidfd, signal.SIGTERM)

    def close(self) -> None:
        for fd in (self.pidfd, self.listener, self.mount_fd):
            if fd >= 0:
                os.close(fd)
        self.pidfd = self.listener = self.mount_fd = -1


def missing_daemons(policy: Policy) -> list[str]:
    """Sentences for `policy check`: fuse rules whose daemon this host does not have."""
    out = []
    for rule in policy.rules:
        if rule.action != "fuse":
            continue
        if rule.daemon is not None:
            wanted = {rule.daemon: "its images"}
        else:
            types = rule.match.fstype if rule.match and rule.match.fstype else tuple(DEFAULT_DAEMONS)
            wanted = {DEFAULT_DAEMONS[t]: f"{t} images" for t in types if t in DEFAULT_DAEMONS}
        for program, what in sorted(wanted.items()):
            if shutil.which(program) is None:
                out.append(f"rule {rule.name!r} sends {what} to {program}, which is not installed on this host")
    return out


def daemon_for(fstype: str, named: str | None) -> str:
    """The host path of the daemon for `fstype`, or KernelError(ENODEV) saying what is missing.

    Only programs under the trees the jail shows (the host's /usr, /bin, /sbin, /lib*) can run.
    """
    name = named or DEFAULT_DAEMONS.get(fstype)
    if name is None:
        raise KernelError(errno.ENODEV, f"no FUSE daemon is known for {fstype}; name one in the rule (daemon:)")
    found = shutil.which(name, path=fuse_jail.ENV["PATH"])
    if found is None:
        raise KernelError(errno.ENODEV, f"the FUSE daemon {name} for {fstype} is not installed on this host")
    path = os.path.realpath(found)
    if path.split("/")[1] not in fuse_jail.HOST_TREES:
        raise KernelError(errno.ENODEV, f"the FUSE daemon {path} is outside /usr; install it there")
    return path


LIBFUSE2: Final = frozenset({"fuse2fs", "fusefat", "fuseiso"})  # libfuse 2 refuses a non-empty mount point unless told
# fuseiso parses only its own options before the image and mount point and takes FUSE's after
# them; -n keeps it from writing $HOME/.mtab.fuseiso.
_OWN_OPTIONS_FIRST: Final = {"fuseiso": ("-n",)}


def argv(name: str, read_only: bool, attrs: Sequence[str]) -> list[str]:
    """The daemon's command line: foreground, the forced options, the jail's image and mount point."""
    opts = [*sorted({"nosuid", "nodev", *attrs}), "allow_other", "ro" if read_only else "rw"]
    if name in LIBFUSE2:
        opts.append("nonempty")  # as mount(2) itself allows
    fuse_args = ["-f", "-o", ",".join(opts)]
    if name in _OWN_OPTIONS_FIRST:
        return [name, *_OWN_OPTIONS_FIRST[name], fuse_jail.IMAGE, fuse_jail.MOUNT_POINT, *fuse_args]
    return [name, *fuse_args, fuse_jail.IMAGE, fuse_jail.MOUNT_POINT]


def start(
    program: str, jail: fuse_jail.Jail, attrs: Sequence[str], *, target: str, ns_pidfd: int, cgroups: Sequence[str]
) -> tuple[FuseDaemon, int]:
    """Start `program` jailed in the container of the task behind `ns_pidfd` (see fuse_jail).

    Returns the daemon and a memfd holding its stderr, for `wait_mounted`. A file rather than a
    pipe: nobody reads a pipe once the daemon runs, and a write to it would kill the daemon.
    """
    name = os.path.basename(program)
    err = os.memfd_create(f"{name}-stderr", os.MFD_CLOEXEC)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    launcher = os.fork()
    if launcher == 0:  # pragma: no cover - the launcher: build the jail, enter it, fork the daemon
        try:
            ours.close()
            s.prctl(s.PR_SET_PDEATHSIG, signal.SIGKILL)
            prctl.set_name("mw-fuse-launch")
            for group in cgroups:
                with open(os.path.join(group, "cgroup.procs"), "w") as f:
                    f.write(str(os.getpid()))
            namespaces = fuse_jail.own_namespaces(ns_pidfd)
            fuse_jail.build(jail, ns_pidfd)
            fuse_jail.enter(jail, ns_pidfd, namespaces)
            child = os.fork()
            if child == 0:
                _exec_daemon(program, argv(name, jail.read_only, attrs), theirs, err)
            theirs.send(str(child).encode())
        except BaseException as exc:
            with contextlib.suppress(OSError):
                theirs.send(f"error: {exc}".encode())
        finally:
            os._exit(0)
    theirs.close()
    try:
        os.waitpid(launcher, 0)
        raw = ours.recv(256)
        if not raw.isdigit():
            os.close(err)
            why = raw.decode(errors="replace").removeprefix("error: ") or "the launcher died"
            raise KernelError(errno.EIO, f"the FUSE daemon {name} could not be started: {why}")
        pid = int(raw)
        pidfd = s.pidfd_open(pid)
        _, fds, _, _ = socket.recv_fds(ours, 16, 1)
    finally:
        ours.close()
    daemon = FuseDaemon(name, pid, pidfd, target, fds[0] if fds else -1)
    if daemon.listener < 0:  # it died before loading its filter; its stderr says why
        daemon.stop()
        daemon.close()
        text = " ".join(os.pread(err, 4096, 0).decode(errors="replace").split())[:_STDERR_MAX] or "no message"
        os.close(err)
        raise KernelError(errno.EIO, f"the FUSE daemon {name} could not be started: {text}")
    return daemon, err


def _exec_daemon(program: str, args: list[str], sock: socket.socket, err: int) -> None:  # pragma: no cover
    """In the daemon: its own session (no terminal of the operator's), stdio, the container's
    filter (its listener to the supervisor), exec."""
    os.setsid()
    null = os.open("/dev/null", os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.dup2(err, 2)
    listener = seccomp_filter.install()
    socket.send_fds(sock, [b"listener"], [listener])
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))
    os.execve(program, args, fuse_jail.ENV)


def wait_mounted(daemon: FuseDaemon, err_fd: int, serve: Callable[[int], None], timeout: float = START_TIMEOUT) -> int:
    """Serve the daemon's calls until its mount(2) has been answered with its FUSE superblock
    (see `daemon_mount`); the detached mount's fd, which the caller then owns.

    A daemon that exits or stalls is an error carrying its own complaint (its stderr,
    shortened), so the audit line says which daemon refused the image and why.
    """
    deadline = time.monotonic() + timeout
    calls = select.poll()
    calls.register(daemon.listener, select.POLLIN)
    try:
        while daemon.mount_fd < 0:
            # POLLIN only: a listener whose task died hangs up, and RECV on it would block.
            if any(events & select.POLLIN for _, events in calls.poll(5)):
                serve(daemon.listener)
                continue
            if not daemon.alive():
                stderr = os.pread(err_fd, 4096, 0)
                text = " ".join(stderr.decode(errors="replace").split())[:_STDERR_MAX] or "no message"
                raise KernelError(errno.EINVAL, f"the FUSE daemon {daemon.name} refused the image: {text}")
            if time.monotonic() > deadline:
                daemon.stop()
                raise KernelError(
                    errno.ETIMEDOUT, f"the FUSE daemon {daemon.name} did not mount within {timeout:.0f} s"
                )
        mount_fd, daemon.mount_fd = daemon.mount_fd, -1
        return mount_fd
    finally:
        os.close(err_fd)


FUSE_DEVICE: Final = os.makedev(10, 229)
# What a daemon may ask of its FUSE superblock (libfuse's mount options, fuse(4)); `fd` is
# taken apart, everything else is refused: the mount's flags are the supervisor's.
_PASSED: Final = frozenset({"rootmode", "user_id", "group_id", "allow_other", "default_permissions", "max_read",
                            "blksize", "subtype"})  # fmt: skip


def daemon_options(data: str | None, fstype: str) -> tuple[int, list[str]]:
    """The daemon's fd number for /dev/fuse and the fsconfig options, from its mount(2) data."""
    fd, options = -1, []
    for item in (data or "").split(","):
        key, eq, value = item.partition("=")
        if not key:
            continue
        if key == "fd" and eq and value.isdigit():
            fd = int(value)
        elif key in _PASSED:
            options.append(item)
        else:
            raise KernelError(
                errno.EINVAL, f"the FUSE daemon asked for option {key!r}, which mountwarden does not pass"
            )
    if fd < 0:
        raise KernelError(errno.EINVAL, "the FUSE daemon's mount names no /dev/fuse fd")
    subtype = fstype.partition(".")[2]
    if subtype and not any(o.startswith("subtype=") for o in options):
        options.append(f"subtype={subtype}")
    return fd, options
