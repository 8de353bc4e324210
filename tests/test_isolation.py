"""What a container can see and reach: its own processes only, its own terminal, its own
network, a clean environment, audit records it cannot forge, and a rootfs whose symlinks the
host-root staging does not follow. Each test is the attack a container's root would try."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import struct
import subprocess
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO, calls, descendants, mountwarden, run_container


def _numeric(listing: str) -> list[int]:
    return sorted(int(word) for word in listing.split() if word.isdigit())


@pytest.mark.parametrize("with_rootfs", [False, True], ids=["host-tree", "rootfs"])
def test_proc_shows_only_the_container_also_after_unmounting_it(
    tmp_path: Path, mountcall: Path, rootfs: Path, with_rootfs: bool
) -> None:
    mc = "/bin/mountcall" if with_rootfs else str(mountcall)
    script = (
        f"{mc} umount /proc detach; {mc} umount /proc; echo ---; ls /proc; echo ---; "
        "cat /proc/1/comm; ls /proc/$$/root/proc | grep -c '^[0-9]'"
    )
    run = run_container(tmp_path, ["/bin/sh", "-c", script], rootfs=rootfs if with_rootfs else None)
    assert run.returncode == 0, run.stderr
    umounts, listing, rest = run.stdout.split("---\n")
    assert umounts.split() == ["EINVAL", "EINVAL"]  # locked: the host's procfs stays covered
    pids = _numeric(listing)
    assert pids[0] == 1 and len(pids) <= 4, listing  # init, sh, ls: nothing of the host
    assert os.getpid() not in pids
    comm, count = rest.split()
    assert comm == "mw-init" and int(count) <= 5


def test_nested_pid_namespace_gets_its_own_proc(tmp_path: Path) -> None:
    run = run_container(tmp_path, ["unshare", "-pf", "--mount-proc", "/bin/sh", "-c", "echo $$; ls /proc"])
    assert run.returncode == 0, run.stderr
    assert run.stdout.split()[0] == "1" and _numeric(run.stdout)[:1] == [1]


@contextlib.contextmanager
def waiting_container(tmp_path: Path, mountcall: Path) -> Iterator[subprocess.Popen[str]]:
    """A container sitting in `mountcall wait` until a line arrives on its stdin."""
    cmd = mountwarden("run", "--audit-log", str(tmp_path / "b.log"), "--", *calls(mountcall, "wait"))
    with subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO) as proc:
        assert proc.stdout and proc.stdin
        assert proc.stdout.readline().strip() == "READY"
        try:
            yield proc
        finally:
            proc.stdin.write("\n")
            proc.stdin.close()
            proc.wait(timeout=30)


def test_two_containers_cannot_see_signal_or_trace_each_other(tmp_path: Path, mountcall: Path) -> None:
    with waiting_container(tmp_path, mountcall) as other:
        procs = descendants(other.pid)
        names = {name for _, name in procs}
        assert {"mw-waiter", "mw-holder", "mw-init", "mountcall"} <= names  # `ps` tells them apart
        victim = next(pid for pid, name in procs if name == "mountcall")
        assert subprocess.run([str(mountcall), "kill0", str(victim)], capture_output=True).returncode == 0
        probes = [f"kill0 {victim}", f"pidfd {victim}", f"ptrace {victim}", f"open /proc/{victim}/status r"]
        run = run_container(tmp_path, calls(mountcall, *probes))
        assert run.stdout.split() == ["ESRCH", "ESRCH", "ESRCH", "ENOENT"]
        listing = run_container(tmp_path, ["/bin/sh", "-c", "cat /proc/[0-9]*/cmdline | tr '\\0' ' '"])
        assert "wait" not in listing.stdout and "mountcall" not in listing.stdout


def _on_terminal(cmd: list[str], interactive: bool) -> tuple[int, str, int]:
    """Run `cmd` as an operator would at a terminal; return its exit status, what the terminal
    showed, and how many bytes wait in the terminal's input queue for the operator's shell."""
    master, slave = os.openpty()
    try:
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 101, 0, 0))
        before = termios.tcgetattr(slave)
        proc = subprocess.run(
            cmd, stdin=slave if interactive else subprocess.DEVNULL, stdout=slave, stderr=slave, cwd=REPO,
            start_new_session=True, preexec_fn=lambda: fcntl.ioctl(1, termios.TIOCSCTTY, 0), timeout=60,
        )  # fmt: skip
        os.set_blocking(master, False)
        shown = b""
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(master, 65536):
                shown += chunk
        queued = int.from_bytes(fcntl.ioctl(slave, termios.FIONREAD, bytes(4)), "little")
        assert termios.tcgetattr(slave) == before  # raw mode undone
        return proc.returncode, shown.decode(errors="replace"), queued
    finally:
        os.close(master)
        os.close(slave)


@pytest.mark.parametrize("interactive", [True, False], ids=["interactive", "batch"])
def test_tiocsti_never_reaches_the_operators_terminal(tmp_path: Path, mountcall: Path, interactive: bool) -> None:
    inject = calls(mountcall, "tiocsti /dev/tty id", "tiocsti 0 id", "tiocsti 1 id", "tiocsti 2 id")
    code, shown, queued = _on_terminal(
        mountwarden("run", "--audit-log", str(tmp_path / "a.log"), "--", *inject), interactive
    )
    results = [line.strip() for line in shown.splitlines() if line.strip() in ("OK", "ENXIO", "ENOTTY", "EPERM")]
    # Interactive: the container types into its own pty. Batch: it has no terminal at all.
    assert results == (["OK"] * 4 if interactive else ["ENXIO", "ENOTTY", "ENOTTY", "ENOTTY"]), shown
    assert queued == 0 and code == (0 if interactive else 1)  # mountcall's status: the last call failed


def test_exit_status_survives_the_terminal_relay(tmp_path: Path) -> None:
    code, shown, _ = _on_terminal(
        mountwarden("run", "--audit-log", str(tmp_path / "a.log"), "--", "/bin/sh", "-c", "tty; stty size; exit 7"),
        interactive=True,
    )
    assert code == 7
    assert shown.splitlines()[:2] == ["/dev/pts/0", "33 101"]  # its own devpts; the operator's window size


def test_environment_is_clean_and_only_what_env_passes(tmp_path: Path) -> None:
    env = {**os.environ, "CI_JOB_TOKEN": "s3cret", "PASSED": "yes"}
    cmd = mountwarden(
        "run", "--audit-log", str(tmp_path / "a.log"), "--env", "PASSED", "--env", "SET=v=1", "--env", "UNSET", "--",
        "/usr/bin/env",
    )  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr
    seen = dict(line.split("=", 1) for line in proc.stdout.splitlines())
    assert seen == {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/root",
        "container": "mountwarden",
        "PASSED": "yes",
        "SET": "v=1",
    }
    bad = subprocess.run(mountwarden("run", "--env", "=x", "--", "true"), capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2 and "--env" in bad.stderr


@pytest.fixture
def host_services() -> Iterator[tuple[str, int]]:
    """An abstract unix socket and a TCP port on the host's loopback, both listening."""
    name = f"mountwarden-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX) as unix, socket.socket() as tcp:
        unix.bind("\0" + name)
        unix.listen()
        tcp.bind(("127.0.0.1", 0))
        tcp.listen()
        yield name, tcp.getsockname()[1]


