"""Policy features on real containers: idmapped mounts, selectors, explain, learn mode and live
reload. (The fuse action has its own tests in test_fuse.py.)"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    REPO,
    allow_policy,
    calls,
    mountwarden,
    read_audit,
    run_container,
    write_policy,
)


@pytest.fixture
def rw_image(workdir: Path, images: dict[str, Path]) -> Iterator[Path]:
    """A writable ext4 image that belongs to the container's root (host uid 100000)."""
    image = workdir / "img" / "rw.ext4"
    shutil.copy(images["ext4"], image)
    shutil.chown(image, 100000, 100000)
    yield image
    image.unlink()


def _owner_in_image(image: Path, path: str) -> int:
    out = subprocess.run(["debugfs", "-R", f"stat {path}", str(image)], capture_output=True, text=True).stdout
    return int(out.split("User:")[1].split()[0])


@pytest.mark.parametrize("idmap", [True, False])
def test_kernel_mounts_are_idmapped_by_default(tmp_path: Path, rw_image: Path, mnt: Path, idmap: bool) -> None:
    rule: dict[str, Any] = {"name": "rw", "match": {"source": "/**"}, "action": "kernel"}
    if not idmap:
        rule["idmap"] = False
    policy = write_policy(tmp_path / "p.yaml", [rule])
    script = [
        "/bin/sh",
        "-c",
        f"mount -o loop {rw_image} {mnt} && stat -c %u {mnt}/pub.txt; "
        f"echo hi > {mnt}/created 2>/dev/null && stat -c %u {mnt}/created || echo denied; umount {mnt}",
    ]
    run = run_container(tmp_path, script, policy=policy)
    if idmap:
        # image root (on-disk uid 0) is the container's root, and what it writes is owned by 0 in the image
        assert run.stdout.split() == ["0", "0"], run.stderr
        assert _owner_in_image(rw_image, "/created") == 0
        assert run.decisions("mount")[0]["idmapped"] is True
    else:
        assert run.stdout.split() == ["65534", "denied"], run.stderr


def test_rules_select_containers_by_name(tmp_path: Path, images: dict[str, Path], mountcall: Path, mnt: Path) -> None:
    policy = write_policy(
        tmp_path / "p.yaml",
        [{"name": "ci-only", "containers": {"name": "ci-*"}, "match": {"source": "/**"}, "action": "kernel"}],
    )
    cmd = calls(mountcall, f"mount {images['ext4']} {mnt} ext4 ro", f"umount {mnt}")
    allowed = run_container(tmp_path, cmd, policy=policy, extra=["--name", "ci-42"])
    denied = run_container(tmp_path, cmd[:7], policy=policy, extra=["--name", "web"])
    assert allowed.stdout.split() == ["OK", "OK"] and denied.stdout.split() == ["EPERM"]


def test_explain_names_the_deciding_rule_and_why_others_did_not_match(tmp_path: Path, images: dict[str, Path]) -> None:
    image = images["ext4"]
    policy = write_policy(
        tmp_path / "p.yaml",
        [
            {"name": "squash-only", "match": {"fstype": "squashfs"}, "action": "kernel"},
            {"name": "elsewhere", "match": {"source": "/nowhere/*"}, "action": "kernel"},
            {"name": "these", "match": {"source": f"{image.parent}/*"}, "action": "kernel", "options": ["ro"]},
        ],
    )
    out = subprocess.run(
        mountwarden("policy", "explain", "--policy", str(policy), "--", "mount", "-o", "ro", str(image), "/mnt"),
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("rule 'squash-only': no match") and "ext4" in lines[0]
    assert lines[1].startswith("rule 'elsewhere': no match") and "/nowhere/*" in lines[1]
    assert lines[2].startswith("rule 'these': matches")
    assert lines[3].startswith("decision: kernel by rule 'these'") and "ro" in lines[3]
    denied = subprocess.run(
        mountwarden("policy", "explain", "--policy", str(policy), "--", "mount", "-t", "erofs", "/no/such", "/mnt"),
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert denied.returncode == 1 and denied.stdout.splitlines()[-1].startswith("decision: deny")


def test_learn_mode_serves_safely_and_writes_a_policy_that_allows_the_workload(
    tmp_path: Path, images: dict[str, Path], mountcall: Path, mnt: Path
) -> None:
    empty = write_policy(tmp_path / "empty.yaml", [])
    learned = tmp_path / "learned.yaml"
    workload = calls(
        mountcall,
        f"mount {images['ext4']} {mnt} ext4 ro",
        f"umount {mnt}",
        f"mount {images['squashfs']} {mnt} squashfs ro",
        f"umount {mnt}",
    )
    run = run_container(tmp_path, workload, policy=empty, extra=["--learn", str(learned)])
    assert run.stdout.split() == ["OK"] * 4, run.stderr
    mounts = run.decisions("mount")
    assert [m["action"] for m in mounts] == ["would-deny", "would-deny"]
    assert all("noexec" in m["options"] and m["options"].startswith("ro") for m in mounts)
    check = subprocess.run(mountwarden("policy", "check", str(learned)), capture_output=True, text=True, cwd=REPO)
    assert check.returncode == 0, check.stdout + check.stderr
    again = run_container(tmp_path, workload, policy=learned)
    assert again.stdout.split() == ["OK"] * 4
    assert all(m["action"] == "kernel" for m in again.decisions("mount"))


def test_sighup_reloads_the_policy_and_keeps_the_old_one_if_broken(
    tmp_path: Path, images: dict[str, Path], mountcall: Path, mnt: Path
) -> None:
    policy = write_policy(tmp_path / "live.yaml", [])
    log = tmp_path / "audit.log"
    ext4 = images["ext4"]
    workload = calls(
        mountcall, f"mount {ext4} {mnt} ext4 ro", "wait", f"mount {ext4} {mnt} ext4 ro", f"umount {mnt}", "wait",
        f"mount {ext4} {mnt} ext4 ro", f"umount {mnt}",
    )  # fmt: skip
    cmd = mountwarden("run", "--audit-log", str(log), "--policy", str(policy), "--", *workload)
    with subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout and proc.stdin
        assert [proc.stdout.readline().strip() for _ in range(2)] == ["EPERM", "READY"]
        allow_policy(tmp_path).replace(policy)
        proc.send_signal(signal.SIGHUP)
        _wait_for_event(log, "policy-reloaded")
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert [proc.stdout.readline().strip() for _ in range(4)] == ["OK", "OK", "OK", "READY"]
        policy.write_text("version: 1\nrules:\n  - name: broken\n    action: mount\n")
        proc.send_signal(signal.SIGHUP)
        failed = _wait_for_event(log, "policy-reload-failed")
        assert "live.yaml:4:" in failed["error"]
        proc.stdin.write("\n")
        proc.stdin.close()
        assert [line.strip() for line in proc.stdout] == ["OK", "OK", "OK"]  # the previous policy still rules
        assert proc.wait(timeout=30) == 1  # the first mount was refused


def _wait_for_event(log: Path, event: str, timeout: float = 10) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for record in read_audit(log):
            if record.get("event") == event:
                return record
        time.sleep(0.02)
    raise AssertionError(f"no {event} in the audit log")
