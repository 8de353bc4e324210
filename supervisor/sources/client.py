"""`mountwarden run` by an ordinary user: a container of the user's own, served by `serve`.

No root anywhere on this side. The container's root is the user (its user namespace maps 0 to
the user's uid and gid; ids from 1 up to the user's subordinate ids where it has them and the
system has newuidmap), its tree is a copy of the host's with a /dev of its own
(a tmpfs with binds of the usual character devices, its own devpts), its own /proc, and its own
pid, uts, ipc and network namespaces. The init loads mountwarden's filter and the listener goes
to `serve` over its control socket (sources/control.py), which adopts the container like a
runtime's (adopted.py) and applies the rules that select the user's uid. The command starts
only once `serve` says the container is adopted, so the loop pool is there from its first
instruction. The user's processes die with this one (parent-death signals).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from typing import NoReturn

from .. import container, idmap
from .. import syscalls as s
from ..container import FORWARDED
from ..errors import KernelError
from ..seccomp import filter as seccomp_filter

_DEV_NODES = ("null", "zero", "full", "random", "urandom", "tty")
_REPLY_TIMEOUT = 60.0  # serve answers once the container is set up


@dataclass(frozen=True)
class Options:
    command: list[str]
    name: str
    env: dict[str, str]
    control_socket: str
    net_host: bool = False


def start(opts: Options) -> int:
    """Start the container, have `serve` adopt it, run the command; its exit code (126: not started)."""
    try:
        control = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        control.connect(opts.control_socket)
    except OSError as exc:
        print(
            f"mountwarden run: as an ordinary user, run needs a running `mountwarden serve`; its control socket "
            f"{opts.control_socket} cannot be reached ({exc.strerror})",
            file=sys.stderr,
        )
        return 126
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    uid, gid, parent = os.getuid(), os.getgid(), os.getpid()
    for sig in FORWARDED:
        signal.signal(sig, signal.SIG_IGN)  # the terminal's signals reach the command itself
    holder = os.fork()
    if holder == 0:  # pragma: no cover - the holder
        ours.close()
        control.close()
        _holder(opts, theirs, parent)
    theirs.close()
    try:
        _expect(ours, b"userns")
        _write_maps(holder, uid, gid)
        ours.send(b"mapped")
        msg, fds, _, _ = socket.recv_fds(ours, 4096, 1)
        if not fds:
            raise KernelError(errno.EIO, msg.decode(errors="replace") or "the container could not be set up")
        init_pid = int(msg)
        try:
            socket.send_fds(
                control, [json.dumps({"op": "adopt", "name": opts.name, "init_pid": init_pid}).encode()], fds
            )
        finally:
            os.close(fds[0])
        control.settimeout(_REPLY_TIMEOUT)
        reply = json.loads(control.recv(4096) or b'{"ok": false, "error": "serve closed the connection"}')
        if not reply.get("ok"):
            raise KernelError(errno.EPERM, f"serve did not take the container: {reply.get('error')}")
        ours.send(b"go")
    except (KernelError, OSError, ValueError) as exc:
        print(f"mountwarden run: {exc}", file=sys.stderr)
        os.kill(holder, signal.SIGKILL)
        os.waitpid(holder, 0)
        return 126
    finally:
        ours.close()
    _, status = os.waitpid(holder, 0)
    control.close()  # serve releases the container's pool and mounts
    return container.exit_code(status)


def _write_maps(pid: int, uid: int, gid: int) -> None:
    """Root is the user; with subordinate ids (and the setuid newuidmap/newgidmap that check them),
    ids 1.. are the user's subordinate ones, as rootless runtimes map them."""
    name = pwd.getpwuid(uid).pw_name
    subuids, subgids = idmap.subordinate("/etc/subuid", name, uid), idmap.subordinate("/etc/subgid", name, uid)
    tools = shutil.which("newuidmap"), shutil.which("newgidmap")
    if subuids and subgids and all(tools):
        for tool, own, sub in ((tools[0], uid, subuids), (tools[1], gid, subgids)):
            done = subprocess.run([str(tool), str(pid), "0", str(own), "1", "1", str(sub.start), str(sub.count)],
                                  capture_output=True, text=True)  # fmt: skip
            if done.returncode != 0:
                raise KernelError(errno.EPERM, f"{tool} refused the subordinate ids: {done.stderr.strip()}")
        return
    with open(f"/proc/{pid}/uid_map", "w") as f:
        f.write(f"0 {uid} 1\n")
    with open(f"/proc/{pid}/setgroups", "w") as f:
        f.write("deny")
    with open(f"/proc/{pid}/gid_map", "w") as f:
        f.write(f"0 {gid} 1\n")


