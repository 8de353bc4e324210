"""Attacks from the first issue-9 red-team review, each kept as the test that now fails closed.

Each test is the attack as root (or a user) inside a `mountwarden run` container performs it, and
asserts the guarantee the issue asks for. The docstrings describe the hole as it was found.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from conftest import calls, run_container, write_policy

# A umount2 of a missing path is answered CONTINUE and its whole target (up to PATH_MAX) is
# recorded: 16 such records (about 4 KiB each) and 34 of about 400 bytes use up the window's
# byte budget (64 KiB) with two dozen calls, and no record of ~700 bytes fits afterwards.
_LONG = "/" + "/".join(["x" * 250] * 15)
_MEDIUM = "/" + "y" * 200


def test_audit_flood_cannot_hide_a_granted_mount(
    tmp_path: Path, mountcall: Path, images: dict[str, Path], mnt: Path
) -> None:
    """Hole: the byte budget of a window is shared by all kinds, so a container first spends it
    on failing calls and then mounts an image: its decision is only counted ("mount OK kernel
    count=1"), with no source, target, rule or device anywhere in the log. The limiter is meant
    to summarise floods, not hide the decisions policy made.

    Fix: never count a decision that granted something (result OK with action kernel, fuse,
    remount, unmount: already bounded by the loop pool and the mount limits) or every denial's
    first record per source; or give each kind its own byte budget so one kind's flood cannot
    take another's room.
    """
    policy = write_policy(
        tmp_path / "p.yaml",
        [{"name": "allow-test", "match": {"source": "/**", "target": "/**"}, "action": "kernel"}],
    )
    image = images["ext4"]
    run = run_container(
        tmp_path,
        calls(
            mountcall,
            f"repeat 16 umount {_LONG}",
            f"repeat 34 umount {_MEDIUM}",
            f"mount {image} {mnt} ext4 ro",
            f"umount {mnt}",
        ),
        policy=policy,
    )
    assert run.stdout.splitlines()[-2:] == ["OK", "OK"], run.stdout + run.stderr
    mounts = run.decisions("mount")
    assert [(d.get("source"), d.get("rule"), d.get("target")) for d in mounts] == [
        (str(image), "allow-test", str(mnt))
    ], "the granted mount left no decision record: " + str(
        [a for a in run.audit if a.get("event") == "audit-suppressed"]
    )


def test_nested_user_namespace_of_a_container_user_gets_no_superblock(
    tmp_path: Path, mountcall: Path, images: dict[str, Path], mnt: Path
) -> None:
    """Hole: the capability check asks about the caller's *own* mount namespace. A container
    user (uid 1000, no capability in the container) who unshares a user and a mount namespace
    owns that mount namespace, passes the check, and policy is evaluated for it: the supervisor
    binds a host loop device and the kernel's ext4 driver parses the image (the minter makes the
    superblock) on behalf of an unprivileged user; only the final move_mount fails (EINVAL,
    another namespace). The issue asks for capabilities in the user namespace that owns the
    *container's* mount namespace, which this caller lacks.

    Fix: in the mount/umount/remount handlers, require the caller's mount namespace to be the
    session's (compare /proc/<tid>/ns/mnt with the init's; a nested namespace gets EPERM, or is
    refused as unsupported) and check caps over session.userns_fd, before probing or policy.
    """
    policy = write_policy(
        tmp_path / "p.yaml",
        [
            {
                "name": "allow-any",
                "match": {"source": "/**", "target": "/**", "container_sources": True},
                "action": "kernel",
            }
        ],
    )
    image = images["ext4"]
    inner = calls(mountcall, "userns mnt", f"mount {image} {mnt} ext4 ro")
    run = run_container(tmp_path, [str(mountcall), "exec-as", "1000", *inner], policy=policy)
    assert run.stdout.splitlines() == ["OK", "EPERM"], run.stdout + run.stderr
    (decision,) = run.decisions("mount")
    assert "rule" not in decision and "host_loop" not in decision, decision


def test_superblock_remount_cannot_strip_forced_flags_of_a_fuse_mount(
    tmp_path: Path, workdir: Path, mountcall: Path, images: dict[str, Path]
) -> None:
    """Hole: a superblock remount (MS_REMOUNT without MS_BIND) of a path that is not one of the
    supervisor's mounts is CONTINUEd, and the kernel then walks the path again. The handler
    assumes the supervisor's superblocks belong to the host, so a swapped path cannot reach
    them; but a FUSE mount's superblock belongs to the container's user namespace (the daemon
    runs there), so the kernel lets the container's root reconfigure it, and do_remount then
    sets the mount's flags to exactly those of the call: nosuid, nodev and the rule's noexec
    are gone from the mount the supervisor attached. A child swaps the parent directories
    (RENAME_EXCHANGE) while the caller loops: the supervisor judges the plain directory, the
    kernel remounts the FUSE mount (hundreds of times in 3000 calls here). The FUSE superblock
    is SB_I_NODEV, so nodev still holds in effect; nosuid and noexec do not (a set-uid file of
    an image owned by the container's root runs as that root for any container user).

    Fix: never CONTINUE a remount the supervisor resolved: serve it on the fd it resolved
    (the helper, as the container's root, fspick(fd, "", FSPICK_EMPTY_PATH) + reconfigure,
    then mount_setattr with the forced flags of the record or nosuid,nodev), or refuse
    superblock remounts of mounts that are not records with EPERM.
    """
    policy = write_policy(
        tmp_path / "p.yaml",
        [{"name": "fuse-noexec", "match": {"source": "/**"}, "action": "fuse", "options": ["noexec"]}],
    )
    race = workdir / f"remount-race-{tmp_path.name}"
    for d in ("x/m", "y/m"):
        (race / d).mkdir(parents=True)
    for path in (race, race / "x", race / "y", race / "x/m", race / "y/m"):
        os.chown(path, 100000, 100000)  # the container's root
    try:
        script = (
            f"{mountcall} mount {images['ext4']} {race}/x/m ext4 ro && "
            f"{mountcall} remount-race {race}/x/m remount,ro {race}/x {race}/y 3000; "
            "grep ' - fuse' /proc/self/mountinfo"
        )
        run = run_container(tmp_path, ["/bin/sh", "-c", script], policy=policy)
        lines = run.stdout.splitlines()
        assert lines[0] == "OK", run.stdout + run.stderr
        (fuse_line,) = [line for line in lines if f" {race}/" in line]
        options = set(fuse_line.split()[5].split(","))
        assert {"nosuid", "nodev", "noexec"} <= options, f"{lines[1]}; the FUSE mount now shows {fuse_line}"
    finally:
        shutil.rmtree(race, ignore_errors=True)


def test_internal_errors_cannot_flood_the_audit_log(
    tmp_path: Path, workdir: Path, mountcall: Path, images: dict[str, Path], mnt: Path
) -> None:
    """Hole: the audit limiter bounds decision records only. A handler failure is also written
    as an unbounded `handler-failed` record with its traceback (about 600 bytes), and the
    container can cause one per call: after one FUSE mount it has /dev/fuse, runs fuse2fs on an
    image of its own, and sends a loop ioctl on a file of that FUSE mount; the supervisor's
    fstat of the taken fd is refused by FUSE (EACCES: another user namespace's connection), an
    OSError, not a KernelError, so it is an "internal error" answered EIO. 2000 calls wrote
    2000 tracebacks (1.2 MB) in well under a second; the limiter's 64 KiB per window never saw
    them.

    Fix: count handler-failed records through the session's AuditLimiter (or fold the
    traceback into the decision record, which is limited); and turn an OSError from fstat of a
    caller's fd into KernelError (ENOTTY: not a loop device), which is what the kernel says.
    """
    policy = write_policy(tmp_path / "p.yaml", [{"name": "fuse", "match": {"source": "/**"}, "action": "fuse"}])
    own = workdir / f"own-{tmp_path.name}"
    (own / "fm").mkdir(parents=True)
    shutil.copy(images["ext4"], own / "own.ext4")
    for path in (own, own / "fm", own / "own.ext4"):
        os.chown(path, 100000, 100000)  # the container's root
    try:
        script = (
            f"{mountcall} mount {images['ext4']} {mnt} ext4 ro && "  # gives the container /dev/fuse
            f"fuse2fs -o ro,fakeroot {own}/own.ext4 {own}/fm && "
            f"{mountcall} repeat 2000 ioctl {own}/fm/pub.txt 0x4C00; umount {own}/fm; umount {mnt}"
        )
        run = run_container(tmp_path, ["/bin/sh", "-c", script], policy=policy)
        assert "EIO 2000" in run.stdout or "ENOTTY 2000" in run.stdout, run.stdout + run.stderr
        failures = [a for a in run.audit if a.get("event") == "handler-failed"]
        assert len(failures) <= 50, f"{len(failures)} unlimited handler-failed records (one per call)"
    finally:
        shutil.rmtree(own, ignore_errors=True)
