"""The notification ABI against this kernel: struct sizes, and a caller that dies mid-call."""

import ctypes
import errno
import os
import signal
import socket

import pytest

from supervisor.errors import KernelError
from supervisor.seccomp import filter as seccomp_filter
from supervisor.seccomp import notify
from supervisor.target import Target


def test_struct_sizes_match_kernel() -> None:
    assert (notify.NOTIF.size, notify.RESP.size, notify.ADDFD.size) == (80, 24, 24)
    notify.check_sizes()


def test_response_constructors_pack_kernel_layout() -> None:
    assert notify.RESP.unpack(notify.Response.errno(7, 1).pack()) == (7, 0, -1, 0)
    assert notify.RESP.unpack(notify.Response.continue_(7).pack()) == (7, 0, 0, 1)
    assert notify.RESP.unpack(notify.Response.success(7, 3).pack()) == (7, 3, 0, 0)


def _blocked_in_mount() -> tuple[int, int, socket.socket]:
    """A child that loads the filter, hands over the listener, and blocks in a notified mount(2)."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            listener = seccomp_filter.install()
            socket.send_fds(child, [b"listener"], [listener])
            libc = ctypes.CDLL(None, use_errno=True)
            libc.mount(b"/nonexistent.img", b"/nonexistent", b"ext4", 1, None)
        finally:
            os._exit(0)
    child.close()
    _, fds, _, _ = socket.recv_fds(parent, 64, 1)
    return pid, fds[0], parent


def test_a_caller_killed_mid_call_gets_no_service_and_no_crash() -> None:
    """The race the kernel cannot be asked to time: here the caller really dies after RECV."""
    pid, listener, sock = _blocked_in_mount()
    try:
        notif = None
        while notif is None:
            notif = notify.receive(listener)
        assert notify.id_valid(listener, notif.id)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        assert not notify.id_valid(listener, notif.id)
        with pytest.raises(KernelError) as exc, Target(listener, notif):
            pass
        assert exc.value.errno in (errno.ENOENT, errno.ESRCH)
        assert notify.send(listener, notify.Response.errno(notif.id, errno.EPERM)) is False
    finally:
        os.close(listener)
        sock.close()
