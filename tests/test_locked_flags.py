"""Forced flags the kernel locks: `run`'s image mounts land by way of the staging namespace.

The attacker here is a process of the container that the filter never sees: the test enters
the container's user and mount namespaces itself (nsenter, as the container's root) and makes
the raw calls that clear flags. The kernel must refuse them, for the flags to hold against
any process (kernel-facts §10); the supervisor's own remounts and unmounts must still work.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import descendants, mountwarden, read_audit, run_container, write_policy

from supervisor import mountinfo

FORCED = ["nosuid", "nodev", "noexec"]


def _policy(tmp_path: Path, action: str = "kernel") -> Path:
    # No source glob: images reached through a mount namespace the container unshared count too.
    rule = {"name": "forced", "match": {"target": "/**"}, "action": action, "options": FORCED}
    return write_policy(tmp_path / f"forced-{action}.yaml", [rule])


class Live:
    """A `mountwarden run` shell that runs one line of stdin at a time; `init` is its host pid."""

    def __init__(self, tmp_path: Path, name: str, action: str = "kernel") -> None:
        self.log = tmp_path / f"audit-{name}.log"
        script = 'echo up; while read line; do eval "$line"; done'
        policy = _policy(tmp_path, action)
        cmd = mountwarden("run", "--name", name, "--audit-log", str(self.log), "--policy", str(policy),
                          "--", "/bin/sh", "-c", script)  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "up"
        self.init = next(p for p, n in descendants(self.proc.pid) if n == "mw-init")

    def ask(self, line: str) -> str:
        """Run `line` in the container (under the filter); its first line of output."""
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(line + " 2>&1\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def unfiltered(self, *argv: str) -> list[str]:
        """Run `argv` as the container's root in its user and mount namespaces, outside the filter."""
        cmd = ["nsenter", "-t", str(self.init), "-U", "-m", "-p", "--", *argv]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.split()

    def mount_of(self, path: Path) -> mountinfo.Mount | None:
        """The top mount on `path` in the container's namespace."""
        with open(f"/proc/{self.init}/mountinfo") as f:
            found = [m for m in mountinfo.parse(f.read()).values() if m.mount_point == str(path)]
        return found[-1] if found else None

    def decisions(self, at_least: int = 1) -> list[dict[str, object]]:
        """The audit log's decisions so far, once there are `at_least` (it is written asynchronously).

        A FUSE daemon's own calls are left out: only the container's count.
        """
        deadline = time.monotonic() + 5
        while len(records := [r for r in read_audit(self.log) if r.get("event") == "mount-decision"
                              and r.get("caller") != "fuse-daemon"]) < at_least:  # fmt: skip
            assert time.monotonic() < deadline
            time.sleep(0.01)
        return records

    def close(self) -> None:
        assert self.proc.stdin
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture
def rw_image(workdir: Path, images: dict[str, Path]) -> Path:
    """A copy of the ext4 image the container's root may open read-write."""
    image = workdir / "img" / "locked-rw.ext4"
    image.write_bytes(images["ext4"].read_bytes())
    image.chmod(0o666)
    return image


@pytest.fixture(name="live")
def live_fixture(tmp_path: Path) -> Iterator[Live]:
    box = Live(tmp_path, "locked")
    try:
        yield box
    finally:
        box.close()


