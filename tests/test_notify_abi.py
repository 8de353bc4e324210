"""The notification ABI against this kernel: struct sizes, a caller that dies mid-call, the
caller's memory read and written with the kernel's rules, and its capabilities judged where
the kernel judges them."""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import socket
from pathlib import Path

import pytest
from conftest import allow_policy, calls, run_container, write_policy

from supervisor import syscalls as sys_
from supervisor.errors import KernelError
from supervisor.seccomp import filter as seccomp_filter
from supervisor.seccomp import notify
from supervisor.target import ALL_CAPS, Target, caps_over


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


# --- the caller's memory, as copy_from_user/copy_to_user see it --------------------------------


def test_pointers_into_protected_pages_are_efault(tmp_path: Path, images: dict[str, Path], mountcall: Path) -> None:
    """/proc/<pid>/mem reads PROT_NONE pages and writes read-only ones (FOLL_FORCE); the kernel
    itself answers EFAULT for both, and so must the supervisor."""
    image = images["ext4"]
    mc = str(mountcall)
    script = "; ".join(
        [
            f"{mc} mount-page {image} none ext4",
            f"{mc} mount-page {image} ro ext4",  # readable: the mount is judged (policy: none)
            f"losetup -r /dev/loop0 {image}",
            f"{mc} ioctl-page /dev/loop0 0x4C05 ro",  # LOOP_GET_STATUS64 into a read-only page
            f"{mc} ioctl-page /dev/loop0 0x4C05 rw",
            f"{mc} ioctl-page /dev/loop0 0x4C05 none",
            "losetup -d /dev/loop0",
        ]
    )
    run = run_container(tmp_path, ["/bin/sh", "-c", script], policy=write_policy(tmp_path / "none.yaml", []))
    assert run.stdout.split() == ["EFAULT", "EPERM", "EFAULT", "OK", "0", "EFAULT"], run.stderr
    assert [d["result"] for d in run.decisions("mount")] == ["EFAULT", "EPERM"]
    statuses = [d["result"] for d in run.decisions("ioctl") if d["op"] == "LOOP_GET_STATUS64"]
    assert statuses[-3:] == ["EFAULT", "OK", "EFAULT"]


# --- CAP_SYS_ADMIN where the kernel checks it: over the caller's mount namespace ---------------


def test_a_nested_user_namespace_does_not_grant_mounts(
    tmp_path: Path, images: dict[str, Path], mountcall: Path, mnt: Path
) -> None:
    """CapEff is full in a user namespace the caller just made, but that namespace does not own
    the container's mount namespace: the kernel would refuse, so does the supervisor."""
    mount = f"mount {images['ext4']} {mnt} ext4 ro"
    as_user = [str(mountcall), "exec-as", "1000", *calls(mountcall, "userns", mount)]
    as_root = calls(mountcall, "userns", mount)
    for argv in (as_user, as_root):
        run = run_container(tmp_path, argv, policy=allow_policy(tmp_path))
        assert run.stdout.split() == ["OK", "EPERM"], run.stderr
        assert "CAP_SYS_ADMIN" in run.decisions("mount")[0]["error"]


def test_caps_over_follow_the_kernels_rules() -> None:
    """caps_over on real namespaces: own namespace, a child's owner, and a stranger."""
    own = os.open("/proc/self/ns/user", os.O_RDONLY)
    try:
        assert caps_over(os.open("/proc/self/ns/user", os.O_RDONLY), own, 0b101, 0) == 0b101
        parent_side, child_side = socket.socketpair()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child: a user namespace owned by uid 0, then wait
            try:
                sys_.unshare(sys_.CLONE_NEWUSER)
                child_side.send(b"x")
                child_side.recv(1)
            finally:
                os._exit(0)
        try:
            parent_side.settimeout(10)
            assert parent_side.recv(1) == b"x", "the child could not make a user namespace"
            child = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY)
            assert caps_over(os.dup(child), own, 0, 0) == ALL_CAPS  # the owner of a child namespace
            assert caps_over(os.dup(child), own, 0, 1000) == 0  # not its owner, no caps here
            assert caps_over(os.dup(own), child, ALL_CAPS, 0) == 0  # from below: nothing above
            os.close(child)
        finally:
            parent_side.send(b"x")
            os.waitpid(pid, 0)
            parent_side.close()
            child_side.close()
    finally:
        os.close(own)
