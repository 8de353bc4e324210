"""Limits that count what is held, and mounts tracked whatever the container does with them.

Each test is the attack a container's root would try, run through `mountwarden run`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from conftest import allow_policy, loop_devices, mountwarden, read_audit, run_container, write_policy


def _sh(*lines: str) -> list[str]:
    return ["/bin/sh", "-c", "\n".join(lines)]


def _limits(tmp_path: Path, text: str) -> Path:
    policy = allow_policy(tmp_path)
    policy.write_text(policy.read_text() + f"limits: {text}\n")
    return policy


def test_cleared_devices_still_held_open_count_against_both_limits(
    tmp_path: Path, images: dict[str, Path], mountcall: Path
) -> None:
    """Bind, keep an fd on the bound device, LOOP_CLR_FD, repeat: it used to hold 12 host devices."""
    hold = [str(mountcall), "loophold", "12", str(images["ext4"])]
    run = run_container(tmp_path, hold, policy=_limits(tmp_path, "{loop_devices: 2, loop_devices_per_host_uid: 4}"))
    assert run.stdout.splitlines() == ["HELD 1", "HELD 2", "ENOSPC"], run.stderr
    denied = [d for d in run.decisions("ioctl") if d["result"] == "ENOSPC"]
    assert len(denied) == 1 and "limit of 2" in denied[0]["error"] and "cleared" in denied[0]["error"]
    assert len({d["host_device"] for d in run.decisions("ioctl") if "host_device" in d}) == 2

    run = run_container(tmp_path, hold, policy=_limits(tmp_path, "{loop_devices: 12, loop_devices_per_host_uid: 4}"))
    assert run.stdout.splitlines() == [f"HELD {i}" for i in range(1, 5)] + ["ENOSPC"], run.stderr
    denied = [d for d in run.decisions("ioctl") if d["result"] == "ENOSPC"]
    assert len(denied) == 1 and "host uid" in denied[0]["error"]


def test_cleared_devices_let_go_count_no_more(tmp_path: Path, images: dict[str, Path], mountcall: Path) -> None:
    """The ordinary cycle (bind, clear, close) is not held against the container."""
    cycle = f"losetup -f -r {images['ext4']} && losetup -d /dev/loop0 && echo ok"
    run = run_container(tmp_path, _sh(*[cycle] * 5), policy=_limits(tmp_path, "{loop_devices: 1}"))
    assert run.stdout.splitlines() == ["ok"] * 5, run.stderr


def test_partition_scanning_never_reaches_the_host(tmp_path: Path, images: dict[str, Path], mountcall: Path) -> None:
    """losetup -P: the container sees partscan set; the host device never scans its bytes."""
    image = str(images["ext4"])
    script = _sh(
        f"losetup -P -f -r {image}",
        "cat /sys/block/loop0/loop/partscan",
        "losetup -l -n -O PARTSCAN /dev/loop0",
        f"{mountcall} wait",
    )
    log = tmp_path / "audit.log"
    argv = mountwarden("run", "--audit-log", str(log), "--policy", str(allow_policy(tmp_path)), "--", *script)
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=tmp_path.parent)
    assert proc.stdout is not None and proc.stdin is not None
    try:
        seen = [proc.stdout.readline().strip() for _ in range(3)]
        assert seen == ["1", "1", "READY"]
        host = [name for name, backing in loop_devices() if backing == image]
        assert len(host) == 1
        assert Path(f"/sys/block/{host[0]}/loop/partscan").read_text().strip() == "0"
    finally:
        proc.stdin.write("\n")
        proc.stdin.close()
        proc.wait(timeout=30)
    assert proc.returncode == 0
    assert read_audit(log)


def test_bind_outlives_the_original_with_its_flags_and_its_device(
    tmp_path: Path, images: dict[str, Path], mountcall: Path, mnt: Path, workdir: Path
) -> None:
    """Bind the supervisor's mount, unmount the original: the bind keeps noexec and the slot stays held."""
    mc, bind = str(mountcall), workdir / "bind-limits"
    bind.mkdir(exist_ok=True)
    policy = allow_policy(tmp_path, options=["noexec"])
    policy.write_text(policy.read_text() + "limits: {loop_devices: 1}\n")
    script = _sh(
        f"{mc} mount {images['ext4']} {mnt} ext4 ro",
        f"{mc} mount {mnt} {bind} - bind",
        f"{mc} umount {mnt}",
        f"{mc} mount - {bind} - remount,bind",
        f"grep ' {bind} ' /proc/self/mountinfo | grep -c noexec",
        f"cat {bind}/pub.txt",
        f"losetup -f -r {images['squashfs']} 2>/dev/null; echo rc=$?",
        f"{mc} umount {bind}",
        f"losetup -f -r {images['squashfs']}; echo rc=$?",
    )
    run = run_container(tmp_path, script, policy=policy)
    assert run.stdout.splitlines() == ["OK", "OK", "OK", "OK", "1", "public", "rc=1", "OK", "rc=0"], run.stderr
    remount = [d for d in run.decisions("mount") if d.get("remount")]
    assert remount and "noexec" in remount[0]["options"] and remount[0]["rule"] == "allow-test"
    assert any(d["result"] == "ENOSPC" for d in run.decisions("ioctl"))