def test_an_unfiltered_process_of_the_container_cannot_clear_the_flags(
    live: Live, rw_image: Path, mountcall: Path, mnt: Path
) -> None:
    mc = str(mountcall)
    assert live.ask(f"{mc} mount {rw_image} {mnt} ext4 0") == "OK"
    mount = live.mount_of(mnt)
    assert mount is not None and {"rw", *FORCED} <= set(mount.options.split(","))
    locked = [d for d in live.decisions() if d.get("syscall") == "mount"]
    assert locked[-1]["flags_locked"] is True, locked[-1]
    status = live.unfiltered("grep", "-c", "^Seccomp:.0", "/proc/self/status")
    assert status == ["1"]  # really outside the filter
    attacks = live.unfiltered(mc, "seq", "mount", "-", str(mnt), "-", "remount,bind", ";",
                              "setattr-clear", str(mnt), ";", "open-tree-attr-clear", str(mnt))  # fmt: skip
    assert attacks == ["EPERM", "EPERM", "EPERM"]
    after = live.mount_of(mnt)
    assert after is not None and after.mnt_id == mount.mnt_id and after.options == mount.options
    # Still the container's to unmount, through the supervisor: the record names this copy.
    assert live.ask(f"{mc} umount {mnt}") == "OK"
    assert live.mount_of(mnt) is None
    umounts = [d for d in live.decisions(at_least=2) if d.get("syscall") == "umount2"]
    assert umounts[-1]["action"] == "unmount", umounts[-1]


def test_supervisor_remounts_change_what_the_kernel_left_unlocked(
    live: Live, rw_image: Path, mountcall: Path, mnt: Path
) -> None:
    mc = str(mountcall)
    assert live.ask(f"{mc} mount {rw_image} {mnt} ext4 0") == "OK"
    assert live.ask(f"{mc} mount - {mnt} - remount,bind,ro") == "OK"  # ro was not set: not locked
    assert live.ask(f"{mc} open {mnt}/pub.txt w") == "EROFS"
    assert live.ask(f"{mc} mount - {mnt} - remount,bind") == "OK"
    assert live.ask(f"{mc} open {mnt}/pub.txt w") == "OK"
    mount = live.mount_of(mnt)
    assert mount is not None and {"rw", *FORCED} <= set(mount.options.split(","))
    assert live.ask(f"{mc} umount {mnt}") == "OK"


def test_a_read_only_mount_stays_read_only_and_a_bind_remount_still_answers(
    live: Live, images: dict[str, Path], mountcall: Path, mnt: Path
) -> None:
    mc = str(mountcall)
    assert live.ask(f"{mc} mount {images['ext4']} {mnt} ext4 ro") == "OK"
    assert live.unfiltered(mc, "mount", "-", str(mnt), "-", "remount,bind") == ["EPERM"]
    assert live.ask(f"{mc} mount - {mnt} - remount,bind") == "OK"  # ro stays, as its superblock does
    assert live.ask(f"{mc} open {mnt}/pub.txt w") == "EROFS"
    mount = live.mount_of(mnt)
    assert mount is not None and "ro" in mount.options.split(",")
    assert live.ask(f"{mc} umount {mnt}") == "OK"


def test_a_target_on_a_tmpfs_of_the_container_still_gets_kernel_locked_flags(
    live: Live, images: dict[str, Path], rw_image: Path, mountcall: Path, mnt: Path
) -> None:
    """A tmpfs the container mounted has no staging original; the mount still lands locked."""
    mc = str(mountcall)
    sub = mnt / "sub"
    assert live.ask(f"{mc} mount tmpfs {mnt} tmpfs 0") == "OK"
    assert live.ask(f"mkdir {sub} && echo made") == "made"
    assert live.ask(f"{mc} mount {rw_image} {sub} ext4 0") == "OK"
    mount = live.mount_of(sub)
    assert mount is not None and {"rw", *FORCED} <= set(mount.options.split(","))
    decision = [d for d in live.decisions(at_least=2) if d.get("fstype") == "ext4"][-1]
    assert decision["flags_locked"] is True, decision
    attacks = live.unfiltered(mc, "seq", "mount", "-", str(sub), "-", "remount,bind", ";",
                              "setattr-clear", str(sub), ";", "open-tree-attr-clear", str(sub))  # fmt: skip
    assert attacks == ["EPERM", "EPERM", "EPERM"]
    # A mount namespace the container unshared is not served at all (EPERM, before any policy
    # or device work), as an unprivileged container's kernel would answer there.
    nested = f"unshare -m --propagation unchanged {mc} mount {images['ext4']} {sub} ext4 ro"
    assert live.ask(nested) == "EPERM"
    assert "own mount namespace" in str(live.decisions(at_least=3)[-1]["error"])
    assert live.ask(f"{mc} umount {sub}") == "OK"
    assert live.ask(f"{mc} umount {mnt}") == "OK"


