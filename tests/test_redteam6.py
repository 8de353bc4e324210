"""Sixth red-team pass: ordinary host users talking to `serve` as root (issue 11).

The attacker is an ordinary host account: it runs `mountwarden run` (its container's root is
itself), talks to the control socket directly, and keeps processes of its own outside the
container. Each hole found is a test that asserts the safe behaviour and is marked xfail
(strict) until fixed, its docstring saying what is wrong and the fix; attacks that failed stay
as guards.
"""

from __future__ import annotations

import errno
import json
import os
import pwd
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import oci
import pytest
from conftest import write_policy
from test_unprivileged import _as_user, ordinary_user, place  # noqa: F401 - fixtures

# The attacker's process outside its container: it reaches a node of the pool's through
# /proc/<pid>/root (its own processes: it owns their user namespace) and keeps an O_PATH fd on it,
# which opens no device and holds nothing the pool can see. argv: the chat directory and the
# node's path under a process's root (a pool node, or the image in a FUSE daemon's jail).
# How the attackers' scripts talk with the test, through files in the chat directory `chat`:
# `wait` for the test's mark, `say` a result (written whole, then renamed into place).
CHAT = r"""
import os, sys, time
chat = sys.argv[1]
def wait(name):
    while not os.path.exists(os.path.join(chat, name)):
        time.sleep(0.02)
def say(name, text):
    with open(os.path.join(chat, name + ".tmp"), "w") as f:
        f.write(text)
    os.rename(os.path.join(chat, name + ".tmp"), os.path.join(chat, name))
"""

LURKER = CHAT + r"""
import stat
where = sys.argv[2]
kept = -1
for pid in sorted(p for p in os.listdir("/proc") if p.isdigit()):
    try:
        fd = os.open(f"/proc/{pid}/root/{where}", os.O_PATH)
    except OSError:
        continue
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode) and os.major(st.st_rdev) == 7:
        kept = fd
        break
    os.close(fd)
if kept < 0:
    say("opened", "none")
    sys.exit(0)
say("opened", str(os.minor(os.fstat(kept).st_rdev)))
if len(sys.argv) > 3:  # spin: be the last to close the device, then reopen it unbound
    import fcntl
    wait("spin")
    deadline, seen = time.monotonic() + 3, "never unbound"
    while time.monotonic() < deadline:
        try:
            dev = os.open(f"/proc/self/fd/{kept}", os.O_RDONLY)
        except OSError as exc:
            seen = f"denied {exc.errno}"
            break
        try:
            fcntl.ioctl(dev, 0x4C05, bytes(232))  # LOOP_GET_STATUS64
        except OSError:
            seen = "an fd on the unbound device"
            break
        finally:
            os.close(dev)
    say("result", seen)
    sys.exit(0)
wait("reused")
try:
    dev = os.open(f"/proc/self/fd/{kept}", os.O_RDONLY)
    data = os.pread(dev, 1 << 20, 0)
    say("result", "read " + ("SECRET" if b"TOPSECRET-rt6" in data else "other"))
except OSError as exc:
    say("result", f"denied {exc.errno}")
"""