def test_a_mounted_device_cannot_be_repointed(
    tmp_path: Path, images: dict[str, Path], mountcall: Path, mnt: Path, workdir: Path
) -> None:
    """CHANGE_FD, a new offset, size limit or capacity under a live mount: EBUSY, audited; fine once unmounted."""
    mc = str(mountcall)
    other = workdir / "img" / "same-size.ext4"
    subprocess.run(["cp", str(images["ext4"]), str(other)], check=True)
    script = _sh(
        f"losetup -r /dev/loop0 {images['ext4']}",
        f"{mc} mount /dev/loop0 {mnt} ext4 ro",
        f"{mc} loopchangefd /dev/loop0 {other}",
        f"{mc} loopstatus /dev/loop0 4096 0",
        f"{mc} loopstatus /dev/loop0 0 1048576",
        f"{mc} loopstatus /dev/loop0 0 0",
        f"{mc} ioctl /dev/loop0 0x4C07",  # LOOP_SET_CAPACITY
        f"{mc} umount {mnt}",
        f"{mc} loopchangefd /dev/loop0 {other}",
        "losetup -d /dev/loop0",
    )
    run = run_container(tmp_path, script, policy=write_policy(tmp_path / "p.yaml", [
        {"name": "all", "match": {"source": "/**"}, "action": "kernel"}
    ]))  # fmt: skip
    assert run.stdout.splitlines() == ["OK", "EBUSY", "EBUSY", "EBUSY", "OK", "EBUSY", "OK", "OK"], run.stderr
    refused = [d for d in run.decisions("ioctl") if d["result"] == "EBUSY"]
    ops = ["LOOP_CHANGE_FD", "LOOP_SET_STATUS64", "LOOP_SET_STATUS64", "LOOP_SET_CAPACITY"]
    assert [d["op"] for d in refused] == ops
    assert all("backs a mount" in d["error"] for d in refused)


def _digest_policy(tmp_path: Path, image: Path, size_max: str | None) -> Path:
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    match: dict[str, object] = {"sha256": [digest]}
    if size_max is not None:
        match["size"] = {"max": size_max}
    return write_policy(tmp_path / "pinned.yaml", [{"name": "pinned", "match": match, "action": "kernel"}])


def test_writes_to_a_pinned_image_do_not_reach_its_mount(
    tmp_path: Path, images: dict[str, Path], mountcall: Path, mnt: Path, workdir: Path
) -> None:
    """The container rewrites the image under its digest-pinned mount; the kernel keeps reading what was hashed."""
    image = workdir / "img" / "pinned.ext4"
    shutil.copy(images["ext4"], image)
    image.chmod(0o666)
    offset = image.read_bytes().index(b"public\n")
    script = _sh(
        f"mount -o loop {image} {mnt}; echo rc=$?",
        f"cat {mnt}/pub.txt",
        f"printf PUBLIC | dd of={image} bs=1 seek={offset} conv=notrunc status=none; echo rc=$?",
        f"{mountcall} wait",
        f"cat {mnt}/pub.txt",
        f"umount {mnt}",
    )
    log = tmp_path / "audit.log"
    policy = _digest_policy(tmp_path, image, "16M")
    argv = mountwarden("run", "--audit-log", str(log), "--policy", str(policy), "--", *script)
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=tmp_path.parent)
    assert proc.stdout is not None and proc.stdin is not None
    try:
        assert [proc.stdout.readline().strip() for _ in range(4)] == ["rc=0", "public", "rc=0", "READY"]
        assert b"PUBLIC\n" in image.read_bytes()  # the write itself went through
        Path("/proc/sys/vm/drop_caches").write_text("3\n")  # the kernel must read the backing store again
        proc.stdin.write("\n")
        proc.stdin.close()
        rest = proc.stdout.read().split()
    finally:
        proc.wait(timeout=30)
    assert rest[:2] == ["OK", "public"]
    pinned = [d for d in read_audit(log) if d.get("syscall") == "mount" and d.get("rule") == "pinned"]
    assert [d["result"] for d in pinned] == ["EROFS", "OK"]  # mount(8) retries read-only by itself
    assert pinned[1]["backing"] == "sealed-copy"


