"""Ninth red-team pass: the private mount device of an ordinary user's container (issue 11).

The attacker is an ordinary host account U running `mountwarden run --control-socket` against
root's `serve`: its own processes outside the container run under no filter and open the pool's
nodes through /proc/<pid>/root. Since LoopPool.mount_device a kernel mount in U's container is
made from a private host loop device bound to the judged file (at first, at the offset and size
limit read from the slot's device at mount time). Each hole found is a test asserting the safe
behaviour, marked xfail (strict) until fixed, its docstring saying what is wrong and the fix;
all four are fixed now.
"""

from __future__ import annotations

import errno
import fcntl
import os
import pwd
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from test_redteam6 import CHAT, _wait
from test_redteam7 import WAIT_GO, run_attack
from test_unprivileged import ordinary_user, place  # noqa: F401 - fixtures

# U's process outside its container. argv: the chat directory, what to do, a path under the
# container's root. It finds that path through the root of any process of its own.
OUTSIDE = CHAT + r"""
import fcntl, struct
LOOP_SET_STATUS64, LOOP_GET_STATUS64 = 0x4C04, 0x4C05
what, inside = sys.argv[2:4]
path = None
for pid in sorted(p for p in os.listdir("/proc") if p.isdigit()):
    if os.path.exists(f"/proc/{pid}/root{inside}"):
        path = f"/proc/{pid}/root{inside}"
        break
if what == "nothing":
    say("result", "done")
    sys.exit(0)
if path is None:
    say("result", "not found")
    sys.exit(0)
try:
    if what == "sizelimit":  # struct loop_info64: lo_sizelimit at offset 32
        fd = os.open(path, os.O_RDWR)
        info = bytearray(232)
        fcntl.ioctl(fd, LOOP_GET_STATUS64, info, True)
        struct.pack_into("<Q", info, 32, 1 << 40)
        fcntl.ioctl(fd, LOOP_SET_STATUS64, bytes(info))
        os.close(fd)
        say("result", "done")
    elif what == "many":  # after each of the container's mounts, another size limit
        fd = os.open(path, os.O_RDWR)
        for i in range(4):
            while not os.path.exists(os.path.join(chat, f"m{i}")):
                time.sleep(0.02)
            info = bytearray(232)
            fcntl.ioctl(fd, LOOP_GET_STATUS64, info, True)
            struct.pack_into("<Q", info, 32, (1 << 40) + (i + 1) * 4096)
            fcntl.ioctl(fd, LOOP_SET_STATUS64, bytes(info))
            say(f"c{i}", "")
        os.close(fd)
        say("result", "done")
    elif what == "hold":
        fd = os.open(path, os.O_RDONLY)
        say("result", "done")
        while not os.path.exists(os.path.join(chat, "end")):
            time.sleep(0.05)
except OSError as exc:
    say("result", f"denied {exc.errno}")
"""


def _attack(
    user: pwd.struct_passwd, where: Path, tmp_path: Path, name: str, script: str, outside: list[str],
    during: Callable[[], Any] | None = None, after: Callable[[], Any] | None = None,
) -> tuple[str, str, Any]:  # fmt: skip
    """test_redteam7.run_attack with this file's OUTSIDE script, under a rule that lets U's
    container kernel-mount U's own ext4 images under `where`."""
    rules = [{"name": "own-ext4", "containers": {"host_uid": [user.pw_uid]},
              "match": {"source": f"{where}/*.ext4", "target": "/**"}, "action": "kernel"}]  # fmt: skip
    return run_attack(
        user, where, tmp_path, rules, name, script, OUTSIDE, outside,
        during=None if during is None else lambda _: during(), after=None if after is None else lambda _: after(),
    )  # fmt: skip


def _own_image(place: Path, user: pwd.struct_passwd) -> Path:  # noqa: F811 - a fixture's name
    image = place / "mine.ext4"
    shutil.copy(place / "data.ext4", image)
    os.chown(image, user.pw_uid, user.pw_gid)
    return image


