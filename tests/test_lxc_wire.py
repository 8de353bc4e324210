"""LXC's notify proxy wire format: what LXC sends decodes, anything else is refused, no fd is lost.

The messages are sent over a real SOCK_SEQPACKET pair with real fds of every kind, as LXC's
monitor sends them (seccomp.c, seccomp_notify_handler), and received by the module itself.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from supervisor.errors import KernelError
from supervisor.seccomp import filter as seccomp_filter
from supervisor.seccomp import notify
from supervisor.sources import lxc

PID = os.getpid()


def lxc_message(notif_id: int = 7, cookie: bytes = b"mwtest-cookie", **header: int) -> bytes:
    """A message as LXC 5.0.2 builds it: header, notification, prefilled response, cookie."""
    fields = {"reserved": 0, "monitor": 10, "init": 11, "notif": 80, "resp": 24, "data": 64, "len": len(cookie)}
    fields.update(header)
    head = lxc.HEADER.pack(*fields.values())
    notif = notify.NOTIF.pack(notif_id, PID, 0, 165, 0xC000003E, 0, 1, 2, 3, 4, 5, 6)
    return head + notif + notify.RESP.pack(notif_id, 0, 0, 0) + cookie


@pytest.fixture(scope="module")
def listener() -> Iterator[int]:
    """A real seccomp listener fd, from a child that loaded `run`'s filter and exited."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    child = os.fork()
    if child == 0:  # pragma: no cover - the child
        try:
            socket.send_fds(theirs, [b"l"], [seccomp_filter.install()])
        finally:
            os._exit(0)
    os.waitpid(child, 0)
    _, fds, _, _ = socket.recv_fds(ours, 1, 1)
    ours.close()
    theirs.close()
    yield fds[0]
    os.close(fds[0])


