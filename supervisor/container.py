"""`mountwarden run`'s own container.

Four processes besides the supervisor, each with one job:

- the waiter stays host root: it stages the container's tree in a mount namespace of the host's
  user namespace, mounts the container's /proc there, and mirrors the container's exit status;
- the holder creates the user namespace (so the supervisor can write its id maps), then the pid,
  uts, ipc and network namespaces owned by it, and forks the init into them;
- a short-lived proc mounter, forked by the waiter into the new pid namespace, mounts a procfs
  for that pid namespace in the staging mount namespace (procfs takes the pid namespace of the
  task that mounts it);
- the container's init (pid 1) copies the staging mount namespace, prepares the root, loads the
  seccomp filter, sends the listener fd to the supervisor, forks the command, reaps and
  forwards signals.

Because the init copies the staged tree from a namespace of a more privileged user namespace,
the kernel locks every mount in the copy: the container cannot unmount its /proc (which would
uncover the host's procfs and every host process), its /dev, or the views hiding the host's
block devices, nor clear their flags. Each process dies with its parent (parent-death signal),
so killing the supervisor ends the container, and with it every mount and loop device made for it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import posixpath
import signal
import socket
import struct
import sys
import termios
from dataclasses import dataclass, field
from typing import Any, Final, NoReturn

from . import cgroup, fdops, helperproc, stager
from . import syscalls as s
from .errors import KernelError
from .idmap import IdRange
from .seccomp import filter as seccomp_filter

# Signals passed on to the command. SIGHUP is the supervisor's own (it reloads the policy).
FORWARDED: Final = (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
_DEV_NODES: Final = {"null": (1, 3), "zero": (1, 5), "full": (1, 7), "random": (1, 8), "urandom": (1, 9), "tty": (5, 0)}
# Where sysfs shows the host's block devices; each gets an empty tmpfs the loop pool fills.
BLOCK_VIEWS: Final = ("block", "class/block", "dev/block", "devices/virtual/block")
# A --rootfs is untrusted: its mount points are reached without following a symlink, leaving
# the tree or crossing into a mount, so the host-root waiter never mounts through the
# container's links. The host's own root is the operator's and has mounts at those places.
_ROOTFS_RESOLVE: Final = fdops.RESOLVE_BENEATH | fdops.RESOLVE_NO_SYMLINKS | fdops.RESOLVE_NO_XDEV
_HOST_RESOLVE: Final = fdops.RESOLVE_BENEATH | fdops.RESOLVE_NO_SYMLINKS
_PROC_FLAGS: Final = s.MS_NOSUID | s.MS_NODEV | s.MS_NOEXEC
_TIOCGPTPEER: Final = 0x5441  # Linux 4.13; neither is in Python's termios module
_TIOCSPTLCK: Final = 0x40045431


class ContainerError(Exception):
    """The container could not be started; the message says why and what to do."""


@dataclass(frozen=True)
class Spec:
    """What to start.

    `env` is the command's whole environment. `stdio`, when given, are the supervisor's fds the
    container gets as 0, 1 and 2 (pipes the supervisor relays, say). With `pty`, the init opens
    a pty in the container's own devpts instead, as its stdio and controlling terminal, and
    sends the master to the supervisor to relay.
    """

    argv: list[str]
    name: str
    uids: IdRange
    gids: IdRange
    rootfs: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    net_host: bool = False
    stdio: tuple[int, int, int] | None = None
    pty: bool = False


@dataclass
class Container:
    """A started container: the waiter process and the init's host pid and listener."""

    spec: Spec
    pid: int
    pidfd: int
    init_pid: int = -1
    listener: int = -1
    pty_master: int = -1
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
            holder = int(_expect(sup, "userns")["pid"])
            self.cgroups = cgroup.create(spec.name)
            for group in self.cgroups:
                group.add(holder)
            _write_maps(holder, spec)
            _send(sup, {"step": "mapped"})
            self.init_pid = int(_expect(sup, "init")["pid"])
            msg, fds, _, _ = socket.recv_fds(sup, 4096, 2)
            if not fds:
                raise ContainerError(_reason(msg))
            self.listener = fds[0]
            if len(fds) > 1:
                self.pty_master = fds[1]
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
            self.exit_code = exit_code(status)
        return self.exit_code

    def release(self) -> None:
        """Drop what the supervisor holds for the container; call after `wait`."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1
        if self.pty_master >= 0:
            os.close(self.pty_master)
            self.pty_master = -1
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


def exit_code(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def name_process(role: str, container: str) -> None:
    """Name this process so `ps` tells the supervisor, waiter, holder and init apart."""
    helperproc.name_process(f"mw-{role}", f"mountwarden {role} {container}")


def die_with_parent(parent: int) -> None:
    s.prctl(s.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(137)


def _token(fd: int, what: str) -> bytes:
    data = os.read(fd, 32)
    if not data:
        raise ContainerError(f"container set-up failed: {what}")
    return data


def _waiter(spec: Spec, sock: socket.socket, supervisor: int) -> NoReturn:  # pragma: no cover
    """First child, host root: stages the tree, mounts the container's /proc, mirrors the exit."""
    try:
        for sig in FORWARDED:
            signal.signal(sig, signal.SIG_IGN)  # the init handles them; a terminal's ^C must not kill us
        die_with_parent(supervisor)
        name_process("waiter", spec.name)
        # From here on no process of the container holds the operator's stdio.
        stdio = spec.stdio or ((os.open(os.devnull, os.O_RDWR),) * 3 if spec.pty else None)
        for target, fd in enumerate(stdio or ()):
            os.dup2(fd, target)
        proc = _stage(spec)
        to_r, to_w = os.pipe()
        from_r, from_w = os.pipe()
        holder = os.fork()
        if holder == 0:
            os.close(to_w)
            os.close(from_r)
            _holder(spec, sock, to_r, from_w, waiter=os.getppid())
        os.close(to_r)
        os.close(from_w)
        _token(from_r, "the user namespace could not be created")
        _send(sock, {"step": "userns", "pid": holder})
        _expect(sock, "mapped")
        os.write(to_w, b"m")
        init = int(_token(from_r, "the container's init could not be forked"))
        _mount_proc(proc, init)
        _send(sock, {"step": "init", "pid": init})
        os.write(to_w, b"g")  # the init talks on the socket only after the supervisor has its pid
        for fd in (to_w, from_r, proc):
            os.close(fd)
        sock.close()
        _, status = os.waitpid(holder, 0)
        os._exit(exit_code(status))
    except BaseException as exc:
        with contextlib.suppress(OSError):
            _send(sock, {"error": f"container set-up failed: {exc}"})
        os._exit(126)


