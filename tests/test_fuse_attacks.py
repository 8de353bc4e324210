"""The FUSE daemon against a hostile container (issue 9, item 1): the container can neither pick
the daemon's program, interpreter or libraries, nor use a daemon it takes over (ptrace, setns
into its namespaces) to clear mount flags, reach host devices or leave its own namespaces."""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import calls, descendants, mountwarden, read_audit, run_container, write_policy

FUSE2FS = "/usr/bin/fuse2fs"
NR = {"mount": 165, "umount2": 166, "mknod": 133, "open": 2, "setns": 308, "pidfd_open": 434, "mount_setattr": 442}
MS_REMOUNT_BIND = 0x20 | 0x1000
CAP_SYS_ADMIN = 1 << 21


def _policy(tmp_path: Path) -> Path:
    return write_policy(tmp_path / "fuse.yaml", [{"name": "fuse", "match": {"source": "/**"}, "action": "fuse"}])


def _fuse_mount(run_output: list[dict[str, object]]) -> dict[str, object]:
    return next(
        d for d in run_output if d.get("event") == "mount-decision" and d.get("daemon") and d.get("syscall") == "mount"
    )


@pytest.fixture
def planted(workdir: Path) -> Iterator[tuple[Path, Path]]:
    """A fake fuse2fs that leaves a mark when run, fake libraries, and a directory for the mark."""
    plant = workdir / "plant"
    marks = workdir / "marks"
    plant.mkdir(exist_ok=True)
    marks.mkdir(exist_ok=True)
    marks.chmod(0o777)
    fake = plant / "fuse2fs"
    fake.write_text(f"#!/bin/busybox sh\necho planted-program-ran > {marks}/ran\n")
    fake.chmod(0o755)
    (plant / "lib").write_text("not a library\n")
    (plant / "lib").chmod(0o644)
    yield plant, marks
    for path in marks.iterdir():
        path.unlink()


def test_planted_program_interpreter_and_libraries_are_not_run(
    tmp_path: Path, images: dict[str, Path], mnt: Path, mountcall: Path, planted: tuple[Path, Path]
) -> None:
    """The container binds its own fuse2fs, ELF interpreter and libraries over the host paths the
    supervisor names: the daemon is still the host's, and the planted program never runs."""
    plant, marks = planted
    libs = [os.path.realpath(p) for p in ("/lib64/ld-linux-x86-64.so.2", "/lib/x86_64-linux-gnu/libfuse.so.2",
                                          "/lib/x86_64-linux-gnu/libext2fs.so.2")]  # fmt: skip
    steps = [f"mount {plant}/fuse2fs {FUSE2FS} - bind"] + [f"mount {plant}/lib {lib} - bind" for lib in libs]
    steps.append(f"mount {images['ext4']} {mnt} ext4 ro")
    # Only static programs run once the interpreter is replaced: mountcall and busybox.
    script = f"{shlex.join(calls(mountcall, *steps))}; /bin/busybox cat {mnt}/pub.txt; /bin/busybox umount {mnt}"
    run = run_container(tmp_path, ["/bin/sh", "-c", script], policy=_policy(tmp_path))
    assert run.stdout.splitlines() == ["OK"] * (len(libs) + 2) + ["public"], run.stdout + run.stderr
    assert not (marks / "ran").exists()
    assert _fuse_mount(run.audit)["result"] == "OK"


@pytest.fixture
def daemon_container(
    tmp_path: Path, images: dict[str, Path], mnt: Path, mountcall: Path
) -> Iterator[tuple[subprocess.Popen[str], int, Path]]:
    """A container with a live fuse2fs mount, waiting for commands on stdin (one shell line each)."""
    log = tmp_path / "audit.log"
    script = f'mount -o loop,ro {images["ext4"]} {mnt} && echo up && while read line; do eval "$line"; done'
    env = {**os.environ, "MOUNTWARDEN_TEST_SECRET": "hunter2"}
    cmd = mountwarden("run", "--audit-log", str(log), "--policy", str(_policy(tmp_path)), "--", "/bin/sh", "-c", script)
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout and proc.stdin
    try:
        assert proc.stdout.readline().strip() == "up"
        deadline = time.monotonic() + 10
        while not (found := [r for r in read_audit(log) if r.get("daemon_pid")]):
            assert time.monotonic() < deadline, "no audit line names the daemon"
            time.sleep(0.01)
        yield proc, int(str(found[0]["daemon_pid"])), log
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)


def _ask(proc: subprocess.Popen[str], line: str, answers: int = 1) -> list[str]:
    assert proc.stdin and proc.stdout
    proc.stdin.write(line + " 2>&1\n")
    proc.stdin.flush()
    return [proc.stdout.readline().strip() for _ in range(answers)]


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.split(":\t", 1) for line in f.read().splitlines() if ":\t" in line)


