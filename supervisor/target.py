"""The notifying task, pinned before anything it says is trusted.

Ordering rule: open every handle on the task (pidfd, /proc/<tid>, mem, root, cwd, status,
its user and mount namespaces) first, then check SECCOMP_IOCTL_NOTIF_ID_VALID. Only then do
the handles provably belong to the task that made the call, not to a recycled tid.

Arguments are read from memory once, with process_vm_readv (copy_from_user's rules: a
PROT_NONE page is EFAULT; /proc/<tid>/mem would read it through FOLL_FORCE), and ID_VALID is
checked after every read, which also proves the tid still named the caller while it was read;
every later decision uses those copies. Results are written through the pinned mem handle,
only where the task's own maps say it could write (mem alone would write read-only pages).
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final

from . import syscalls as sys_
from .errors import KernelError
from .paths import PATH_MAX, Resolved, resolve
from .seccomp import notify

CAP_DAC_OVERRIDE: Final = 1
CAP_SYS_ADMIN: Final = 21
ALL_CAPS: Final = (1 << 64) - 1
_PAGE: Final = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class Creds:
    """The task's ids as the host sees them, and its effective capabilities over its mount
    namespace: what ns_capable(mnt_ns->user_ns, cap) would grant it, not its CapEff (which is
    relative to the task's own user namespace, and full in any namespace it just created)."""

    uid: int
    gid: int
    fsuid: int
    fsgid: int
    groups: tuple[int, ...]
    cap_eff: int

    def has_cap(self, cap: int) -> bool:
        return bool(self.cap_eff >> cap & 1)


def _parse_status(text: str, caps_over_mnt_ns: Callable[[int, int], int]) -> Creds:
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    uids = [int(x) for x in fields["Uid"].split()]
    gids = [int(x) for x in fields["Gid"].split()]
    groups = tuple(int(x) for x in fields.get("Groups", "").split())
    caps = caps_over_mnt_ns(int(fields["CapEff"].strip(), 16), uids[1])
    return Creds(uids[0], gids[0], uids[3], gids[3], groups, caps)


def _same_ns(a: int, b: int) -> bool:
    sa, sb = os.fstat(a), os.fstat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def caps_over(owner: int, caller_userns: int, cap_eff: int, euid: int) -> int:
    """The capabilities a task holds in user namespace `owner` (cap_capable in the kernel).

    In its own namespace, its CapEff. In a descendant namespace, none, unless it owns (by
    euid) the child of its own namespace on the way down, which gives it all. Anywhere else,
    none. `owner` is consumed (closed).
    """
    ns = owner
    try:
        while True:
            if _same_ns(ns, caller_userns):
                return cap_eff
            try:
                parent = sys_.ns_get_parent(ns)
            except KernelError:  # the top of the supervisor's view: not below the caller's namespace
                return 0
            try:
                found_owner = _same_ns(parent, caller_userns) and sys_.ns_get_owner_uid(ns) == euid
            finally:
                os.close(ns)
                ns = parent
            if found_owner:
                return ALL_CAPS
    finally:
        os.close(ns)


class Target:
    """Handles on one notifying task. Use as a context manager; see the module docstring.

    .. warning:: the handles are valid only after `pin` returned; `read_*` may raise
       KernelError(EFAULT) for a bad pointer, and `check` raises KernelError(ENOENT) once the
       call is gone (the task died or was interrupted).
    """

    def __init__(self, listener: int, notif: notify.Notification) -> None:
        self.listener = listener
        self.notif = notif
        self.pid = notif.pid
        self._fds: list[int] = []
        self.pidfd = self.proc = self.mem = self.root = self.userns = self.mntns = -1
        self.creds: Creds | None = None
        self.cwd_path = "/"
        self.root_path = "/"

    def pin(self) -> Target:
        if self.pid <= 0:
            raise KernelError(errno.EPERM, "the calling task is not visible from the supervisor's pid namespace")
        try:
            self.pidfd = self._keep(sys_.pidfd_open(self.pid, sys_.PIDFD_THREAD))
            self.proc = self._keep(os.open(f"/proc/{self.pid}", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))
            self.mem = self._keep(os.open("mem", os.O_RDWR | os.O_CLOEXEC, dir_fd=self.proc))
            self.root = self._keep(os.open("root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.proc))
            self.userns = self._keep(os.open("ns/user", os.O_RDONLY | os.O_CLOEXEC, dir_fd=self.proc))
            self.mntns = self._keep(os.open("ns/mnt", os.O_RDONLY | os.O_CLOEXEC, dir_fd=self.proc))
            status = self._read_proc("status")
            cwd = os.readlink("cwd", dir_fd=self.proc)
            root = os.readlink("root", dir_fd=self.proc)
        except OSError as exc:
            raise KernelError(exc.errno or errno.ESRCH, "the calling task went away while being pinned") from None
        self.check()
        self.creds = _parse_status(
            status, lambda cap_eff, euid: caps_over(sys_.ns_get_userns(self.mntns), self.userns, cap_eff, euid)
        )
        self.cwd_path = _relative_to_root(cwd, root)
        self.root_path = root
        return self

    def _keep(self, fd: int) -> int:
        self._fds.append(fd)
        return fd

    def _read_proc(self, name: str, limit: int | None = 65536) -> str:
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=self.proc)
        try:
            if limit is not None:
                return os.read(fd, limit).decode(errors="replace")
            with os.fdopen(os.dup(fd), "rb") as f:
                return f.read().decode(errors="replace")
        finally:
            os.close(fd)

    def check(self) -> None:
        """Raise unless the notification still stands (the task alive and still in the call)."""
        if not notify.id_valid(self.listener, self.notif.id):
            raise KernelError(errno.ENOENT, "the call was abandoned (task died or was interrupted)")

    def read_cstring(self, addr: int, limit: int = PATH_MAX, what: str = "string") -> str:
        """Copy a NUL-terminated string out of the task, page by page, at most `limit` bytes.

        Reads stop at page boundaries so a string that ends just before an unmapped page is
        still read, as the kernel's own strncpy_from_user would.
        """
        if addr == 0:
            raise KernelError(errno.EFAULT, f"{what} is a NULL pointer")
        out = bytearray()
        while len(out) < limit:
            want = min(_PAGE - (addr + len(out)) % _PAGE, limit - len(out))
            chunk = self._read(addr + len(out), want)
            if not chunk:
                raise KernelError(errno.EFAULT, f"{what} points to memory the task cannot read")
            nul = chunk.find(b"\0")
            if nul >= 0:
                out += chunk[:nul]
                self.check()
                return out.decode("utf-8", errors="surrogateescape")
            out += chunk
        raise KernelError(errno.ENAMETOOLONG, f"{what} is longer than {limit} bytes")

    def _read(self, addr: int, size: int) -> bytes:
        try:
            return sys_.process_vm_readv(self.pid, addr, size)
        except KernelError as exc:
            if exc.errno == errno.ESRCH:
                raise KernelError(errno.ENOENT, "the call was abandoned (task died or was interrupted)") from None
            return b""

    def read_bytes(self, addr: int, size: int, what: str = "argument") -> bytes:
        """Copy exactly `size` bytes (a struct argument) out of the task."""
        data = self._read(addr, size) if addr else b""
        if len(data) != size:
            raise KernelError(errno.EFAULT, f"{what} points to memory the task cannot read")
        self.check()
        return data

    def write_bytes(self, addr: int, data: bytes, what: str = "result") -> None:
        """Store a struct result into the task's buffer, as the kernel's copy_to_user would.

        Through the pinned mem handle (bound to the task, never to a recycled tid; a pid-based
        process_vm_writev would not be), and only into pages the task's maps show writable,
        since mem writes with FOLL_FORCE where copy_to_user answers EFAULT.
        """
        written = 0
        try:
            if addr and self._writable(addr, len(data)):
                written = os.pwrite(self.mem, data, addr)
        except OSError:
            written = 0
        if written != len(data):
            raise KernelError(errno.EFAULT, f"{what} buffer is not writable in the task")

    def _writable(self, addr: int, size: int) -> bool:
        """Whether [addr, addr+size) lies in mappings the task may write, per /proc/<tid>/maps."""
        end, at = addr + size, addr
        for line in self._read_proc("maps", limit=None).splitlines():
            span, perms = line.split(maxsplit=2)[:2]
            lo, hi = (int(x, 16) for x in span.split("-"))
            if lo <= at < hi:
                if perms[1] != "w":
                    return False
                at = hi
                if at >= end:
                    return True
        return False

    def take_fd(self, fd: int) -> int:
        """A duplicate of the task's fd (same open file); the caller closes it."""
        try:
            return sys_.pidfd_getfd(self.pidfd, fd)
        except KernelError as exc:
            raise KernelError(
                errno.EBADF if exc.errno == errno.EBADF else exc.errno or errno.EBADF, f"fd {fd} of the caller"
            ) from None

    def fd_path(self, fd: int) -> str:
        """Where the task's fd points, as the task would name it."""
        try:
            return _relative_to_root(os.readlink(f"fd/{fd}", dir_fd=self.proc), self.root_path)
        except (OSError, KernelError):
            return ""

    def read_optional(self, addr: int, limit: int = PATH_MAX, what: str = "string") -> str | None:
        return None if addr == 0 else self.read_cstring(addr, limit, what)

    @contextlib.contextmanager
    def as_caller(self) -> Iterator[None]:
        """Run file system checks with the task's fs ids and groups, none of the supervisor's rights.

        Leaving fsuid 0 clears CAP_DAC_OVERRIDE and friends from the effective set, so the
        kernel judges every lookup and open exactly as for the caller's host ids. Only the
        calling thread switches (each session's worker acts for its own container).
        """
        assert self.creds is not None
        with as_ids(self.creds.fsuid, self.creds.fsgid, self.creds.groups):
            yield

    def resolve(self, path: str, *, follow_last: bool = True) -> Resolved:
        """Resolve a path the task passed, inside its root and relative to its cwd, with its rights."""
        with self.as_caller():
            return resolve(self.root, path, cwd=self.cwd_path, follow_last=follow_last)

    def close(self) -> None:
        while self._fds:
            os.close(self._fds.pop())

    def __enter__(self) -> Target:
        try:
            return self.pin()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def as_ids(uid: int, gid: int, groups: tuple[int, ...] = ()) -> Iterator[None]:
    """File system checks as host `uid`/`gid`/`groups` on this thread alone, none of root's rights."""
    saved_groups = os.getgroups()
    sys_.setgroups_thread(list(groups))
    sys_.setfsgid(gid)
    sys_.setfsuid(uid)
    try:
        yield
    finally:
        sys_.setfsuid(0)
        sys_.setfsgid(0)
        sys_.setgroups_thread(saved_groups)


def _relative_to_root(cwd: str, root: str) -> str:
    """The cwd as the task names it: /proc shows it relative to the namespace, not to a chroot."""
    if cwd.endswith(" (deleted)"):
        raise KernelError(errno.ENOENT, "the caller's working directory was deleted")
    if root == "/":
        return cwd
    if cwd == root:
        return "/"
    if cwd.startswith(root + "/"):
        return cwd[len(root) :]
    raise KernelError(errno.ENOENT, "the caller's working directory is outside its root")