@pytest.fixture(scope="module")
def assorted(listener: int) -> Iterator[dict[str, int]]:
    """One fd of each kind a confused peer might send, and the three LXC sends."""
    r, w = os.pipe()
    fds = {
        "proc": os.open(f"/proc/{PID}", os.O_RDONLY | os.O_DIRECTORY),
        "mem": os.open(f"/proc/{PID}/mem", os.O_RDWR),
        "listener": listener,
        "pipe": r,
        "null": os.open("/dev/null", os.O_RDONLY),
        "other-proc": os.open("/proc/1", os.O_RDONLY | os.O_DIRECTORY),
        "dir": os.open("/", os.O_RDONLY | os.O_DIRECTORY),
    }
    yield fds
    os.close(w)
    for name, fd in fds.items():
        if name != "listener":
            os.close(fd)


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def send_and_decode(data: bytes, fds: list[int]) -> lxc.Message:
    """Send like the monitor, receive with the module; the received fds are closed either way."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        if fds:
            socket.send_fds(a, [data], fds)
        else:
            a.send(data)
        received = lxc.receive(b)
        assert received is not None
        try:
            message = lxc.decode(received)
            # the listener is borrowed: it must be the one received, still open here
            assert message.listener == received.fds[2]
            os.fstat(message.listener)
            return message
        finally:
            received.close()


def test_struct_sizes_match_the_kernel() -> None:
    notify.check_sizes()
    assert (lxc.HEADER.size, lxc.MESSAGE_SIZE) == (32, 136)


def test_round_trip(assorted: dict[str, int]) -> None:
    before = open_fds()
    fds = [assorted["proc"], assorted["mem"], assorted["listener"]]
    message = send_and_decode(lxc_message(notif_id=99), fds)
    assert (message.monitor_pid, message.init_pid, message.cookie) == (10, 11, "mwtest-cookie")
    assert message.notif == notify.Notification(99, PID, 165, 0xC000003E, (1, 2, 3, 4, 5, 6))
    answer = lxc.reply(message, notify.Response.errno(99, errno.EPERM))
    assert len(answer) == lxc.MESSAGE_SIZE  # no cookie in the reply: LXC requires exactly 136 bytes
    assert answer[: lxc.HEADER.size + 80] == lxc_message(notif_id=99)[: lxc.HEADER.size + 80]
    assert notify.RESP.unpack(answer[-24:]) == (99, 0, -errno.EPERM, 0)
    assert open_fds() == before


def test_no_cookie(assorted: dict[str, int]) -> None:
    message = send_and_decode(lxc_message(cookie=b""), [assorted["proc"], assorted["mem"], assorted["listener"]])
    assert message.cookie == ""


@pytest.mark.parametrize(
    ("data", "kinds", "why"),
    [
        (lxc_message(reserved=1), ("proc", "mem", "listener"), "reserved"),
        (lxc_message(notif=88), ("proc", "mem", "listener"), "sizes"),
        (lxc_message(len=3), ("proc", "mem", "listener"), "cookie"),
        (lxc_message()[:135], ("proc", "mem", "listener"), "shorter"),
        (lxc_message(monitor=0), ("proc", "mem", "listener"), "no monitor"),
        (lxc_message(cookie=b"\xff\xfe"), ("proc", "mem", "listener"), "UTF-8"),
        (lxc_message(cookie=b"a\nb"), ("proc", "mem", "listener"), "control"),
        (lxc_message(), ("proc", "mem"), "2 fds"),
        (lxc_message(), ("mem", "proc", "listener"), "/proc/<pid>"),
        (lxc_message(), ("other-proc", "mem", "listener"), "/proc/<pid>"),
        (lxc_message(), ("proc", "mem", "pipe"), "the listener"),
        (lxc_message(), ("proc", "mem", "listener", "null"), "more than 3 fds"),
        (lxc_message() + b"x" * (lxc.MAX_COOKIE + 1), ("proc", "mem", "listener"), "longer"),
    ],
)
def test_refusals_say_why(assorted: dict[str, int], data: bytes, kinds: tuple[str, ...], why: str) -> None:
    before = open_fds()
    with pytest.raises(lxc.Refused, match=why):
        send_and_decode(data, [assorted[k] for k in kinds])
    assert open_fds() == before


def test_prefilled_response_id_must_match(assorted: dict[str, int]) -> None:
    data = bytearray(lxc_message(notif_id=5))
    struct.pack_into("=Q", data, lxc.HEADER.size + 80, 6)
    with pytest.raises(lxc.Refused, match="prefilled"):
        send_and_decode(bytes(data), [assorted["proc"], assorted["mem"], assorted["listener"]])


FD_KINDS = ("proc", "mem", "listener", "pipe", "null", "other-proc", "dir")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    prefix=st.sampled_from([b"", lxc_message()[:32], lxc_message()[:116]]),
    tail=st.binary(max_size=300),
    kinds=st.lists(st.sampled_from(FD_KINDS), max_size=5),
)
def test_fuzzed_messages_are_refused_or_decoded(
    assorted: dict[str, int], prefix: bytes, tail: bytes, kinds: list[str]
) -> None:
    """Arbitrary bytes and fds: a Message or lxc.Refused, nothing else, and every fd closed."""
    before = open_fds()
    try:
        message = send_and_decode(prefix + tail, [assorted[k] for k in kinds])
    except lxc.Refused:
        pass
    else:
        assert kinds == ["proc", "mem", "listener"]
        assert len(prefix + tail) == lxc.MESSAGE_SIZE + len(message.cookie.encode())
    assert open_fds() == before


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    notif_id=st.integers(0, 2**64 - 1),
    pids=st.tuples(st.integers(1, 2**31 - 1), st.integers(1, 2**31 - 1)),
    cookie=st.text(st.characters(codec="utf-8", categories=["L", "N", "P", "S"], include_characters=" "), max_size=64),
)
def test_valid_messages_round_trip(assorted: dict[str, int], notif_id: int, pids: tuple[int, int], cookie: str) -> None:
    raw = cookie.encode()
    data = lxc_message(notif_id, raw, monitor=pids[0], init=pids[1])
    message = send_and_decode(data, [assorted["proc"], assorted["mem"], assorted["listener"]])
    assert (message.notif.id, message.monitor_pid, message.init_pid, message.cookie) == (notif_id, *pids, cookie)
    assert lxc.reply(message, notify.Response.continue_(notif_id)) == data[: lxc.HEADER.size + 80] + notify.RESP.pack(
        notif_id, 0, 0, 1
    )


def test_profile_merges_debians_rules() -> None:
    base = "2\ndenylist\nreject_force_umount\n[all]\nkexec_load errno 1\n[x86_64]\nfoo errno 1\n"
    text = lxc.profile(base)
    assert text.startswith(base)
    rules = text[len(base) :].splitlines()
    assert rules[0] == "[all]"  # the base may end in an arch section: ours apply to every ABI
    assert "umount2 notify [1,0,SCMP_CMP_MASKED_EQ,1]" in rules  # umount -f keeps reject_force_umount's EACCES
    assert "fsopen errno 38" in rules and "mount_setattr errno 38" in rules
    assert "seccomp errno 22 [1,8,SCMP_CMP_MASKED_EQ,8]" in rules


@pytest.mark.parametrize(
    ("base", "why"),
    [("1\nallowlist\n", "version 2"), ("2\ndenylist\n[all]\nmount errno 1\n", "line 4 .* mount")],
)
def test_profile_refuses_what_it_cannot_merge(base: str, why: str) -> None:
    with pytest.raises(KernelError, match=why):
        lxc.profile(base)


def test_shipped_profile_is_current() -> None:
    from conftest import REPO

    with open("/usr/share/lxc/config/common.seccomp") as f:
        base = f.read()
    assert (REPO / "contrib/lxc/mountwarden.seccomp").read_text() == lxc.profile(base)
