"""Attacks from the second red-team pass (staging namespace, Reconfigure, require_admin), each
kept as the test that now fails closed. The docstrings describe the hole as it was found.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from conftest import calls, read_audit, run_container, write_policy
from test_locked_flags import (
    Live,
    live_fixture,  # noqa: F401  (the `live` fixture, shared)
)

from supervisor.audit import Limits


def test_stacked_images_and_a_bind_of_the_top_one_release_everything(
    live: Live, tmp_path: Path, workdir: Path, mountcall: Path, images: dict[str, Path]
) -> None:
    """Hole (as found against the earlier staging design): a container stacked two images on
    one target, bound the top one elsewhere and unmounted the target twice; the release of a
    staging original then took the mount stacked on it instead, leaving a host loop device
    held for the life of the container and a later unmount failing EINVAL.

    Landing (stager.py) keeps nothing in staging once a mount is in place, so there is no
    original to release: the same sequence must leave each unmount answered, the landing
    empty, and every slot free for the next mounts.
    """
    mc = str(mountcall)
    target, bind, other = (workdir / f"rt2-{name}-{tmp_path.name}" for name in ("t", "b", "c"))
    for d in (target, bind, other):
        d.mkdir()
    assert live.ask(f"{mc} mount {images['ext4']} {target} ext4 ro") == "OK"
    assert live.ask(f"{mc} mount {images['squashfs']} {target} squashfs ro") == "OK"
    assert live.ask(f"{mc} mount {target} {bind} - bind") == "OK"  # keeps the squashfs
    assert live.ask(f"{mc} umount {target}") == "OK"
    assert live.ask(f"{mc} umount {target}") == "OK"
    assert live.ask(f"cat {bind}/pub.txt") == "public"
    assert live.ask(f"{mc} umount {bind}") == "OK"
    assert live.ask(f"{mc} mount {images['erofs']} {other} erofs ro") == "OK"
    assert live.ask(f"{mc} umount {other}") == "OK", [
        r.get("error") for r in read_audit(live.log) if r.get("result") not in ("OK", "CONTINUE", None)
    ]
    assert live.unfiltered("ls", "-A", "/dev/.mountwarden") == []
    assert live.ask("losetup -a | wc -l") == "0"  # every slot of the pool free again


def test_granted_remounts_cannot_flood_the_audit_log(tmp_path: Path, workdir: Path, mountcall: Path) -> None:
    """Hole: grants (result OK with action kernel, fuse, remount, unmount) are written in full
    without counting against the window's byte budget, only 50 per kind, and their size is the
    container's to choose: a target path may be up to PATH_MAX. A remount of the container's
    own tmpfs is a "grant" that costs one fork, so a container remounting a tmpfs at a 4 KiB
    path writes 50 records of about 4.3 KiB per 10 s window for that one kind (about 215 KiB,
    over three times the 64 KiB the limiter promises per window), and the four grant kinds
    together (a mount record names two paths) about 1.6 MB per window: some 14 GB a day from
    one container, well past "never fills the disk".

    Fix: give grants a byte budget of their own (written in full up to it, then summarised with
    counts like the rest), or cap each path in a record (say 512 bytes, with the full path's
    sha256 and length) so per_kind bounds the bytes; and do not count a remount of a mount the
    supervisor did not make (record None, done with the container's own rights) as a grant.
    """
    deep = workdir / f"rt2-flood-{tmp_path.name}"
    deep.mkdir()
    os.chown(deep, 100000, 100000)
    while len(str(deep)) < 3800:
        deep = deep / ("d" * min(250, 3800 - len(str(deep))))
        deep.mkdir()
        os.chown(deep, 100000, 100000)
    # The paths go relative to a working directory: an argv over 8 KiB crashes the supervisor
    # (see test_a_long_command_line_does_not_crash_the_supervisor).
    script = (
        f"cd {deep.parent} && {mountcall} seq mount tmpfs {deep.name} tmpfs 0 ';' "
        f"repeat 200 mount - {deep.name} - remount,bind ';' umount {deep.name}"
    )
    try:
        run = run_container(tmp_path, ["/bin/sh", "-c", script])
        assert run.stdout.splitlines() == ["OK", "OK 200", "OK"], run.stdout + run.stderr
        log = next(tmp_path.glob("audit-*.log")).read_text().splitlines()
        full = sum(len(line) + 1 for line in log if '"mount-decision"' in line)
        assert full <= Limits().max_bytes, f"{full} bytes of full decision records in one window"
    finally:
        shutil.rmtree(workdir / f"rt2-flood-{tmp_path.name}", ignore_errors=True)


def test_a_long_command_line_does_not_crash_the_supervisor(tmp_path: Path) -> None:
    """Hole (robustness, operator side): `mountwarden run -- sh -c "<a 9 KB script>"` dies with
    SIGSEGV before it starts anything: python-prctl 1.8.1's set_proctitle (container.py
    `name_process`, called first by the supervisor, then by every helper) crashes when the
    process's argv area is larger than about 8 KiB (`python -c 'import prctl;
    prctl.set_proctitle("m")' $(printf %9000s | tr ' ' x)` segfaults too). A CI runner passing
    a job's script on the command line gets exit 139 and no message.

    Fix: name processes with prctl.set_name only when /proc/self/cmdline is larger than 4 KiB
    (or always write the title with PR_SET_MM_ARG_START/END over a buffer of our own instead of
    python-prctl's argv rewriting), and test with a long argv.
    """
    script = "true " + "x" * 9000
    run = run_container(tmp_path, ["/bin/sh", "-c", script])
    assert run.returncode == 0, (run.returncode, run.stderr)


def test_a_chrooted_caller_still_gets_kernel_locked_flags(
    live: Live, workdir: Path, mountcall: Path, images: dict[str, Path], mnt: Path
) -> None:
    """Hole: the staging plan reads the *caller's* mount table (/proc/<tid>/mountinfo), whose
    mount points are relative to the caller's root and which leaves out every mount whose mount
    point lies outside it. A container root that chroots into a directory (here the test's
    work directory, on the host's tree it sees) makes the mount its target is on vanish from
    that table, so the plan gives up ("the target's mount is not in the container's mount
    table") and the helper attaches the image in the container's own namespace with plain,
    unlocked flags: any process of the container the filter does not see (the attacker model of
    test_locked_flags: nsenter into its user and mount namespaces) then clears nosuid and nodev
    with one mount_setattr, where a mount from the same call without the chroot gives EPERM.

    Fix: plan from the namespace's point of view, not the caller's: read the mount table of a
    task whose root is the namespace's root (the namespace helper, or the init for `run`) and
    the target's path beneath its mount from the fd (the helper's readlink of the fd it is
    given, or the mount id plus the dentry path), so a chroot, or a root the container
    pivoted, cannot hide the target's mount.
    """
    inside, image = (f"/{p.relative_to(workdir)}" for p in (mnt, images["ext4"]))
    assert live.ask(f"/usr/sbin/chroot {workdir} /{mountcall.name} mount {image} {inside} ext4 ro") == "OK"
    (decision,) = [d for d in live.decisions() if d.get("syscall") == "mount"]
    try:
        assert live.unfiltered(str(mountcall), "setattr-clear", str(mnt)) == ["EPERM"], decision
    finally:
        assert live.ask(f"/usr/sbin/chroot {workdir} /{mountcall.name} umount {inside}") == "OK"


def test_a_digest_policy_does_not_stall_the_supervisor_on_a_sparse_image(
    tmp_path: Path, workdir: Path, mountcall: Path, mnt: Path
) -> None:
    """Hole: with any digest rule in the policy (policies/examples/trusted-squashfs.yaml), every
    image mount request up to `limits.digest_max_size` (1 GiB by default, for rules without
    size.max) is first copied whole into a memfd and hashed, on the supervisor's single event
    loop and in its memory, before policy looks at the source, the fstype or anything else. A
    container makes a 1 GiB sparse ext4 file of its own (no disk, no quota) and asks for it
    again and again: each request, denied in the end, held the supervisor for 4.5 s here
    and 1 GiB of RAM charged to the supervisor, not to the container; every other container's
    mount, umount and loop ioctl waits meanwhile.

    Fix: decide on everything but the digest first (evaluate with sha256=None: if no rule that
    lists digests could match the source, fstype, target and size, skip the copy), bound the
    default digest_max_size far lower (say 64 MiB, with a note that larger pinned images need
    size.max), and hash off the event loop (a worker per session, with the call answered when
    it is done) so one container cannot stall the others; charge the copy to the container
    (make it in the container's memory cgroup, or count it against a per-container budget).
    """
    rule = {"name": "pinned", "match": {"source": "/srv/img/**", "sha256": ["0" * 64]}, "action": "kernel"}
    policy = write_policy(tmp_path / "p.yaml", [rule])
    sparse = workdir / f"rt2-sparse-{tmp_path.name}.ext4"
    with open(sparse, "wb") as f:
        f.truncate(1 << 30)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(sparse)], check=True)
    os.chown(sparse, 100000, 100000)
    try:
        run = run_container(tmp_path, calls(mountcall, f"repeat 3 mount {sparse} {mnt} ext4 ro"), policy=policy)
        assert run.stdout.split() == ["EPERM", "3"], run.stdout + run.stderr
        slowest = max(float(d["latency_us"]) for d in run.decisions("mount"))
        assert slowest < 100_000, f"one denied request held the supervisor for {slowest / 1e6:.2f} s"
    finally:
        sparse.unlink()
