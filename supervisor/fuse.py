"""The FUSE handoff: an image policy does not trust to the kernel is served by a user-space daemon.

The daemon runs as the caller (container root, as a rule) inside the container's user, mount
and pid namespaces and its device cgroups, outside the seccomp filter: it opens the image with
the container's own rights and does the FUSE mount itself, which the kernel allows a user
namespace. A hostile image can at worst crash an unprivileged process of the container. The
daemon lives in the container's pid namespace, so it ends with the container whatever way the
container or the supervisor ends.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import select
import shutil
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from . import syscalls as s
from .errors import KernelError
from .policy import Policy

DEFAULT_DAEMONS: Final = {
    "ext2": "fuse2fs",
    "ext3": "fuse2fs",
    "ext4": "fuse2fs",
    "squashfs": "squashfuse",
    "erofs": "erofsfuse",
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

    def alive(self) -> bool:
        return not select.select([self.pidfd], [], [], 0)[0]

    def stop(self) -> None:
        """Ask the daemon to go (it also exits by itself once its mount is gone)."""
        if self.pidfd >= 0:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(self.pidfd, signal.SIGTERM)

    def close(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


def mounts(mountinfo: str) -> dict[int, tuple[str, str, int]]:
    """Mount id -> (mount point, fstype, st_dev) from a /proc/<pid>/mountinfo text.

    The supervisor cannot stat a FUSE mount of the container (the kernel lets only the FUSE
    connection's user namespace in, even with allow_other), so it learns about the mount here.
    """
    found = {}
    for line in mountinfo.splitlines():
        fields = line.split()
        sep = fields.index("-")
        major, minor = (int(x) for x in fields[2].split(":"))
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
        found[int(fields[0])] = (point, fields[sep + 1], os.makedev(major, minor))
    return found


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
    """The daemon program for `fstype`, or KernelError(ENODEV) saying what is missing."""
    name = named or DEFAULT_DAEMONS.get(fstype)
    if name is None:
        raise KernelError(errno.ENODEV, f"no FUSE daemon is known for {fstype}; name one in the rule (daemon:)")
    if shutil.which(name) is None:
        raise KernelError(errno.ENODEV, f"the FUSE daemon {name} for {fstype} is not installed on this host")
    return name


LIBFUSE2: Final = frozenset({"fuse2fs"})  # libfuse 2 refuses a non-empty mount point unless told


def argv(name: str, image: str, target: str, read_only: bool, attrs: Sequence[str]) -> list[str]:
    """The daemon's command line: foreground, the forced options, the image's path in the container."""
    opts = [*sorted({"nosuid", "nodev", *attrs}), "allow_other", "ro" if read_only else "rw"]
    if name in LIBFUSE2:
        opts.append("nonempty")  # as mount(2) itself allows
    return [name, "-f", "-o", ",".join(opts), image, target]


def start(
    name: str,
    image: str,
    target: str,
    *,
    read_only: bool,
    attrs: Sequence[str],
    ns_pidfd: int,
    ids: tuple[int, int],
    cgroups: Sequence[str],
) -> tuple[FuseDaemon, int]:
    """Start the daemon in the namespaces of the task behind `ns_pidfd`, as `ids` (uid, gid there).

    Returns the daemon and a memfd holding its stderr, for `wait_mounted`. A file rather than a
    pipe: nobody reads a pipe once the daemon runs, and a write to it would kill the daemon.
    """
    path = shutil.which(name)
    assert path is not None
    err = os.memfd_create(f"{name}-stderr", os.MFD_CLOEXEC)
    pid_r, pid_w = os.pipe()
    launcher = os.fork()
    if launcher == 0:  # pragma: no cover - the launcher: enter the namespaces, fork the daemon, go
        try:
            os.close(pid_r)
            s.prctl(s.PR_SET_PDEATHSIG, signal.SIGKILL)
            for group in cgroups:
                with open(os.path.join(group, "cgroup.procs"), "w") as f:
                    f.write(str(os.getpid()))
            s.setns(ns_pidfd, s.CLONE_NEWUSER | s.CLONE_NEWNS | s.CLONE_NEWPID)
            os.setgroups([])
            os.setresgid(ids[1], ids[1], ids[1])
            os.setresuid(ids[0], ids[0], ids[0])
            daemon = os.fork()
            if daemon == 0:
                null = os.open("/dev/null", os.O_RDWR)
                os.dup2(null, 0)
                os.dup2(null, 1)
                os.dup2(err, 2)
                os.closerange(3, os.sysconf("SC_OPEN_MAX"))
                os.chdir("/")
                os.execv(path, argv(name, image, target, read_only, attrs))
            os.write(pid_w, str(daemon).encode())
        finally:
            os._exit(0)
    os.close(pid_w)
    try:
        os.waitpid(launcher, 0)
        raw = os.read(pid_r, 32)
    finally:
        os.close(pid_r)
    if not raw:
        os.close(err)
        raise KernelError(errno.EIO, f"the FUSE daemon {name} could not be started")
    pid = int(raw)
    return FuseDaemon(name, pid, s.pidfd_open(pid), target), err


def wait_mounted(daemon: FuseDaemon, err_fd: int, mounted: Callable[[], bool], timeout: float = START_TIMEOUT) -> None:
    """Wait until `mounted()` says the mount is there; a daemon that exits or stalls is an error.

    The error carries the daemon's own complaint (its stderr, shortened), so the audit line
    says which daemon refused the image and why.
    """
    deadline = time.monotonic() + timeout
    try:
        while True:
            if mounted():
                return
            if not daemon.alive():
                stderr = os.pread(err_fd, 4096, 0)
                text = " ".join(stderr.decode(errors="replace").split())[:_STDERR_MAX] or "no message"
                raise KernelError(errno.EINVAL, f"the FUSE daemon {daemon.name} refused the image: {text}")
            if time.monotonic() > deadline:
                daemon.stop()
                raise KernelError(
                    errno.ETIMEDOUT, f"the FUSE daemon {daemon.name} did not mount within {timeout:.0f} s"
                )
            time.sleep(0.005)
    finally:
        os.close(err_fd)