@pytest.mark.parametrize("net", ["default", "host"])
def test_host_abstract_sockets_and_loopback_are_out_of_reach(
    tmp_path: Path, mountcall: Path, host_services: tuple[str, int], net: str
) -> None:
    name, port = host_services
    run = run_container(
        tmp_path,
        ["/bin/sh", "-c", f"{mountcall} connect-abstract {name}; {mountcall} connect-tcp {port}; ip -o link show lo"],
        extra=["--net", "host"] if net == "host" else [],
    )
    lines = run.stdout.splitlines()
    assert lines[:2] == (["OK", "OK"] if net == "host" else ["ECONNREFUSED", "ECONNREFUSED"]), run.stderr
    assert "LOOPBACK,UP" in lines[2]


@pytest.mark.parametrize("sub", ["proc", "dev", "sys", "tmp"])
def test_rootfs_symlinked_mount_points_are_refused(tmp_path: Path, sub: str) -> None:
    root, victim = tmp_path / "rootfs", tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("host file\n")
    for d in ("proc", "dev", "sys", "tmp"):
        (root / d).parent.mkdir(parents=True, exist_ok=True)
        if d == sub:
            (root / d).symlink_to("/" if sub == "proc" else victim)
        else:
            (root / d).mkdir()
    run = run_container(tmp_path, ["/bin/true"], rootfs=root)
    assert run.returncode == 126
    assert f"/{sub} is a symbolic link" in run.stderr
    assert sorted(p.name for p in victim.iterdir()) == ["keep"]


def test_audit_records_never_share_the_containers_streams(tmp_path: Path) -> None:
    forged = json.dumps({"event": "mount-decision", "action": "kernel", "result": "OK", "forged": True})
    script = ["/bin/sh", "-c", f"echo '{forged}' >&2; umount /nonexistent 2>/dev/null; true"]
    name = f"isolation-{os.getpid()}"
    log = Path("/run/mountwarden/audit") / f"{name}.log"
    try:
        proc = subprocess.run(
            mountwarden("run", "--name", name, "--", *script), capture_output=True, text=True, cwd=REPO
        )
        assert proc.stderr.startswith(f"mountwarden run: audit records go to {log}\n")
        records = [json.loads(line) for line in log.read_text().splitlines()]
        assert records and not any(r.get("forged") for r in records)
        assert oct(log.stat().st_mode & 0o777) == "0o600"
    finally:
        log.unlink(missing_ok=True)
    to_stderr = subprocess.run(
        mountwarden("run", "--audit-log", "-", "--", *script), capture_output=True, text=True, cwd=REPO
    )
    assert "forged" in to_stderr.stdout  # the container's stderr went where its stdout goes
    records = [json.loads(line) for line in to_stderr.stderr.splitlines()]
    assert records and not any(r.get("forged") for r in records)


def test_operators_ctrl_c_still_stops_a_batch_container(tmp_path: Path) -> None:
    """The container is in a session of its own, so the terminal's SIGINT reaches only `run`."""
    master, slave = os.openpty()
    cmd = mountwarden("run", "--audit-log", str(tmp_path / "a.log"), "--", "/bin/sh", "-c", "echo READY; exec sleep 30")
    try:
        with subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, cwd=REPO,
            start_new_session=True, preexec_fn=lambda: fcntl.ioctl(1, termios.TIOCSCTTY, 0),
        ) as proc:  # fmt: skip
            shown = b""
            while b"READY" not in shown:
                shown += os.read(master, 4096)
            os.write(master, termios.tcgetattr(slave)[6][termios.VINTR])
            assert proc.wait(timeout=20) == 130
    finally:
        os.close(master)
        os.close(slave)
