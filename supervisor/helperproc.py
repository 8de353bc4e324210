"""Long-lived privileged helper processes: fork once, then typed requests over a socket pair.

Each helper is forked from the supervisor, named (so `ps` tells a helper from the supervisor
and from a FUSE daemon), dies with the supervisor, sets no_new_privs and keeps only the
capabilities it needs. Requests and replies are JSON objects over SOCK_SEQPACKET; fds travel
both ways with SCM_RIGHTS. A helper answers every request, also when its own code fails.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import prctl

from .errors import KernelError

_MAX_MSG: Final = 65536
_TITLE_ARGV_MAX: Final = 4096  # larger argv areas crash python-prctl's set_proctitle
_MAX_FDS: Final = 8

Reply = dict[str, Any]
Op = Callable[[dict[str, Any], list[int]], tuple[Reply, list[int]]]
# In a helper: what an op asked to run once its supervisor is gone or done with it (the socket
# closed). Also a killed supervisor closes it, before its death signal arrives.
AT_END: list[Callable[[], None]] = []


def name_process(comm: str, title: str) -> None:
    """Name this process so `ps` tells it apart: its comm, and its command line where that is safe.

    python-prctl's set_proctitle rewrites the argv area in place and crashes (SIGSEGV) when
    that area is larger than about 8 KiB, as a long `run -- sh -c SCRIPT` makes it.
    """
    prctl.set_name(comm[:15])
    with open("/proc/self/cmdline", "rb") as f:
        if len(f.read(_TITLE_ARGV_MAX + 1)) <= _TITLE_ARGV_MAX:
            prctl.set_proctitle(title)


class HelperProcess:
    """Client side of a helper; `call` raises KernelError with the helper's errno."""

    def __init__(self, name: str, pid: int, sock: socket.socket) -> None:
        self.name, self.pid, self.sock = name, pid, sock

    @classmethod
    def spawn(
        cls, name: str, caps: Sequence[int], setup: Callable[[], None], ops: Mapping[str, Op], keep: Sequence[int] = ()
    ) -> HelperProcess:
        """Fork the helper `name`; in it run `setup`, keep only `caps`, serve `ops` until the socket closes.

        `keep` are fds of the supervisor's the helper still needs for `setup` (all others
        are closed: a stray loop fd held by a helper would keep a device bound).
        """
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        supervisor = os.getpid()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the helper process
            try:
                parent.close()
                prctl.set_pdeathsig(signal.SIGKILL)
                if os.getppid() != supervisor:
                    os._exit(1)
                name_process(name, f"mountwarden {name}")
                os.setgroups([])  # root's supplementary groups would open host files to its walks in a container
                prctl.set_no_new_privs(1)
                for fd in range(3, os.sysconf("SC_OPEN_MAX")):
                    if fd != child.fileno() and fd not in keep:
                        try:
                            os.close(fd)
                        except OSError:
                            pass
                broken = ""
                try:
                    setup()  # setns needs CAP_SYS_CHROOT and ptrace rights the helper then drops
                    prctl.capbset.limit(*caps)
                    prctl.cap_effective.limit(*caps)  # before permitted: effective must stay a subset
                    prctl.cap_permitted.limit(*caps)
                    prctl.cap_inheritable.limit()
                except Exception as exc:  # answered to every request, so the supervisor learns why
                    broken = f"the {name} could not start: {exc}"
                _serve(child, ops, broken)
                for last in AT_END:
                    last()
            finally:
                os._exit(0)
        child.close()
        return cls(name, pid, parent)

    def call(self, payload: dict[str, Any], fds: Sequence[int] = ()) -> tuple[Reply, list[int]]:
        """Send one request and wait for its reply: the reply's fields and the fds it carried."""
        socket.send_fds(self.sock, [json.dumps(payload).encode()], list(fds))
        msg, got, _flags, _addr = socket.recv_fds(self.sock, _MAX_MSG, _MAX_FDS)
        reply: Reply = json.loads(msg or json.dumps({"errno": errno.EIO, "error": f"the {self.name} exited"}))
        if reply["errno"]:
            for fd in got:
                os.close(fd)
            raise KernelError(reply["errno"], reply["error"])
        return reply, got

    def close(self, timeout: float = 5.0) -> None:
        """Stop the helper: it exits when its socket closes; killed if it does not in time."""
        if self.pid <= 0:
            return
        self.sock.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done, _ = os.waitpid(self.pid, os.WNOHANG)
            if done:
                self.pid = -1
                return
            time.sleep(0.005)
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        self.pid = -1


def _serve(sock: socket.socket, ops: Mapping[str, Op], broken: str) -> None:  # pragma: no cover - in the helper
    while True:
        msg, fds, _flags, _addr = socket.recv_fds(sock, _MAX_MSG, _MAX_FDS)
        if not msg:
            return
        out: list[int] = []
        try:
            if broken:
                raise KernelError(errno.EIO, broken)
            request: dict[str, Any] = json.loads(msg)
            fields, out = ops[request.pop("op")](request, fds)
            reply: Reply = {"errno": 0, "error": "", **fields}
        except KernelError as exc:
            reply = {"errno": exc.errno or errno.EIO, "error": exc.what}
        except OSError as exc:
            reply = {"errno": exc.errno or errno.EIO, "error": str(exc)}
        except Exception as exc:  # a bug must still produce an answer, never a hang
            reply = {"errno": errno.EIO, "error": f"helper error: {exc!r}"}
        finally:
            for fd in fds:
                os.close(fd)
        socket.send_fds(sock, [json.dumps(reply).encode()], out)
        for fd in out:
            os.close(fd)
