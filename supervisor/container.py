"""`mountwarden run`'s own container.

Three processes: the supervisor; a waiter that creates the user namespace (so the supervisor
can write its id maps) and then the mount, pid, uts and ipc namespaces; and the container's
init (pid 1) forked into them. The init prepares the root, loads the seccomp filter, sends the
listener fd to the supervisor and forks the command, then reaps and forwards signals. Each
process dies with its parent (parent-death signal), so killing the supervisor ends the
container, and with it every mount and loop device made for it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
from dataclasses import dataclass, field
from typing import Any, Final, NoReturn

from . import cgroup
from . import syscalls as s
from .idmap import IdRange
from .seccomp import filter as seccomp_filter

# Signals passed on to the command. SIGHUP is the supervisor's own (it reloads the policy).
FORWARDED: Final = (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
_DEV_NODES: Final = {"null": (1, 3), "zero": (1, 5), "full": (1, 7), "random": (1, 8), "urandom": (1, 9), "tty": (5, 0)}
# Where sysfs shows the host's block devices; each gets an empty tmpfs the loop pool fills.
BLOCK_VIEWS: Final = ("block", "class/block", "dev/block", "devices/virtual/block")


class ContainerError(Exception):
    """The container could not be started; the message says why and what to do."""


@dataclass(frozen=True)
class Spec:
    argv: list[str]
    name: str
    uids: IdRange
    gids: IdRange
    rootfs: str | None = None


@dataclass
class Container:
    """A started container: the waiter process and the init's host pid and listener."""

    spec: Spec
    pid: int
    pidfd: int
    init_pid: int = -1
    listener: int = -1
    cgroups: list[cgroup.DeviceCgroup] = field(default_factory=list)
    exit_code: int | None = None
    sock: socket.socket | None = None

    @classmethod
    def start(cls, spec: Spec) -> Container:
        sup, ctr = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the waiter process
            sup.close()
            _waiter(spec, ctr, parent)
        ctr.close()
        self = cls(spec, pid, s.pidfd_open(pid), sock=sup)
        try:
            _expect(sup, "userns")
            self.cgroups = cgroup.create(spec.name)
            for group in self.cgroups:
                group.add(pid)
            _write_maps(pid, spec)
            _send(sup, {"step": "mapped"})
            self.init_pid = int(_expect(sup, "init")["pid"])
            msg, fds, _, _ = socket.recv_fds(sup, 4096, 1)
            if not fds:
                raise ContainerError(_reason(msg))
            self.listener = fds[0]
        except BaseException:
            self.kill()
            self.wait()
            self.release()
            raise
        return self

    def go(self) -> None:
        """Let the init start the command, once the supervisor is ready to serve it."""
        assert self.sock is not None
        _send(self.sock, {"step": "go"})
        self.sock.close()
        self.sock = None

    def signal(self, sig: int) -> None:
        """Forward a signal to the container's init, which passes it to the command."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.init_pid if self.init_pid > 0 else self.pid, sig)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.init_pid if self.init_pid > 0 else self.pid, signal.SIGKILL)
            os.kill(self.pid, signal.SIGKILL)

    def wait(self) -> int:
        """Reap the waiter; its exit code is the command's (128+N if a signal N ended it)."""
        if self.exit_code is None:
            _, status = os.waitpid(self.pid, 0)
            code = os.waitstatus_to_exitcode(status)
            self.exit_code = 128 - code if code < 0 else code
        return self.exit_code

    def release(self) -> None:
        """Drop what the supervisor holds for the container; call after `wait`."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1
        while self.cgroups:
            self.cgroups.pop().remove()


def _send(sock: socket.socket, msg: dict[str, Any]) -> None:
    sock.send(json.dumps(msg).encode())


def _expect(sock: socket.socket, step: str) -> dict[str, Any]:
    raw = sock.recv(4096)
    try:
        msg: dict[str, Any] = json.loads(raw) if raw else {"error": "the container exited during set-up"}
    except ValueError:
        raise ContainerError(f"container set-up went out of step: expected {step!r}") from None
    if msg.get("step") != step:
        raise ContainerError(_reason(raw))
    return msg


def _reason(raw: bytes) -> str:
    try:
        return str(json.loads(raw).get("error", "container set-up failed"))
    except ValueError:
        return "the container exited during set-up"


def _write_maps(pid: int, spec: Spec) -> None:
    with open(f"/proc/{pid}/uid_map", "w") as f:
        f.write(spec.uids.map_line())
    with open(f"/proc/{pid}/gid_map", "w") as f:
        f.write(spec.gids.map_line())


def _die_with_parent(parent: int) -> None:
    s.prctl(s.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(137)


def _waiter(spec: Spec, sock: socket.socket, supervisor: int) -> NoReturn:  # pragma: no cover
    """First child: owns the new namespaces, then waits for the init and mirrors its exit."""
    try:
        for sig in FORWARDED:
            signal.signal(sig, signal.SIG_IGN)  # the init handles them; a terminal's ^C must not kill us
        _die_with_parent(supervisor)
        _stage(spec)
        s.unshare(s.CLONE_NEWUSER)
        _send(sock, {"step": "userns"})
        _expect(sock, "mapped")
        os.setresgid(0, 0, 0)
        os.setresuid(0, 0, 0)
        os.setgroups([])
        _die_with_parent(supervisor)  # a credential change clears the parent-death signal
        s.unshare(s.CLONE_NEWNS | s.CLONE_NEWPID | s.CLONE_NEWUTS | s.CLONE_NEWIPC)
        # The init talks on the same socket: it waits until the supervisor has its pid first.
        turn_r, turn_w = os.pipe()
        init = os.fork()
        if init == 0:
            os.close(turn_w)
            os.read(turn_r, 1)
            os.close(turn_r)
            _init(spec, sock)
        os.close(turn_r)
        _send(sock, {"step": "init", "pid": init})
        os.close(turn_w)
        sock.close()
        _, status = os.waitpid(init, 0)
        code = os.waitstatus_to_exitcode(status)
        os._exit(128 - code if code < 0 else code)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            _send(sock, {"error": f"container set-up failed: {exc}"})
        os._exit(126)


def _init(spec: Spec, sock: socket.socket) -> NoReturn:  # pragma: no cover
    """pid 1: root, filter, listener to the supervisor, then run the command and reap."""
    try:
        _die_with_parent(0)  # the waiter is outside our pid namespace: getppid() says 0
        socket.sethostname(spec.name)
        os.chdir(spec.rootfs or "/")
        s.mount("proc", "proc", "proc", s.MS_NOSUID | s.MS_NODEV | s.MS_NOEXEC)
        s.mount("devpts", "dev/pts", "devpts", s.MS_NOSUID | s.MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620")
        if spec.rootfs:
            # pivot_root refuses a locked new root, and the staged bind is locked: bind it once more.
            s.mount(".", ".", None, s.MS_BIND | s.MS_REC)
            os.chdir(os.getcwd())
            s.pivot_root(".", ".")
            s.umount2(".", s.MNT_DETACH)
            os.chdir("/")
        handled = {*FORWARDED, signal.SIGCHLD}
        signal.pthread_sigmask(signal.SIG_BLOCK, handled)
        listener = seccomp_filter.install()
        socket.send_fds(sock, [b"listener"], [listener])
        os.close(listener)
        _expect(sock, "go")
        sock.close()
        os.closerange(3, os.sysconf("SC_OPEN_MAX"))
    except BaseException as exc:
        with contextlib.suppress(OSError):
            _send(sock, {"error": f"container init failed: {exc}"})
        os._exit(126)
    command = os.fork()
    if command == 0:
        for sig in FORWARDED:  # ignored in the waiter, and exec would pass SIG_IGN on
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        try:
            os.execvp(spec.argv[0], spec.argv)
        except OSError as exc:
            print(f"mountwarden: cannot run {spec.argv[0]!r}: {exc.strerror}", file=sys.stderr)
            os._exit(127)
    while True:
        info = signal.sigwaitinfo(handled)
        if info.si_signo == signal.SIGCHLD:
            while True:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    os._exit(0)
                if pid == 0:
                    break
                if pid == command:
                    code = os.waitstatus_to_exitcode(status)
                    os._exit(128 - code if code < 0 else code)
        elif info.si_code != s.SI_KERNEL:  # a terminal's signal already reached the command
            with contextlib.suppress(ProcessLookupError):
                os.kill(command, info.si_signo)


def _stage(spec: Spec) -> None:  # pragma: no cover - runs in the waiter
    """Prepare the container's tree in a mount namespace of the host's user namespace.

    Everything mounted here is copied into the container's mount namespace when the waiter
    creates it from inside the new user namespace, and the kernel locks such copies: the
    container cannot unmount the private /dev or the views hiding the host's block devices,
    nor clear their flags.
    """
    s.unshare(s.CLONE_NEWNS)
    s.mount(None, "/", None, s.MS_REC | s.MS_PRIVATE)
    root = spec.rootfs or "/"
    if spec.rootfs:
        s.mount(root, root, None, s.MS_BIND | s.MS_REC)
        for sub in ("proc", "dev", "sys"):
            if not os.path.isdir(os.path.join(root, sub)):
                raise ContainerError(f"--rootfs {root} has no /{sub} directory to mount on; create it")
        s.mount("/sys", os.path.join(root, "sys"), None, s.MS_BIND | s.MS_REC)
        if os.path.isdir(os.path.join(root, "tmp")):
            s.mount("tmpfs", os.path.join(root, "tmp"), "tmpfs", s.MS_NOSUID | s.MS_NODEV, "mode=1777")
    _private_dev(os.path.join(root, "dev"))
    for view in BLOCK_VIEWS:
        path = os.path.join(root, "sys", view)
        if os.path.isdir(path):
            s.mount("tmpfs", path, "tmpfs", s.MS_NOSUID | s.MS_NODEV | s.MS_NOEXEC, "mode=755,size=1m")


def _private_dev(dev: str) -> None:  # pragma: no cover - runs in the waiter
    """A /dev with the usual character devices only; the loop pool adds its nodes later."""
    s.mount("tmpfs", dev, "tmpfs", s.MS_NOSUID | s.MS_NOEXEC, "mode=755,size=1m")
    for name, (major, minor) in _DEV_NODES.items():
        path = os.path.join(dev, name)
        os.mknod(path, 0o20666, os.makedev(major, minor))
        os.chmod(path, 0o666)
    os.mkdir(os.path.join(dev, "pts"))
    os.mkdir(os.path.join(dev, "shm"))
    s.mount("tmpfs", os.path.join(dev, "shm"), "tmpfs", s.MS_NOSUID | s.MS_NODEV, "mode=1777")
    links = {"ptmx": "pts/ptmx", "fd": "/proc/self/fd", "stdin": "/proc/self/fd/0", "stdout": "/proc/self/fd/1",
             "stderr": "/proc/self/fd/2"}  # fmt: skip
    for name, target in links.items():
        os.symlink(target, os.path.join(dev, name))