def _wait(check: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _user_popen(user: pwd.struct_passwd, *argv: str) -> subprocess.Popen[str]:
    inner = " ".join(f"'{a}'" for a in argv)
    cmd = ["su", "-s", "/bin/sh", user.pw_name, "-c", f"cd / && exec {inner}"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)


def _bound(minor: int) -> bool:
    return os.path.exists(f"/sys/block/loop{minor}/loop/backing_file")


# How the device the lurker's node names stops being the container's: the container clears it,
# the container ends with it bound (or, for a free slot's node, at all), serve is killed.
_LET_GO = {
    "cleared": "losetup -d /dev/loop0; touch {chat}/cleared; while [ ! -e {chat}/end ]; do sleep 0.05; done",
    "container ended": "touch {chat}/cleared",
    "serve killed": "touch {chat}/cleared; while [ ! -e {chat}/end ]; do sleep 0.05; done",
}


@pytest.mark.parametrize(
    ("let_go", "node"),
    [("cleared", "loop0"), ("container ended", "loop0"), ("container ended", "loop1"), ("serve killed", "loop0")],
)
def test_a_released_loop_device_is_not_the_users_to_reopen(
    ordinary_user: pwd.struct_passwd,  # noqa: F811 - a fixture
    place: Path,  # noqa: F811 - a fixture
    tmp_path: Path,
    let_go: str,
    node: str,
) -> None:
    """Hole (fixed): the pool's nodes live on a host tmpfs without nodev (adopted.py) whose only
    wall was the container's device cgroup. An ordinary user owns its container's user
    namespace, so a process of its own in any cgroup (its login session allows every device)
    walks /proc/<pid>/root/dev/.mountwarden/loopN and keeps an O_PATH fd on a node: of a device
    it bound, or of a free slot (the pool's placeholder device). O_PATH opens no device: the
    pool sees no holder, the device is let go, autoclear detaches it and the host gives the
    number to the next user. Reopening /proc/self/fd/N then opened that user's disk.

    Fixed: a node is disowned (host root's, no access bits) before the device it names is let
    go: by the pool when it replaces or releases it or closes, by the namespace helper's guard
    when serve dies. The reopen is refused (EACCES) whoever's the device is by then."""
    uid = ordinary_user.pw_uid
    rules = [{"name": "user-ext4", "containers": {"host_uid": [uid]},
              "match": {"source": f"{place}/*.ext4", "target": "/**"}, "action": "kernel"}]  # fmt: skip
    script = (
        f"losetup /dev/loop0 {place}/data.ext4 && touch {{chat}}/bound || exit 1; "
        "while [ ! -e {chat}/clear ]; do sleep 0.05; done; " + _LET_GO[let_go]
    )
    result = _reopened(ordinary_user, place, tmp_path, rules, script, f"dev/.mountwarden/{node}", let_go)
    assert result == f"denied {errno.EACCES}", f"the user's process outside the container: {result}"


def _reopened(
    user: pwd.struct_passwd, where: Path, tmp_path: Path, rules: list[dict[str, object]], script: str, node: str,
    let_go: str = "cleared",
) -> str:  # fmt: skip
    """Run `script` ({chat} filled in) in the user's container; once it touched {chat}/bound, the
    lurker keeps an O_PATH fd on `node` under a process's root; on {chat}/clear the container
    lets the device go (`let_go`, and {chat}/cleared), the host binds a secret of its own on that
    device number, and the lurker reopens its fd. Returns what the lurker got."""
    chat = where / "chat"
    chat.mkdir(mode=0o755)
    os.chown(chat, user.pw_uid, user.pw_gid)
    (where / "lurk.py").write_text(LURKER)
    secret = tmp_path / "secret.img"
    secret.write_bytes(b"TOPSECRET-rt6 " * (1 << 16))
    policy = write_policy(tmp_path / "users.yaml", rules)
    result, minor = "", -1
    with oci.serving(tmp_path, policy, control=where / "control.sock") as serve:
        run = _user_popen(user, *oci.mountwarden_argv(), "run", "--name", "rt6-reuse", "--control-socket",
                          str(where / "control.sock"), "--", "/bin/sh", "-c", script.format(chat=chat))  # fmt: skip
        lurker = None
        try:
            _wait(lambda: (chat / "bound").exists() or run.poll() is not None, "the container's device")
            assert (chat / "bound").exists(), run.communicate()
            lurker = _user_popen(user, "/usr/bin/python3", str(where / "lurk.py"), str(chat), node)
            _wait(lambda: (chat / "opened").exists(), "the lurker's O_PATH fd")
            opened = (chat / "opened").read_text()
            assert opened != "none", f"the user reached no {node} from outside its container"
            minor = int(opened)
            (chat / "clear").touch()
            _wait(lambda: (chat / "cleared").exists(), "the container letting the device go")
            if let_go == "serve killed":
                serve.proc.kill()
                serve.proc.wait()
            elif let_go == "container ended":
                run.wait(timeout=60)
            _wait(lambda: not _bound(minor), f"loop{minor} detached")
            # Someone else (here the host) binds the free device to a disk of its own.
            subprocess.run(["losetup", f"/dev/loop{minor}", str(secret)], check=True)
            (chat / "reused").touch()
            _wait(lambda: (chat / "result").exists(), "the lurker's reopen")
            result = (chat / "result").read_text()
        finally:
            for name in ("clear", "end", "reused"):
                (chat / name).touch()
            if lurker is not None:
                lurker.wait(timeout=30)
            run.wait(timeout=60)
            if minor >= 0 and _bound(minor):
                subprocess.run(["losetup", "-d", f"/dev/loop{minor}"], check=False)
            if let_go == "serve killed":  # its containers' device cgroups: what the next serve does
                subprocess.run([*oci.mountwarden_argv(), "gc"], check=True, capture_output=True)
    return result


def test_after_serve_is_killed_the_user_gets_no_fd_on_an_unbound_pool_device(
    ordinary_user: pwd.struct_passwd,  # noqa: F811 - a fixture
    place: Path,  # noqa: F811 - a fixture
    tmp_path: Path,
) -> None:
    """Red-team pass 7: when serve dies, its fds on the pool's devices close before the guard
    disowns the nodes. A user spinning open/close on a node it reaches is then the last to
    close a device, which detaches, and its next open through the node not yet disowned holds
    an unbound device, which LOOP_CTL_GET_FREE hands to the next host user. The guard holds
    its own fd on every device the pool shows (nshelper.Keep) and closes them only after
    disowning: the spinner meets a bound device, then EACCES. The guard is stopped while the
    user spins, which widens the window from milliseconds to the whole spin."""
    uid, gid = ordinary_user.pw_uid, ordinary_user.pw_gid
    chat = place / "chat"
    chat.mkdir(mode=0o755)
    os.chown(chat, uid, gid)
    (place / "lurk.py").write_text(LURKER)
    rules = [{"name": "user-ext4", "containers": {"host_uid": [uid]},
              "match": {"source": f"{place}/*.ext4", "target": "/**"}, "action": "kernel"}]  # fmt: skip
    policy = write_policy(tmp_path / "users.yaml", rules)
    script = (
        f"losetup /dev/loop0 {place}/data.ext4 && touch {chat}/bound || exit 1; "
        f"while [ ! -e {chat}/end ]; do sleep 0.05; done"
    )
    result = ""
    with oci.serving(tmp_path, policy, control=place / "control.sock") as serve:
        run = _user_popen(ordinary_user, *oci.mountwarden_argv(), "run", "--name", "rt6-spin", "--control-socket",
                          str(place / "control.sock"), "--", "/bin/sh", "-c", script)  # fmt: skip
        lurker = None
        try:
            _wait(lambda: (chat / "bound").exists() or run.poll() is not None, "the container's losetup")
            assert (chat / "bound").exists(), run.communicate()
            lurker = _user_popen(ordinary_user, "/usr/bin/python3", str(place / "lurk.py"), str(chat),
                                 "dev/.mountwarden/loop0", "spin")  # fmt: skip
            _wait(lambda: (chat / "opened").exists(), "the lurker's O_PATH fd")
            assert (chat / "opened").read_text() != "none", "the user reached no pool node from outside"
            helpers = subprocess.run(["pgrep", "-P", str(serve.proc.pid), "-x", "mw-nshelper"], capture_output=True,
                                     text=True).stdout.split()  # fmt: skip
            assert len(helpers) == 1, helpers
            guard = int(helpers[0])
            os.kill(guard, signal.SIGSTOP)
            (chat / "spin").touch()
            serve.proc.kill()
            serve.proc.wait()
            try:
                _wait(lambda: (chat / "result").exists(), "the lurker's spin")
            finally:
                os.kill(guard, signal.SIGCONT)
            result = (chat / "result").read_text()
        finally:
            for name in ("spin", "end"):
                (chat / name).touch()
            if lurker is not None:
                lurker.wait(timeout=30)
            run.wait(timeout=60)
            subprocess.run([*oci.mountwarden_argv(), "gc"], check=True, capture_output=True)
    assert result in (f"denied {errno.EACCES}", "never unbound"), f"the user's process outside: {result}"


def test_a_fuse_daemons_image_node_is_not_the_users_to_reopen(
    ordinary_user: pwd.struct_passwd,  # noqa: F811 - a fixture
    place: Path,  # noqa: F811 - a fixture
    tmp_path: Path,
) -> None:
    """The same, through a FUSE daemon's jail: the daemon for a mount of the container's loop
    device runs as the container's root, so the user reaches its /image by /proc/<pid>/root.
    That node is the pool's (LoopPool.jail_node), disowned with the slot's own when the
    container clears the device."""
    rules = [{"name": "user-fuse", "containers": {"host_uid": [ordinary_user.pw_uid]}, "match": {"target": "/**"},
              "action": "fuse"}]  # fmt: skip
    script = (
        f"losetup /dev/loop0 {place}/data.ext4 && mkdir -p /tmp/rt6 && mount -t ext4 /dev/loop0 /tmp/rt6 "
        "&& touch {chat}/bound || exit 1; while [ ! -e {chat}/clear ]; do sleep 0.05; done; "
        "umount /tmp/rt6 && losetup -d /dev/loop0; touch {chat}/cleared; "
        "while [ ! -e {chat}/end ]; do sleep 0.05; done"
    )
    result = _reopened(ordinary_user, place, tmp_path, rules, script, "image")
    assert result == f"denied {errno.EACCES}", f"the user's process outside the container: {result}"


# The attacker's control client: `count` connections, each one request that is JSON but not an
# object, closed at once. It keeps no fd of its own open.
FLOOD = r"""
import signal, socket, sys
def late(signum, frame):
    raise TimeoutError
signal.signal(signal.SIGALRM, late)
for n in range(int(sys.argv[2])):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    signal.alarm(3)
    try:
        s.connect(sys.argv[1])  # blocks while serve's backlog is full
        s.send(b"[]")
    except OSError:
        break  # serve no longer accepts
    finally:
        signal.alarm(0)
        s.close()
print("sent", n)
"""


def _ask(path: Path, request: bytes, timeout: float = 5) -> dict[str, object] | None:
    """One request on the control socket; serve's answer, or None if none came in time."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.settimeout(timeout)
        try:
            s.connect(str(path))  # EAGAIN at once when serve's backlog is full
            s.send(request)
            answer = s.recv(4096)
        except (BlockingIOError, TimeoutError):
            return None
    return json.loads(answer) if answer else None


def test_requests_that_are_not_objects_do_not_exhaust_serve(
    ordinary_user: pwd.struct_passwd,  # noqa: F811 - a fixture
    place: Path,  # noqa: F811 - a fixture
    tmp_path: Path,
) -> None:
    """Hole: ControlSource._read catches KernelError, ValueError, TypeError and KeyError only.
    `[]` (AttributeError on .get), a nesting too deep (RecursionError) or an init_pid of 1e999
    (OverflowError) escape to the loop, which logs, stops watching the connection and never
    closes it (nor the fd sent with it). An ordinary user's loop of connect/send/close thus
    fills serve's fd table (systemd's default soft limit: 1024); accept() then fails EMFILE,
    the loop stops watching the control socket itself, and no user's `run` is answered again
    (the OCI and LXC sockets die the same way on their next connection).

    Fix: in `_read`, catch Exception around `_adopt` (answer, close the fds, `_drop` the peer
    on anything but a well-formed request), reject a non-dict request with EINVAL; in every
    source's `_accept`, treat OSError (EMFILE/ENFILE) as "try later" (log, keep the socket,
    back off) instead of letting it reach the loop; cap connections per uid.

    Fixed: every request is answered (a refusal for anything but one well-formed object) and
    its fds closed; out of fds, a socket sheds the connection it cannot take and stays served."""
    policy = write_policy(tmp_path / "none.yaml", [])
    sock = place / "control.sock"
    (place / "flood.py").write_text(FLOOD)
    with oci.serving(tmp_path, policy, control=sock) as serve:
        subprocess.run(["prlimit", f"--pid={serve.proc.pid}", "--nofile=1024:1024"], check=True)
        before = len(os.listdir(f"/proc/{serve.proc.pid}/fd"))
        assert _refused(_ask(sock, b'{"op": "adopt"}'))
        flood = _as_user(ordinary_user, "/usr/bin/python3", str(place / "flood.py"), str(sock), "1100")
        assert flood.stdout.startswith("sent"), flood.stderr
        time.sleep(1)
        after = len(os.listdir(f"/proc/{serve.proc.pid}/fd"))
        answer = _ask(sock, b'{"op": "adopt"}')
    assert _refused(answer), f"{flood.stdout}; serve's fds: {before} before, {after} after; answer {answer}"
    assert after <= before + 8, flood.stdout


def _refused(answer: dict[str, object] | None) -> bool:
    return answer is not None and answer["ok"] is False and "with the listener" in str(answer["error"])
