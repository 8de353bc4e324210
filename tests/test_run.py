"""`mountwarden run` end to end: a real unprivileged container mounting real images."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, allow_policy, calls, mountwarden, read_audit, run_container, write_policy

IMAGES_POLICY = REPO / "policies" / "examples" / "images.yaml"


@pytest.mark.parametrize("fstype", ["ext4", "squashfs", "erofs"])
def test_container_mounts_and_reads_image(
    tmp_path: Path, images: dict[str, Path], mountcall: Path, mnt: Path, fstype: str
) -> None:
    script = REPO / "contrib" / "examples" / "mount_image.py"
    run = run_container(
        tmp_path,
        ["/usr/bin/python3", "-c", script.read_text(), str(images[fstype]), str(mnt)],
        policy=allow_policy(tmp_path),
    )
    assert run.returncode == 0, run.stderr
    assert "pub.txt: public" in run.stdout
    assert "nosuid,nodev" in run.stdout
    mount, umount = run.decisions("mount")[0], run.decisions("umount2")[0]
    assert mount["result"] == "OK" and mount["probed"] == fstype and mount["rule"] == "allow-test"
    assert mount["loop"].startswith("/dev/loop") and isinstance(mount["latency_us"], float)
    assert umount["result"] == "OK" and umount["action"] == "unmount"


def test_mount_as_unprivileged_host_uid_in_new_namespaces(tmp_path: Path, mountcall: Path) -> None:
    run = run_container(tmp_path, ["/bin/sh", "-c", "cat /proc/self/uid_map; readlink /proc/self/ns/mnt; echo $$"])
    assert run.returncode == 0, run.stderr
    uid_map, mntns, pid = run.stdout.split("\n")[:3]
    assert uid_map.split()[:2] == ["0", "100000"] or int(uid_map.split()[1]) >= 100000
    assert mntns != os.readlink("/proc/self/ns/mnt")
    assert int(pid) > 1  # pid 1 is the container's init, the command runs under it


def test_denied_mount_gets_errno_and_audit_line(
    tmp_path: Path, images: dict[str, Path], mountcall: Path, mnt: Path
) -> None:
    policy = write_policy(tmp_path / "deny.yaml", [{"name": "nothing", "action": "deny", "errno": "EACCES"}])
    run = run_container(tmp_path, [str(mountcall), "mount", str(images["ext4"]), str(mnt), "ext4", "ro"], policy=policy)
    assert run.stdout.strip() == "EACCES"
    (decision,) = run.decisions("mount")
    assert decision["rule"] == "nothing" and decision["action"] == "deny" and decision["result"] == "EACCES"
    assert decision["pid"] > 0 and decision["container"]


def test_no_matching_rule_is_eperm(tmp_path: Path, images: dict[str, Path], mountcall: Path, mnt: Path) -> None:
    empty = write_policy(tmp_path / "empty.yaml", [])
    run = run_container(tmp_path, [str(mountcall), "mount", str(images["ext4"]), str(mnt), "ext4", "ro"], policy=empty)
    assert run.stdout.strip() == "EPERM"
    assert "no rule matched" in run.decisions("mount")[0]["reason"]


def test_policy_forces_read_only(tmp_path: Path, images: dict[str, Path], mountcall: Path, mnt: Path) -> None:
    policy = allow_policy(tmp_path, options=["ro", "noexec"])
    run = run_container(
        tmp_path, calls(mountcall, f"mount {images['ext4']} {mnt} ext4 0", f"open {mnt}/pub.txt w"), policy=policy
    )
    assert run.stdout.split() == ["OK", "EROFS"]
    assert run.decisions("mount")[0]["options"].startswith("ro,")


@contextlib.contextmanager
def mounted_and_waiting(
    tmp_path: Path, image: Path, mnt: Path, mountcall: Path
) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    """A container that has mounted `image` on `mnt` and now sits waiting for a line on stdin."""
    log = tmp_path / "audit.log"
    policy = allow_policy(tmp_path)
    fstype = image.suffix[1:]
    mount = calls(mountcall, f"mount {image} {mnt} {fstype} ro", "wait")
    cmd = mountwarden("run", "--audit-log", str(log), "--policy", str(policy), "--", *mount)
    with subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout
        assert proc.stdout.readline().strip() == "OK"
        assert proc.stdout.readline().strip() == "READY"
        yield proc, log


def test_mount_is_invisible_on_host_and_released_at_exit(
    tmp_path: Path, images: dict[str, Path], mountcall: Path, mnt: Path
) -> None:
    with mounted_and_waiting(tmp_path, images["ext4"], mnt, mountcall) as (proc, log):
        loop = str(wait_for_audit(log)[0]["loop"])
        assert not any(str(mnt) in line for line in open("/proc/self/mounts"))
        assert os.path.exists(f"/sys/block/{loop[5:]}/loop/backing_file")
        assert proc.stdin
        proc.stdin.write("\n")
        proc.stdin.close()
        assert proc.wait(timeout=30) == 0


@pytest.mark.parametrize("victim", ["command", "supervisor"])
def test_sigkill_leaves_nothing_behind(
    tmp_path: Path, images: dict[str, Path], mountcall: Path, mnt: Path, victim: str
) -> None:
    with mounted_and_waiting(tmp_path, images["squashfs"], mnt, mountcall) as (proc, log):
        pid = wait_for_audit(log)[0]["pid"] if victim == "command" else proc.pid
        os.kill(int(pid), signal.SIGKILL)
        code = proc.wait(timeout=30)
    assert code == (128 + signal.SIGKILL if victim == "command" else -signal.SIGKILL)
    if victim == "supervisor":
        # The kernel releases the container, mount and loop device; only the empty device
        # cgroup directory needs the next `mountwarden run` or `mountwarden gc`.
        deadline = time.monotonic() + 10
        while not (gc := subprocess.run(mountwarden("gc"), capture_output=True, text=True)).stdout:
            assert time.monotonic() < deadline, "gc found nothing to remove"
            time.sleep(0.05)
        assert "removed device cgroup" in gc.stdout
    # no_leaks checks that the loop device, the mount, the helper and the container are gone


def wait_for_audit(log: Path, timeout: float = 10) -> list[dict[str, Any]]:
    """The audit line is written right after the answer, so the container may be ahead of it."""
    deadline = time.monotonic() + timeout
    while not (records := read_audit(log)) and time.monotonic() < deadline:
        time.sleep(0.01)
    return records


def test_exit_status_and_signal_forwarding(tmp_path: Path) -> None:
    assert run_container(tmp_path, ["/bin/sh", "-c", "exit 7"]).returncode == 7
    cmd = mountwarden(
        "run", "--", "/bin/sh", "-c", "trap 'echo got-term; exit 42' TERM; echo up; while :; do sleep 0.05; done"
    )
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout and proc.stdout.readline().strip() == "up"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 42
        assert proc.stdout.read().strip() == "got-term"


def test_missing_command_is_127(tmp_path: Path) -> None:
    run = run_container(tmp_path, ["/nonexistent/program"])
    assert run.returncode == 127 and "cannot run" in run.stderr


def test_invalid_policy_is_rejected_with_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nrules:\n  - name: x\n    action: mount\n")
    marker = tmp_path / "started"
    run = run_container(tmp_path, ["/bin/touch", str(marker)], policy=bad)
    assert run.returncode == 2
    assert f"{bad}:4:" in run.stderr and "kernel" in run.stderr
    assert not marker.exists()


def test_unreadable_image_is_refused_even_when_policy_allows(
    tmp_path: Path, images: dict[str, Path], mountcall: Path, mnt: Path, workdir: Path
) -> None:
    secret = workdir / "img" / "secret.ext4"
    secret.write_bytes(images["ext4"].read_bytes())
    secret.chmod(0o600)
    try:
        run = run_container(
            tmp_path, [str(mountcall), "mount", str(secret), str(mnt), "ext4", "ro"], policy=allow_policy(tmp_path)
        )
    finally:
        secret.unlink()
    assert run.stdout.strip() == "EACCES"
    assert "may not read" in run.decisions("mount")[0]["error"]


def test_read_write_needs_write_access(tmp_path: Path, images: dict[str, Path], mountcall: Path, mnt: Path) -> None:
    run = run_container(
        tmp_path, [str(mountcall), "mount", str(images["ext4"]), str(mnt), "ext4", "0"], policy=allow_policy(tmp_path)
    )
    assert run.stdout.strip() == "EACCES"  # 0644 root-owned: readable, not writable, by the container
    assert "may not write" in run.decisions("mount")[0]["error"]


def test_wrong_fstype_and_non_image_sources(
    tmp_path: Path, images: dict[str, Path], mountcall: Path, mnt: Path
) -> None:
    sq, ext4 = images["squashfs"], images["ext4"]
    cmd = calls(
        mountcall,
        f"mount {sq} {mnt} ext4 ro",
        f"mount /etc/hostname {mnt} auto ro",
        f"mount /dev/null {mnt} ext4 ro",
        f"mount {ext4} /etc/hostname ext4 ro",
        f"mount /nonexistent {mnt} ext4 ro",
    )
    run = run_container(tmp_path, cmd, policy=allow_policy(tmp_path))
    assert run.stdout.split() == ["EINVAL", "ENODEV", "ENOTBLK", "ENOTDIR", "ENOENT"]  # no filesystem is "auto"
    assert "not ext4" in run.decisions("mount")[0]["error"]


def test_dangerous_filesystem_options_are_refused(
    tmp_path: Path, images: dict[str, Path], mountcall: Path, mnt: Path
) -> None:
    ext4 = images["ext4"]
    cmd = calls(
        mountcall, f"mount {ext4} {mnt} ext4 ro errors=panic", f"mount {ext4} {mnt} ext4 ro journal_path=/dev/vda"
    )
    run = run_container(tmp_path, cmd, policy=allow_policy(tmp_path))
    assert run.stdout.split() == ["EPERM", "EPERM"]


def test_bad_pointers_and_unterminated_strings(tmp_path: Path, mountcall: Path) -> None:
    run = run_container(tmp_path, calls(mountcall, "badptr", "unterminated"), policy=allow_policy(tmp_path))
    first, second = run.stdout.split()
    assert first == "EFAULT" and second in ("ENAMETOOLONG", "EFAULT")
    assert [d["result"] for d in run.decisions("mount")] == [first, second]


def test_new_mount_api_is_enosys_and_userns_filesystems_stay_native(tmp_path: Path, mountcall: Path, mnt: Path) -> None:
    cmd = calls(mountcall, "fsopen ext4", "fsopen tmpfs", f"mount none {mnt} tmpfs 0", f"umount {mnt}")
    run = run_container(tmp_path, cmd, policy=write_policy(tmp_path / "p.yaml", []))
    assert run.stdout.split() == ["ENOSYS", "ENOSYS", "OK", "OK"]
    mount, umount = run.decisions("mount")[0], run.decisions("umount2")[0]
    assert mount["result"] == "CONTINUE" and mount["action"] == "kernel-native"
    assert umount["result"] == "CONTINUE"


def test_i386_abi_is_intercepted_too(tmp_path: Path, images: dict[str, Path], mountcall: Path, mnt: Path) -> None:
    cmd = calls(mountcall, f"mount32 {images['erofs']} {mnt} erofs ro", f"open {mnt}/pub.txt r")
    run = run_container(tmp_path, cmd, policy=allow_policy(tmp_path))
    assert run.stdout.split() == ["OK", "OK"]  # natively an unprivileged user namespace cannot mount erofs
    assert run.decisions("mount")[0]["abi"] == "i386"
    denied = run_container(tmp_path, cmd[:7], policy=write_policy(tmp_path / "p.yaml", []))
    assert denied.stdout.split() == ["EPERM"] and denied.decisions("mount")[0]["abi"] == "i386"


def test_non_root_container_user_cannot_mount(
    tmp_path: Path, images: dict[str, Path], mountcall: Path, mnt: Path
) -> None:
    cmd = [str(mountcall), "exec-as", "1000", str(mountcall), "mount", str(images["ext4"]), str(mnt), "ext4", "ro"]
    run = run_container(tmp_path, cmd, policy=allow_policy(tmp_path))
    assert run.stdout.strip() == "EPERM"
    assert "CAP_SYS_ADMIN" in run.decisions("mount")[0]["error"]


def test_loop_ioctls_are_intercepted_and_refused_with_enotty(tmp_path: Path, mountcall: Path) -> None:
    """Natively these would also be ENOTTY on /dev/null: the audit lines prove interception,
    including for a request with junk in the high 32 bits, which the kernel ignores."""
    # the last is TCGETS: not a loop request, it never reaches the supervisor
    cmd = calls(mountcall, "ioctl /dev/null 0x4C82", "ioctl /dev/null 0x100004C00", "ioctl /dev/null 0x5401")
    run = run_container(tmp_path, cmd)
    assert run.stdout.split() == ["ENOTTY", "ENOTTY", "ENOTTY"]
    assert [d["request"] for d in run.decisions("ioctl")] == ["0x4c82", "0x4c00"]
    assert all(d["result"] == "ENOTTY" for d in run.decisions("ioctl"))