def _expect(sock: socket.socket, word: bytes) -> None:
    got = sock.recv(4096)
    if got != word:
        raise KernelError(errno.EIO, got.decode(errors="replace") or "the container's set-up ended early")


def _holder(opts: Options, sock: socket.socket, parent: int) -> NoReturn:  # pragma: no cover - the holder
    """The user namespace, then the namespaces it owns; forks the init and waits for it."""
    try:
        container.die_with_parent(parent)
        s.unshare(s.CLONE_NEWUSER)
        sock.send(b"userns")
        _expect(sock, b"mapped")
        os.setresgid(0, 0, 0)
        os.setresuid(0, 0, 0)
        container.die_with_parent(parent)  # a credential change clears the parent-death signal
        s.unshare(s.CLONE_NEWPID | s.CLONE_NEWUTS | s.CLONE_NEWIPC | (0 if opts.net_host else s.CLONE_NEWNET))
        init = os.fork()
        if init == 0:
            _init(opts, sock)
        _, status = os.waitpid(init, 0)
        os._exit(container.exit_code(status))
    except BaseException as exc:
        with contextlib.suppress(OSError):
            sock.send(f"container set-up failed: {exc}".encode())
        os._exit(126)


def _init(opts: Options, sock: socket.socket) -> NoReturn:  # pragma: no cover - the container's pid 1
    try:
        container.die_with_parent(0)
        container.name_process("init", opts.name)
        s.unshare(s.CLONE_NEWNS)
        s.mount(None, "/", None, s.MS_REC | s.MS_SLAVE)
        os.setsid()
        socket.sethostname(opts.name)
        if not opts.net_host:
            container.loopback_up()
        host_pid = _host_pid()  # while /proc is still the host's
        _own_dev()
        s.mount("proc", "/proc", "proc", s.MS_NOSUID | s.MS_NODEV | s.MS_NOEXEC)
        handled = {*FORWARDED, signal.SIGCHLD}
        signal.pthread_sigmask(signal.SIG_BLOCK, handled)
        listener = seccomp_filter.install()
        socket.send_fds(sock, [str(host_pid).encode()], [listener])
        os.close(listener)
        _expect(sock, b"go")
        sock.close()
        os.closerange(3, os.sysconf("SC_OPEN_MAX"))
    except BaseException as exc:
        with contextlib.suppress(OSError):
            sock.send(f"container init failed: {exc}".encode())
        os._exit(126)
    container.run_command(opts.command, opts.env, handled)


def _host_pid() -> int:  # pragma: no cover - in the init
    """This process's pid as the host sees it: the first NSpid of its status in the host's procfs."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("NSpid:"):
                return int(line.split()[1])
    raise KernelError(errno.ESRCH, "no NSpid in /proc/self/status")


def _own_dev() -> None:  # pragma: no cover - in the init
    """A tmpfs /dev with binds of the host's usual character devices and a devpts of its own."""
    held = {name: os.open(f"/dev/{name}", os.O_PATH | os.O_CLOEXEC) for name in _DEV_NODES}
    s.mount("tmpfs", "/dev", "tmpfs", s.MS_NOSUID | s.MS_NOEXEC, "mode=755,size=1m")
    for name, fd in held.items():
        os.close(os.open(f"/dev/{name}", os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o666))
        s.mount(f"/proc/self/fd/{fd}", f"/dev/{name}", None, s.MS_BIND)
        os.close(fd)
    for sub in ("pts", "shm"):
        os.mkdir(f"/dev/{sub}")
    s.mount("devpts", "/dev/pts", "devpts", s.MS_NOSUID | s.MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620")
    s.mount("tmpfs", "/dev/shm", "tmpfs", s.MS_NOSUID | s.MS_NODEV, "mode=1777")
    for name, target in {"ptmx": "pts/ptmx", "fd": "/proc/self/fd", "stdin": "/proc/self/fd/0",
                         "stdout": "/proc/self/fd/1", "stderr": "/proc/self/fd/2"}.items():  # fmt: skip
        os.symlink(target, f"/dev/{name}")