def test_two_mounts_of_one_device_stay_one_filesystem_whatever_u_does_outside(
    ordinary_user: pwd.struct_passwd,  # noqa: F811 - a fixture
    place: Path,  # noqa: F811 - a fixture
    tmp_path: Path,
) -> None:
    """Hole (fixed): U's container binds its own ext4 image read-write and mounts /dev/loop0 at /tmp/a
    (served from private device P1, size limit 0). U's process outside opens the node (0660, its
    own) and sets the slot device's lo_sizelimit to 1 TiB with LOOP_SET_STATUS64: nothing served,
    so `_refuse_if_mounted` never runs, and the device's size is unchanged (the file is smaller).
    The container mounts /dev/loop0 again at /tmp/b: `mount_device` sees the slot's size limit
    differ from P1's, closes P1 (still mounted, it stays bound, now with no fd and no ticket) and
    binds P2 to the same file. P2 is another block device, so the kernel makes a second ext4
    superblock over the same bytes, both writable: two journals and two allocators writing one
    image. Natively, and before the change, both mounts of one device are one superblock
    (test_unprivileged checks it without the outside process:
    test_an_ordinary_users_device_mounted_twice_is_one_filesystem_and_clears_at_last_unmount).
    Not a new way to corrupt: the pool lets the container bind its image to /dev/loop0 and
    /dev/loop1 and mount both (two superblocks, as natively), and U can write its own image anyway.
    What is new is that a process outside the filter decides what the served mount is made from,
    and that P1 is counted nowhere (see the next tests).

    Fixed: the private device is made from the window the container set through the supervisor
    (Slot.window) and kept until a served change, which is refused while a filesystem still
    claims it (LoopPool.private_claimed, also after a lazy unmount)."""
    _own_image(place, ordinary_user)
    script = (
        f"losetup /dev/loop0 {place}/mine.ext4 && mkdir -p /tmp/a /tmp/b && mount /dev/loop0 /tmp/a "
        f"&& touch {{chat}}/ready; {WAIT_GO}; mount /dev/loop0 /tmp/b; "
        "[ $(stat -c %d /tmp/a) = $(stat -c %d /tmp/b) ] && echo one-filesystem || echo two-filesystems; "
        "umount /tmp/b; umount /tmp/a; losetup -d /dev/loop0"
    )
    result, output, _ = _attack(
        ordinary_user, place, tmp_path, "rt9-twice", script, ["sizelimit", "/dev/.mountwarden/loop0"]
    )
    assert result == "done", result
    assert output.split() == ["one-filesystem"], f"outside: {result}; the container: {output}"


def _locked_tickets(uid: int) -> int:
    """How many units of `uid`'s quota someone holds (quota.py: a BSD lock per unit)."""
    directory = Path("/run/mountwarden/quota") / str(uid)
    held = 0
    for unit in directory.iterdir() if directory.exists() else []:
        fd = os.open(unit, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError as exc:
            assert exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN)
            held += 1
        finally:
            os.close(fd)
    return held


def _bound_to(image: Path) -> int:
    count = 0
    for entry in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            if entry.read_text().strip() == str(image):
                count += 1
        except OSError:
            continue
    return count


def test_a_private_device_kept_past_the_container_counts_in_the_users_quota(
    ordinary_user: pwd.struct_passwd,  # noqa: F811 - a fixture
    place: Path,  # noqa: F811 - a fixture
    tmp_path: Path,
) -> None:
    """Hole (fixed): U's container mounts its image (private device P) and U's process outside opens a
    file in the mount through /proc/<pid>/root. The container ends without unmounting: its mount
    namespace goes, but the open file keeps the superblock and so P bound. The pool's release
    closed P (`_release`: `slot.private.close()`) with no Retired entry and no ticket: P is in
    no quota, lingering or not. U repeats `run` and keeps one more host loop device per
    container (per mount, with the remount of the test above), beyond loop_devices_per_host_uid,
    until the host has none left for anyone.

    Fixed: a private device takes a ticket of the user's quota; let go while still bound, it is
    retired with it, and the ticket lingers until the kernel detaches it."""
    image = _own_image(place, ordinary_user)
    script = (
        f"losetup /dev/loop0 {image} && mkdir -p /tmp/rt9mnt && mount /dev/loop0 /tmp/rt9mnt "
        f"&& touch {{chat}}/ready; {WAIT_GO}"
    )

    def after() -> tuple[int, int]:
        _wait(lambda: _bound_to(image) <= 1, "the slot's own device to detach", timeout=10)
        return _bound_to(image), _locked_tickets(ordinary_user.pw_uid)

    result, output, seen = _attack(
        ordinary_user, place, tmp_path, "rt9-keep", script, ["hold", "/tmp/rt9mnt/pub.txt"], after=after
    )
    assert result == "done", result
    assert isinstance(seen, tuple)
    bound, tickets = seen
    assert bound == 1, f"host devices still bound to the image after the container: {bound}"
    assert tickets >= bound, f"{bound} host device(s) kept for U past its container, {tickets} counted"