def _holder(spec: Spec, sock: socket.socket, token: int, report: int, waiter: int) -> NoReturn:  # pragma: no cover
    """Second child: the container's user namespace and the namespaces it owns; forks the init."""
    try:
        die_with_parent(waiter)
        name_process("holder", spec.name)
        s.unshare(s.CLONE_NEWUSER)
        os.write(report, b"u")
        _token(token, "the supervisor did not map the user namespace")
        os.setresgid(0, 0, 0)
        os.setresuid(0, 0, 0)
        os.setgroups([])
        die_with_parent(waiter)  # a credential change clears the parent-death signal
        s.unshare(s.CLONE_NEWPID | s.CLONE_NEWUTS | s.CLONE_NEWIPC | (0 if spec.net_host else s.CLONE_NEWNET))
        init = os.fork()
        if init == 0:
            os.close(report)
            _init(spec, sock, token)
        os.close(token)
        os.write(report, str(init).encode())
        os.close(report)
        sock.close()
        _, status = os.waitpid(init, 0)
        os._exit(exit_code(status))
    except BaseException as exc:
        with contextlib.suppress(OSError):
            _send(sock, {"error": f"container set-up failed: {exc}"})
        os._exit(126)


def _mount_proc(proc: int, init: int) -> None:  # pragma: no cover - runs in the waiter
    """Mount a procfs of the container's pid namespace on `proc`, in the staging namespace.

    procfs shows the pid namespace of the task that mounts it, and only the init's namespace
    copy locks it, so a host-root child joins the pid namespace (the init is already its pid 1:
    an empty pid namespace cannot be joined) and mounts it here, before the init copies the tree.
    """
    ns = os.open(f"/proc/{init}/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    try:
        s.setns(ns, s.CLONE_NEWPID)
    finally:
        os.close(ns)
    child = os.fork()
    if child == 0:
        try:
            s.mount("proc", _at(proc), "proc", _PROC_FLAGS)
        except BaseException:
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(child, 0)
    if status != 0:
        raise ContainerError("could not mount the container's /proc")


def _init(spec: Spec, sock: socket.socket, token: int) -> NoReturn:  # pragma: no cover
    """pid 1: own session, root, filter, listener to the supervisor, then run the command and reap."""
    try:
        _token(token, "the waiter did not mount /proc")
        os.close(token)
        die_with_parent(0)  # the holder is outside our pid namespace: getppid() says 0
        name_process("init", spec.name)
        s.unshare(s.CLONE_NEWNS)  # a copy of the staged tree, every mount locked
        os.setsid()  # no controlling terminal: /dev/tty answers ENXIO
        socket.sethostname(spec.name)
        if not spec.net_host:
            loopback_up()
        os.chdir(spec.rootfs or "/")
        s.mount("devpts", "dev/pts", "devpts", s.MS_NOSUID | s.MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620")
        if spec.rootfs:
            # pivot_root refuses a locked new root, and the staged bind is locked: bind it once more.
            s.mount(".", ".", None, s.MS_BIND | s.MS_REC)
            os.chdir(os.getcwd())
            s.pivot_root(".", ".")
            s.umount2(".", s.MNT_DETACH)
            os.chdir("/")
        master = _own_pty() if spec.pty else -1
        handled = {*FORWARDED, signal.SIGCHLD}
        signal.pthread_sigmask(signal.SIG_BLOCK, handled)
        listener = seccomp_filter.install()
        socket.send_fds(sock, [b"listener"], [listener] + ([master] if master >= 0 else []))
        os.close(listener)
        if master >= 0:
            os.close(master)
        _expect(sock, "go")
        sock.close()
        os.closerange(3, os.sysconf("SC_OPEN_MAX"))
    except BaseException as exc:
        with contextlib.suppress(OSError):
            _send(sock, {"error": f"container init failed: {exc}"})
        os._exit(126)
    run_command(spec.argv, spec.env, handled)


def run_command(argv: list[str], env: dict[str, str], handled: set[signal.Signals]) -> NoReturn:  # pragma: no cover
    """As the container's pid 1: fork the command, reap every orphan, pass the `handled`
    signals (blocked by the caller) on to the command, exit with its status."""
    command = os.fork()
    if command == 0:
        for sig in FORWARDED:  # ignored in the waiter, and exec would pass SIG_IGN on
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        try:
            os.execvpe(argv[0], argv, env)
        except OSError as exc:
            print(f"mountwarden: cannot run {argv[0]!r}: {exc.strerror}", file=sys.stderr)
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
                    os._exit(exit_code(status))
        elif info.si_code != s.SI_KERNEL:  # a terminal's signal already reached the command
            with contextlib.suppress(ProcessLookupError):
                os.kill(command, info.si_signo)


def _own_pty() -> int:  # pragma: no cover - runs in the init
    """Open a pty in the container's devpts as stdio and controlling terminal; return its master.

    A pty of the container's own devpts instance, so `tty` and its /dev/pts agree inside.
    """
    master = os.open("/dev/pts/ptmx", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    fcntl.ioctl(master, _TIOCSPTLCK, struct.pack("i", 0))
    slave = fcntl.ioctl(master, _TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY)
    for target in (0, 1, 2):
        os.dup2(slave, target)
    os.close(slave)
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    return master


def loopback_up() -> None:  # pragma: no cover - runs in the init
    """The new network namespace has only `lo`, down; bring it up so local services work inside."""
    from pyroute2 import IPRoute

    with IPRoute() as ip:
        ip.link("set", index=ip.link_lookup(ifname="lo")[0], state="up")


def _at(fd: int) -> str:
    """A path naming exactly the directory `fd` holds, for mount(2)."""
    return f"/proc/self/fd/{fd}"


def _stage(spec: Spec) -> int:  # pragma: no cover - runs in the waiter
    """Prepare the container's tree in a mount namespace of the host's user namespace.

    Everything mounted here is copied into the container's mount namespace when its init
    creates it from inside the new user namespace, and the kernel locks such copies. Every
    mount point is reached through fds resolved beneath the root (see _ROOTFS_RESOLVE).
    The tree is cut off from the host's (private) before anything is mounted, then made
    shared: the init's copy has each mount as a slave of its staging original, so a mount
    the stager later attaches in the landing reaches the container with its flags locked
    (stager.py), and nothing reaches the host or another container's staging namespace.
    The waiter's working directory is the landing from here on. Returns an fd on the
    directory the container's /proc goes on.
    """
    s.unshare(s.CLONE_NEWNS)
    s.mount(None, "/", None, s.MS_REC | s.MS_PRIVATE)
    if spec.rootfs:
        s.mount(spec.rootfs, spec.rootfs, None, s.MS_BIND | s.MS_REC)
    with contextlib.ExitStack() as fds:
        root = _hold(fds, os.open(spec.rootfs or "/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))
        strict = _ROOTFS_RESOLVE if spec.rootfs else _HOST_RESOLVE
        proc = _mount_point(spec, root, "proc", strict)
        dev = _hold(fds, _mount_point(spec, root, "dev", strict))
        if spec.rootfs:
            sys_dir = _hold(fds, _mount_point(spec, root, "sys", strict))
            s.mount("/sys", _at(sys_dir), None, s.MS_BIND | s.MS_REC)
            with contextlib.suppress(FileNotFoundError):
                tmp = _hold(fds, _mount_point(spec, root, "tmp", strict))
                s.mount("tmpfs", _at(tmp), "tmpfs", s.MS_NOSUID | s.MS_NODEV, "mode=1777")
        s.mount("tmpfs", _at(dev), "tmpfs", s.MS_NOSUID | s.MS_NOEXEC, "mode=755,size=1m")
        _fill_dev(_hold(fds, _beneath(root, "dev", _HOST_RESOLVE)))
        os.fchdir(_hold(fds, _beneath(root, stager.LANDING, _HOST_RESOLVE)))  # Session.start finds it here
        sysfs = _hold(fds, _beneath(root, "sys", _HOST_RESOLVE))
        for view in BLOCK_VIEWS:
            with contextlib.suppress(FileNotFoundError):
                path = _hold(fds, _beneath(sysfs, view, _ROOTFS_RESOLVE))
                s.mount("tmpfs", _at(path), "tmpfs", s.MS_NOSUID | s.MS_NODEV | s.MS_NOEXEC, "mode=755,size=1m")
        s.mount(None, "/", None, s.MS_REC | s.MS_SHARED)
        return proc


def _hold(stack: contextlib.ExitStack, fd: int) -> int:
    stack.callback(os.close, fd)
    return fd


def _beneath(dirfd: int, path: str, resolve: int) -> int:
    try:
        return fdops.openat2(dirfd, path, os.O_PATH | os.O_DIRECTORY, resolve)
    except KernelError as exc:
        if exc.errno == errno.ENOENT:
            raise FileNotFoundError(errno.ENOENT, path) from None
        raise


def _mount_point(spec: Spec, root: int, sub: str, resolve: int) -> int:  # pragma: no cover - runs in the waiter
    """An fd on the directory `sub` of the root, or a ContainerError naming what is wrong with it."""
    try:
        return _beneath(root, sub, resolve)
    except FileNotFoundError:
        if sub == "tmp":
            raise
        raise ContainerError(f"--rootfs {spec.rootfs} has no /{sub} directory to mount on; create it") from None
    except KernelError as exc:
        problem = {
            errno.ELOOP: "is a symbolic link, which mountwarden does not follow in an untrusted root",
            errno.ENOTDIR: "is not a directory",
            errno.EXDEV: "is a mount point of the host, which would be hidden under the container's",
        }.get(exc.errno or 0, f"cannot be opened ({exc})")
        raise ContainerError(f"--rootfs {spec.rootfs}: /{sub} {problem}; make it a plain directory") from None


def _fill_dev(dev: int) -> None:  # pragma: no cover - runs in the waiter
    """A /dev with the usual character devices only; the loop pool adds its nodes later.

    `dev` is the fresh tmpfs just mounted: nothing but the waiter has written to it yet.
    """
    for name, (major, minor) in _DEV_NODES.items():
        os.mknod(name, 0o20666, os.makedev(major, minor), dir_fd=dev)
        os.chmod(name, 0o666, dir_fd=dev)
    os.mkdir("pts", dir_fd=dev)
    os.mkdir("shm", dir_fd=dev)
    os.mkdir(posixpath.basename(stager.LANDING), 0o700, dir_fd=dev)  # host root's: the container cannot enter
    shm = fdops.openat2(dev, "shm", os.O_PATH | os.O_DIRECTORY, _ROOTFS_RESOLVE)
    try:
        s.mount("tmpfs", _at(shm), "tmpfs", s.MS_NOSUID | s.MS_NODEV, "mode=1777")
    finally:
        os.close(shm)
    links = {"ptmx": "pts/ptmx", "fd": "/proc/self/fd", "stdin": "/proc/self/fd/0", "stdout": "/proc/self/fd/1",
             "stderr": "/proc/self/fd/2"}  # fmt: skip
    for name, target in links.items():
        os.symlink(target, name, dir_fd=dev)