def test_the_landing_is_closed_to_the_container_and_left_empty(
    live: Live, images: dict[str, Path], mountcall: Path, mnt: Path
) -> None:
    """Mounts land in /dev/.mountwarden by way of staging; the container can neither enter it nor
    find anything left there, and the mount it got is its own to unmount."""
    mc = str(mountcall)
    assert live.ask(f"{mc} mount {images['ext4']} {mnt} ext4 ro") == "OK"
    assert live.ask("ls -a /dev/.mountwarden").endswith("Permission denied")
    assert live.ask(f"{mc} mount tmpfs /dev/.mountwarden/1 tmpfs 0") == "EACCES"
    assert live.unfiltered("ls", "-A", "/dev/.mountwarden") == []
    with open(f"/proc/{live.init}/mountinfo") as f:
        assert ".mountwarden" not in f.read()
    mount = live.mount_of(mnt)
    assert mount is not None and not any(t.startswith(("master:", "shared:")) for t in mount.tags), mount
    assert live.unfiltered("umount", str(mnt)) == []  # not MNT_LOCKED: the container's to unmount
    assert live.mount_of(mnt) is None


def test_nothing_reaches_the_host_or_another_container(
    tmp_path: Path, live: Live, images: dict[str, Path], mountcall: Path, mnt: Path
) -> None:
    other = Live(tmp_path, "other")
    try:
        mc = str(mountcall)
        assert live.ask(f"{mc} mount {images['ext4']} {mnt} ext4 ro") == "OK"
        mount = live.mount_of(mnt)
        assert mount is not None
        assert other.mount_of(mnt) is None
        with open("/proc/self/mountinfo") as f:
            assert all(m.dev != mount.dev for m in mountinfo.parse(f.read()).values())
        assert live.ask(f"{mc} umount {mnt}") == "OK"
    finally:
        other.close()


@pytest.fixture
def live_fuse(tmp_path: Path) -> Iterator[Live]:
    box = Live(tmp_path, "locked-fuse", action="fuse")
    try:
        yield box
    finally:
        box.close()