@pytest.mark.parametrize("size_max", ["16M", None], ids=["rule-size-max", "policy-digest-max-size"])
def test_a_huge_sparse_image_is_refused_before_hashing(
    tmp_path: Path, images: dict[str, Path], mnt: Path, workdir: Path, size_max: str | None
) -> None:
    """64 GiB of sparse file under a digest rule capped at 16M (or at the policy's 1G default):
    refused at once, nothing hashed."""
    image = workdir / "img" / "huge.ext4"
    shutil.copy(images["ext4"], image)
    os.truncate(image, 64 << 30)
    image.chmod(0o644)
    policy = _digest_policy(tmp_path, images["ext4"], size_max)
    start = time.monotonic()
    run = run_container(tmp_path, _sh(f"mount -o loop,ro {image} {mnt}; echo rc=$?"), policy=policy)
    elapsed = time.monotonic() - start
    image.unlink()
    assert run.stdout.strip().endswith("rc=32"), run.stdout + run.stderr
    assert elapsed < 10
    refused = [d for d in run.decisions("mount") if d["result"] == "EPERM"]
    assert refused and refused[0]["sha256"].startswith("not computed")


def test_learn_mode_with_a_deleted_backing_file_still_releases_everything(
    tmp_path: Path, images: dict[str, Path], mnt: Path, workdir: Path
) -> None:
    """A mount whose backing file is gone cannot be learned: it is logged and skipped, the rest written."""
    scratch = workdir / "scratch-learn"
    scratch.mkdir(exist_ok=True)
    scratch.chmod(0o1777)
    other = workdir / "mnt-learn"
    other.mkdir(exist_ok=True)
    doomed = scratch / "doomed.ext4"
    script = _sh(
        f"cp {images['ext4']} {doomed}",
        f"exec 3< {doomed}",
        f"rm {doomed}",
        "losetup -r /dev/loop0 /proc/self/fd/3",
        "exec 3<&-",
        f"mount -r /dev/loop0 {mnt} && cat {mnt}/pub.txt",
        f"mount -o loop,ro {images['ext4']} {other} && cat {other}/pub.txt",
    )
    learned = tmp_path / "learned.yaml"
    empty = write_policy(tmp_path / "empty.yaml", [{"name": "nothing", "action": "deny"}])
    run = run_container(tmp_path, script, policy=empty, extra=["--learn", str(learned)])
    assert run.returncode == 0 and run.stdout.splitlines() == ["public", "public"], run.stderr
    skipped = [a for a in run.audit if a.get("event") == "learn-request-skipped"]
    assert len(skipped) == 1 and "deleted" in skipped[0]["reason"], skipped
    text = learned.read_text()
    assert "deleted" not in text and f"{images['ext4'].parent}/*.ext4" in text


def test_a_mount_kept_in_a_namespace_of_the_containers_own_still_counts(
    tmp_path: Path, images: dict[str, Path], mnt: Path
) -> None:
    """unshare -m copies the mount; unmounting the original frees no loop device while the copy lives."""
    squashfs = images["squashfs"]
    again = f"for i in $(seq 50); do losetup -f -r {squashfs} 2>/dev/null && break; sleep 0.1; done; echo rc=$?"
    script = _sh(
        f"mount -o loop,ro {images['ext4']} {mnt}",
        "unshare -m sleep 60 &",
        "sleep 0.5",
        f"umount {mnt}; echo umount=$?",
        f"losetup -f -r {images['squashfs']} 2>/dev/null; echo rc=$?",
        "kill $!; wait",
        again,
    )
    run = run_container(tmp_path, script, policy=_limits(tmp_path, "{loop_devices: 1}"))
    assert run.stdout.splitlines() == ["umount=0", "rc=1", "rc=0"], run.stderr
    denied = [d for d in run.decisions("ioctl") if d["result"] == "ENOSPC"]
    assert denied and "cleared but still held" in denied[0]["error"]
