"""The FUSE handoff with the real daemons (fuse2fs, squashfuse): same bytes as the kernel path,
unprivileged daemons that end with their mount or container, clear failures."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, Run, build_image, make_tree, mountwarden, read_audit, run_container, write_policy

TYPES = ("ext4", "squashfs")


@pytest.fixture(scope="session")
def rich_images(workdir: Path, images: dict[str, Path]) -> dict[str, Path]:
    """Images with nested directories, a large random file and many small ones."""
    src = make_tree(workdir / "rich", {f"d{i}/f{j}.txt": f"{i}-{j}\n" * (i + j) for i in range(5) for j in range(20)})
    (src / "big.bin").write_bytes(os.urandom(3 << 20))
    return {t: build_image(t, src, workdir / "img" / f"rich.{t}", size="16M") for t in TYPES}


def _policy(tmp_path: Path, action: str) -> Path:
    return write_policy(tmp_path / f"{action}.yaml", [{"name": action, "match": {"source": "/**"}, "action": action}])


def _container_mount(run: Run) -> dict[str, Any]:
    """The container's own mount decision (the daemon's FUSE mount call has an audit line too)."""
    return next(d for d in run.decisions("mount") if d.get("caller") != "fuse-daemon")


def _digests(tmp_path: Path, image: Path, mnt: Path, action: str) -> list[str]:
    script = (
        f"mount -o loop,ro {image} {mnt} && cd {mnt} && find . -type f | sort | xargs sha256sum; cd /; umount {mnt}"
    )
    run = run_container(tmp_path, ["/bin/sh", "-c", script], policy=_policy(tmp_path, action))
    assert run.returncode == 0, run.stderr
    mount = _container_mount(run)
    assert mount["action"] == action and mount["result"] == "OK"
    return run.stdout.splitlines()


@pytest.mark.parametrize("fstype", TYPES)
def test_fuse_serves_the_same_bytes_as_the_kernel(
    tmp_path: Path, rich_images: dict[str, Path], mnt: Path, fstype: str
) -> None:
    kernel = _digests(tmp_path, rich_images[fstype], mnt, "kernel")
    through_fuse = _digests(tmp_path, rich_images[fstype], mnt, "fuse")
    assert len(kernel) == 101 and through_fuse == kernel


def test_daemon_runs_unprivileged_in_the_container_and_mount_is_read_only(
    tmp_path: Path, images: dict[str, Path], mnt: Path
) -> None:
    script = (
        f"mount -o loop,ro {images['ext4']} {mnt}; "
        f'awk \'$5=="{mnt}" {{ for (i = 7; $i != "-"; i++); print $6, $(i+1) }}\' /proc/self/mountinfo; '
        f"echo x > {mnt}/pub.txt 2>/dev/null || echo write-refused; "
        f"ps -o user=,comm= -C fuse2fs; umount {mnt}"
    )
    run = run_container(tmp_path, ["/bin/sh", "-c", script], policy=_policy(tmp_path, "fuse"))
    lines = run.stdout.splitlines()
    options, fstype = lines[0].split()
    assert fstype == "fuse.ext4" and {"nosuid", "nodev"} <= set(options.split(","))
    assert lines[1] == "write-refused"
    assert lines[2].split() == ["root", "fuse2fs"]  # root of the container: host uid 100000
    daemon = _container_mount(run)["daemon_pid"]
    assert not os.path.exists(f"/proc/{daemon}")


def test_umount_and_container_exit_stop_the_daemon(tmp_path: Path, images: dict[str, Path], mnt: Path) -> None:
    log = tmp_path / "audit.log"
    script = (
        f"mount -o loop,ro {images['squashfs']} {mnt} && echo up && read line && umount {mnt} && echo down && read line"
    )
    with _fuse_container(tmp_path, log, script) as proc:
        assert proc.stdout and proc.stdin
        assert proc.stdout.readline().strip() == "up"
        daemon = _daemon_pid(log)
        assert os.path.exists(f"/proc/{daemon}")
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "down"
        _gone(daemon)
        proc.stdin.write("\n")
        proc.stdin.close()
        assert proc.wait(timeout=30) == 0
    # a daemon whose container just exits goes with it (no_leaks checks every process)
    run = run_container(
        tmp_path, ["/bin/sh", "-c", f"mount -o loop,ro {images['ext4']} {mnt}"], policy=_policy(tmp_path, "fuse")
    )
    assert run.returncode == 0 and _container_mount(run)["daemon"] == "fuse2fs"


def _fuse_container(tmp_path: Path, log: Path, script: str) -> subprocess.Popen[str]:
    """A container running `script` under a policy that sends every image to FUSE."""
    policy = _policy(tmp_path, "fuse")
    cmd = mountwarden("run", "--audit-log", str(log), "--policy", str(policy), "--", "/bin/sh", "-c", script)
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def _daemon_pid(log: Path, timeout: float = 10) -> int:
    """From the audit line, which is written just after the container got its answer."""
    deadline = time.monotonic() + timeout
    while not (pids := [r["daemon_pid"] for r in read_audit(log) if r.get("daemon_pid")]):
        assert time.monotonic() < deadline, "no audit line names the daemon"
        time.sleep(0.01)
    return int(pids[0])


def _gone(pid: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}") and "Z" not in _state(pid):
        assert time.monotonic() < deadline, f"daemon {pid} still runs"
        time.sleep(0.02)


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


@pytest.mark.parametrize("fstype", TYPES)
def test_corrupted_image_fails_with_the_daemons_reason(
    tmp_path: Path, images: dict[str, Path], workdir: Path, mnt: Path, fstype: str
) -> None:
    bad = workdir / "img" / f"corrupt.{fstype}"
    shutil.copy(images[fstype], bad)
    with open(bad, "r+b") as f:
        if fstype == "ext4":
            f.seek(1024 + 44)
            f.write(b"\x12\x34\x56\x78")  # s_mtime: still an ext4 superblock, but its checksum fails
        else:
            f.seek(64)
            f.write(b"\xff" * 16)  # inode and directory table offsets point past the end
    try:
        started = time.monotonic()
        run = run_container(
            tmp_path, ["/bin/sh", "-c", f"mount -o loop,ro {bad} {mnt}; echo rc=$?"], policy=_policy(tmp_path, "fuse")
        )
    finally:
        bad.unlink()
    assert time.monotonic() - started < 30
    assert run.stdout.strip() == "rc=32"
    mount = _container_mount(run)
    assert mount["result"] in ("EINVAL", "ETIMEDOUT") and "refused the image" in mount["error"], mount


def test_a_killed_daemon_makes_its_mount_fail_with_enotconn(tmp_path: Path, images: dict[str, Path], mnt: Path) -> None:
    log = tmp_path / "audit.log"
    script = (
        f"mount -o loop,ro {images['ext4']} {mnt} && cat {mnt}/pub.txt && read line; "
        f"cat {mnt}/pub.txt 2>&1; umount {mnt}; echo unmounted=$?"
    )
    with _fuse_container(tmp_path, log, script) as proc:
        assert proc.stdout and proc.stdin
        assert proc.stdout.readline().strip() == "public"
        daemon = _daemon_pid(log)
        os.kill(daemon, signal.SIGKILL)
        _gone(daemon)
        proc.stdin.write("\n")
        proc.stdin.close()
        rest = proc.stdout.read()
        assert proc.wait(timeout=30) == 0
    # ENOTCONN, or ECONNABORTED for a request the dead daemon left unanswered
    assert any(e in rest for e in ("Transport endpoint is not connected", "Software caused connection abort"))
    assert "unmounted=0" in rest
    deadline = time.monotonic() + 5
    while not any(r.get("event") == "fuse-daemon-exited" for r in read_audit(log)):
        assert time.monotonic() < deadline, "the supervisor did not log the daemon's death"
        time.sleep(0.05)


def test_missing_daemon_is_a_clear_error_and_policy_check_says_so(
    tmp_path: Path, images: dict[str, Path], mnt: Path
) -> None:
    if shutil.which("erofsfuse"):
        pytest.skip("this host has erofsfuse; the missing-daemon case cannot be shown")
    policy = _policy(tmp_path, "fuse")
    run = run_container(tmp_path, ["/bin/sh", "-c", f"mount -o loop,ro {images['erofs']} {mnt}"], policy=policy)
    assert _container_mount(run)["result"] == "ENODEV"
    assert "erofsfuse" in _container_mount(run)["error"]
    check = subprocess.run(mountwarden("policy", "check", str(policy)), capture_output=True, text=True, cwd=REPO)
    assert check.returncode == 0 and "erofsfuse, which is not installed" in check.stdout


def test_fuse2fs_serves_read_write_when_policy_allows(
    tmp_path: Path, images: dict[str, Path], workdir: Path, mnt: Path
) -> None:
    image = workdir / "img" / "fuse-rw.ext4"
    shutil.copy(images["ext4"], image)
    shutil.chown(image, 100000, 100000)  # the container's root may write it
    try:
        script = f"mount -o loop {image} {mnt} && echo written > {mnt}/new.txt && cat {mnt}/new.txt; umount {mnt}"
        run = run_container(tmp_path, ["/bin/sh", "-c", script], policy=_policy(tmp_path, "fuse"))
        assert run.stdout.strip() == "written", run.stderr
        assert _container_mount(run)["options"].startswith("rw")
        dump = subprocess.run(["debugfs", "-R", "cat /new.txt", str(image)], capture_output=True, text=True)
        assert dump.stdout.strip() == "written"
    finally:
        image.unlink()