def _gone(pid: int, timeout: float = 10) -> bool:
    """Whether process `pid` ends (or is a zombie) within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except OSError:
            return True
        time.sleep(0.02)
    return False


def _fuse_mounted(live: Live, image: Path, mnt: Path, mountcall: Path) -> tuple[mountinfo.Mount, int]:
    """Mount `image` through FUSE in `live`; the container's mount and the daemon's host pid."""
    assert live.ask(f"{mountcall} mount {image} {mnt} ext4 ro") == "OK"
    mount = live.mount_of(mnt)
    assert mount is not None and mount.fstype.startswith("fuse")
    assert {"ro", *FORCED} <= set(mount.options.split(","))
    decision = [d for d in live.decisions() if d.get("syscall") == "mount"][-1]
    assert decision["action"] == "fuse" and decision["flags_locked"] is True, decision
    daemon = int(str(decision["daemon_pid"]))
    assert os.path.exists(f"/proc/{daemon}")
    return mount, daemon


def test_fuse_mounts_get_locked_flags_and_their_unmount_still_ends_the_daemon(
    live_fuse: Live, images: dict[str, Path], mountcall: Path, mnt: Path
) -> None:
    mc = str(mountcall)
    mount, daemon = _fuse_mounted(live_fuse, images["ext4"], mnt, mountcall)
    assert live_fuse.ask(f"cat {mnt}/pub.txt") == "public"
    attacks = live_fuse.unfiltered(mc, "seq", "mount", "-", str(mnt), "-", "remount,bind", ";",
                                   "setattr-clear", str(mnt), ";", "open-tree-attr-clear", str(mnt))  # fmt: skip
    assert attacks == ["EPERM", "EPERM", "EPERM"]
    after = live_fuse.mount_of(mnt)
    assert after is not None and after.mnt_id == mount.mnt_id and after.options == mount.options
    # A bind keeps the superblock, so the daemon must live on after the original's unmount ...
    bind = mnt.parent / "mnt-bind"
    bind.mkdir(exist_ok=True)
    assert live_fuse.ask(f"{mc} mount {mnt} {bind} - bind") == "OK"
    assert live_fuse.ask(f"{mc} umount {mnt}") == "OK"
    assert live_fuse.ask(f"cat {bind}/pub.txt") == "public"
    # ... but once the container's last mount of it is gone (unmounted natively, as any FUSE
    # mount of its own), the daemon ends.
    assert live_fuse.ask(f"{mc} umount {bind}") == "OK"
    assert live_fuse.mount_of(mnt) is None and live_fuse.mount_of(bind) is None
    assert _gone(daemon), "the FUSE daemon outlived its last mount"


def test_fuse_mounts_on_a_tmpfs_of_the_container_get_locked_flags_too(
    live_fuse: Live, images: dict[str, Path], mountcall: Path, mnt: Path
) -> None:
    mc = str(mountcall)
    sub = mnt / "sub"
    assert live_fuse.ask(f"{mc} mount tmpfs {mnt} tmpfs 0") == "OK"
    assert live_fuse.ask(f"mkdir {sub} && echo made") == "made"
    assert live_fuse.ask(f"{mc} mount {images['ext4']} {sub} ext4 ro") == "OK"
    mount = live_fuse.mount_of(sub)
    assert mount is not None and {"ro", *FORCED} <= set(mount.options.split(","))
    decision = [d for d in live_fuse.decisions(at_least=2) if d.get("fstype") == "ext4"][-1]
    assert decision["flags_locked"] is True, decision
    assert live_fuse.unfiltered(mc, "setattr-clear", str(sub)) == ["EPERM"]
    assert live_fuse.ask(f"cat {sub}/pub.txt") == "public"
    assert live_fuse.ask(f"{mc} umount {sub}") == "OK"
    assert _gone(int(str(decision["daemon_pid"])))
    assert live_fuse.ask(f"{mc} umount {mnt}") == "OK"


@pytest.mark.parametrize("victim", ["container", "supervisor"])
def test_sigkill_with_a_locked_fuse_mount_leaves_nothing(
    tmp_path: Path, images: dict[str, Path], mountcall: Path, mnt: Path, victim: str
) -> None:
    box = Live(tmp_path, f"fuse-kill-{victim}", action="fuse")
    try:
        _, daemon = _fuse_mounted(box, images["ext4"], mnt, mountcall)
        os.kill(box.init if victim == "container" else box.proc.pid, signal.SIGKILL)
        box.proc.wait(timeout=30)
        assert _gone(daemon)
    finally:
        if box.proc.poll() is None:
            box.close()
    if victim == "supervisor":  # the empty device cgroup directory is gc's, as for kernel mounts
        subprocess.run(mountwarden("gc"), capture_output=True, text=True, check=True)
    # no_leaks checks that the mounts, the helpers, the daemon and the container are gone


def test_a_rootfs_container_gets_locked_mounts_too(tmp_path: Path, rootfs: Path) -> None:
    """With --rootfs the init binds the staged root again and pivots: its /dev stays a slave of staging."""
    script = [
        "/bin/sh", "-c",
        "mountcall mount /img/data.ext4 /mnt ext4 ro; grep -c ' /mnt .*nosuid,nodev,noexec' /proc/self/mountinfo; "
        "mountcall umount /mnt",
    ]  # fmt: skip
    run = run_container(tmp_path, script, policy=_policy(tmp_path), rootfs=rootfs)
    assert run.stdout.split() == ["OK", "1", "OK"], run.stderr
    mount, umount = run.decisions("mount")[-1], run.decisions("umount2")[-1]
    assert mount["flags_locked"] is True and umount["action"] == "unmount", (mount, umount)