def test_remounts_bind_no_host_devices_beyond_the_users_quota(
    ordinary_user: pwd.struct_passwd,  # noqa: F811 - a fixture
    place: Path,  # noqa: F811 - a fixture
    tmp_path: Path,
) -> None:
    """Hole (fixed): as in test_two_mounts_of_one_device_stay_one_filesystem_whatever_u_does_outside, but
    repeated: after each of the container's mounts of /dev/loop0, U's outside process writes
    another lo_sizelimit on the slot's device, and the next mount binds one more private device
    (the previous one stays bound under its mount, closed by the pool, counted nowhere). The policy
    sets no limit on mounts, so while the container runs U holds as many host loop devices as it
    mounts, past loop_devices and loop_devices_per_host_uid (here 4 private devices on one slot,
    with 2 tickets: the placeholder's and the slot's), until the host's max_loop or minors run out.

    Fixed: as test_two_mounts_of_one_device_stay_one_filesystem_whatever_u_does_outside, and the
    private device is counted in the user's quota."""
    image = _own_image(place, ordinary_user)
    rounds = " ".join(str(i) for i in range(4))
    script = (
        f"losetup /dev/loop0 {image} && touch {{chat}}/ready; for i in {rounds}; do mkdir -p /tmp/m$i; "
        "mount /dev/loop0 /tmp/m$i; touch {chat}/m$i; while [ ! -e {chat}/c$i ]; do sleep 0.05; done; done; "
        f"{WAIT_GO}; for i in {rounds}; do umount /tmp/m$i; done; losetup -d /dev/loop0"
    )

    def during() -> tuple[int, int]:
        return _bound_to(image), _locked_tickets(ordinary_user.pw_uid)

    result, _, seen = _attack(
        ordinary_user, place, tmp_path, "rt9-many", script, ["many", "/dev/.mountwarden/loop0"], during=during
    )
    assert result == "done", result
    assert isinstance(seen, tuple)
    bound, tickets = seen
    assert bound <= tickets, f"U's container holds {bound} host devices on its image, {tickets} counted"


def test_lazy_unmounts_with_open_files_keep_no_host_devices_beyond_the_quota(
    ordinary_user: pwd.struct_passwd,  # noqa: F811 - a fixture
    place: Path,  # noqa: F811 - a fixture
    tmp_path: Path,
) -> None:
    """Hole (fixed), with no outside process at all: U's container mounts its image (a slot bound for this
    mount alone, with autoclear, and private device P), opens a file in it and unmounts lazily
    (`umount -l`). The mount is gone from its namespace, so `sweep` calls `last_use_ended` and the
    slot is released: the slot's device D, which nothing mounts, detaches and its ticket returns;
    P, which the open file's superblock still holds, is closed by `_release` and stays bound
    with no ticket and no Retired entry. The slot is free again: repeated, the container keeps as
    many host loop devices bound as it likes (here 5, with 1 ticket: the placeholder's), past
    loop_devices and loop_devices_per_host_uid. Before the private device, D itself was the one
    held, and stayed counted (Retired with its ticket) until the kernel detached it.

    Fixed: the private device is retired with its ticket when its slot is released, and counted
    until the kernel detaches it."""
    image = _own_image(place, ordinary_user)
    script = (
        "for i in 0 1 2 3 4; do mkdir -p /tmp/m$i; mount " + str(image) + " /tmp/m$i && "
        'eval "exec $((i + 3))</tmp/m$i/pub.txt" && umount -l /tmp/m$i; done; '
        f"touch {{chat}}/ready; {WAIT_GO}"
    )

    def during() -> tuple[int, int]:
        return _bound_to(image), _locked_tickets(ordinary_user.pw_uid)

    result, output, seen = _attack(ordinary_user, place, tmp_path, "rt9-lazy", script, ["nothing", "/"], during=during)
    assert isinstance(seen, tuple)
    bound, tickets = seen
    assert bound >= 1, f"the container's mounts failed: {output}"
    assert bound <= tickets, f"U's container holds {bound} host devices on its image, {tickets} counted"