def _jail_mount(pid: int, point: str) -> str:
    """The per-mount options of `point` in the daemon's own mount namespace."""
    with open(f"/proc/{pid}/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == point:
                return fields[5]
    raise AssertionError(f"{point} is not a mount point in the daemon's namespace")


def test_daemon_is_the_hosts_program_with_a_clean_environment_and_no_privilege(
    daemon_container: tuple[subprocess.Popen[str], int, Path],
) -> None:
    proc, pid, _ = daemon_container
    host = os.stat(FUSE2FS)
    exe = os.stat(f"/proc/{pid}/exe")
    assert (exe.st_dev, exe.st_ino) == (host.st_dev, host.st_ino)
    with open(f"/proc/{pid}/maps") as f:
        mapped = {(fields[5], fields[3], int(fields[4])) for fields in map(str.split, f) if len(fields) > 5}
    libs = {entry for entry in mapped if entry[0].startswith("/usr/")}
    assert any("ld-linux" in path for path, _, _ in libs) and any("libfuse" in path for path, _, _ in libs)
    for path, dev, ino in libs:  # every mapped file is the host's own file at that path
        host_file = os.stat(path)
        assert (dev, ino) == (f"{os.major(host_file.st_dev):02x}:{os.minor(host_file.st_dev):02x}", host_file.st_ino)
    with open(f"/proc/{pid}/environ", "rb") as f:
        env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if item)
    assert set(env) == {b"PATH", b"LANG"}  # not the supervisor's MOUNTWARDEN_TEST_SECRET
    status = _status(pid)
    assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2"
    for field in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[field], 16) == CAP_SYS_ADMIN, (field, status[field])
    # Orphans go to the reaper of their parent's pid namespace: the daemon's parent is the host's
    # launcher, so compare with the container's init itself.
    init = next(p for p, name in descendants(proc.pid) if name == "mw-init")
    assert os.readlink(f"/proc/{pid}/ns/user") == os.readlink(f"/proc/{init}/ns/user")
    for ns in ("pid", "net", "uts", "ipc"):  # the container's network too: no host sockets
        assert os.readlink(f"/proc/{pid}/ns/{ns}") == os.readlink(f"/proc/{init}/ns/{ns}"), ns
    assert os.getsid(pid) == pid  # a session of its own: no terminal of the operator's
    assert os.readlink(f"/proc/{pid}/ns/mnt") not in (
        os.readlink(f"/proc/{init}/ns/mnt"),
        os.readlink("/proc/self/ns/mnt"),
    )
    assert sorted(os.listdir(f"/proc/{pid}/root")) == ["bin", "dev", "image", "lib", "lib64", "mnt", "sbin", "usr"]
    for point in ("/", "/usr"):  # /image is the pool's device node here (mount -o loop bound a slot)
        assert {"ro", "nosuid"} <= set(_jail_mount(pid, point).split(",")), point


def test_a_ptraced_daemon_cannot_clear_flags_leave_its_jail_or_reach_host_devices(
    daemon_container: tuple[subprocess.Popen[str], int, Path], mountcall: Path, mnt: Path
) -> None:
    """The container's root attaches to the genuine daemon and makes it run system calls."""
    proc, pid, log = daemon_container
    ns_pid = _ask(proc, "pidof fuse2fs")[0]
    inject = f"{mountcall} inject {ns_pid}"
    # Clear ro,nosuid,nodev on the jail's /usr: the call reaches the supervisor, and the mount is locked.
    assert _ask(proc, f"{inject} {NR['mount']} 0 s:/usr 0 {MS_REMOUNT_BIND} 0")[0] != "OK 0"
    assert _ask(proc, f"{inject} {NR['mount_setattr']} -100 s:/usr 0 0 32")[0] == "ENOSYS"
    # Into the container's mount namespace (where the supervisor's mounts are): no CAP_SYS_CHROOT.
    answer = _ask(proc, f"{inject} {NR['pidfd_open']} 1 0")[0]
    assert answer.startswith("OK "), answer
    assert _ask(proc, f"{inject} {NR['setns']} {answer.split()[1]} {0x20000}")[0] == "EPERM"
    # A host loop device: no node for it, and no making one.
    assert _ask(proc, f"{inject} {NR['open']} s:/dev/loop-control 2")[0] == "ENOENT"
    assert _ask(proc, f"{inject} {NR['mknod']} s:/dev/loop7 {0o60600} {7 << 8 | 7}")[0] in ("EPERM", "EROFS")
    # Unmount the locked tree to reveal what is below: refused.
    assert _ask(proc, f"{inject} {NR['umount2']} s:/usr 2")[0] == "EINVAL"
    assert {"ro", "nosuid", "nodev"} <= set(_jail_mount(pid, "/usr").split(","))
    # The daemon still serves its mount after all this.
    assert _ask(proc, f"cat {mnt}/pub.txt")[0] == "public"
    audit = [r for r in read_audit(log) if r.get("caller") == "fuse-daemon" and r.get("syscall") == "mount"]
    assert any(r.get("target") == "/usr" and r["result"] != "OK" for r in audit), audit


def test_setns_into_the_daemons_namespace_gives_nothing(
    daemon_container: tuple[subprocess.Popen[str], int, Path], mountcall: Path
) -> None:
    """The container's root joins the daemon's mount namespace and attacks the jail's mounts."""
    proc, pid, _ = daemon_container
    ns_pid = _ask(proc, "pidof fuse2fs")[0]
    steps = [f"enter-mnt {ns_pid}", "mount - /usr - remount,bind", "setattr-clear /usr", "umount /usr detach",
             "open /dev/loop-control rw", "mount - / - remount,bind"]  # fmt: skip
    answers = _ask(proc, shlex.join(calls(mountcall, *steps)), len(steps))
    assert answers[0] == "OK"
    assert "OK" not in answers[1:], answers
    assert {"ro", "nosuid", "nodev"} <= set(_jail_mount(pid, "/usr").split(","))
    assert {"ro", "nosuid", "noexec"} <= set(_jail_mount(pid, "/").split(","))
