"""contrib/systemd/mountwarden.service, checked and run the way systemd would run it.

PID 1 on the test machine is not systemd, so the unit is (a) checked with `systemd-analyze
verify` and (b) run by this test as systemd's service manager would: its command lines parsed
from the unit, a clean environment (systemd's default PATH, the variables it sets, nothing
inherited), the unit's user, umask and limits, its RuntimeDirectory created first,
ExecStartPre, ExecStart, ExecStartPost in order, ExecReload, then KillSignal. The hardening
settings the unit turns on are applied too, each by the kernel mechanism systemd uses for it,
and a real runc container's `mount -o loop` is served under them: a setting that is on and
that this test cannot apply fails the test, so none is on unverified. Paths under /run and
/etc are moved into the test's own directory in a copy of the unit.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import re
import resource
import secrets
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import oci
import pyseccomp as sc
import pytest
from conftest import REPO, read_audit, write_policy

from supervisor.sources import oci as oci_source

UNIT = REPO / "contrib" / "systemd" / "mountwarden.service"
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # `systemd-path search-binaries-default`
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1  # Linux 6.3; systemd uses it for MemoryDenyWriteExecute where it exists
PERSONALITY_QUERY = 0xFFFFFFFF
CAP_SYS_RESOURCE = 24
SYS_RESOURCE = bool(
    int(re.search(r"^CapEff:\s+(\w+)$", Path("/proc/self/status").read_text(), re.M)[1], 16) >> CAP_SYS_RESOURCE & 1
)

pytestmark = pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="needs systemd-analyze (package systemd)")


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> values in order, as systemd reads them (comments, `\\` continuations)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    logical = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not logical and (not line or line[0] in "#;"):
            continue
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        line, logical = logical + line, ""
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def installed_copy(tmp: Path) -> tuple[Path, dict[str, list[str]]]:
    """The unit as installed for this test: the venv's entry point, its /run and /etc in `tmp`."""
    script = Path(sys.executable).parent / "mountwarden"
    assert script.exists(), f"{script}: the package's console script is not installed in the venv"
    text = UNIT.read_text()
    text = text.replace("/usr/bin/mountwarden", str(script))
    text = text.replace("/run/mountwarden", str(tmp / "run" / "mountwarden"))
    text = text.replace("/etc/mountwarden", str(tmp / "etc" / "mountwarden"))
    copy = tmp / "mountwarden.service"
    copy.write_text(text)
    return copy, parse_unit(text)["Service"]


def test_the_unit_verifies(tmp_path: Path) -> None:
    copy, _ = installed_copy(tmp_path)
    done = subprocess.run(["systemd-analyze", "verify", "--man=no", str(copy)], capture_output=True, text=True)
    assert done.returncode == 0 and "mountwarden.service" not in done.stderr, done.stderr


def test_every_hardening_setting_has_a_comment_saying_why() -> None:
    """Each setting the unit sets or names in a comment is there on purpose (the brief's list at least)."""
    text = UNIT.read_text()
    for key in ("NoNewPrivileges", "PrivateDevices", "ProtectSystem", "ProtectKernelTunables", "RestrictNamespaces",
                "CapabilityBoundingSet", "SystemCallFilter", "MemoryDenyWriteExecute", "LockPersonality",
                "ProtectControlGroups", "DevicePolicy", "DeviceAllow", "ProtectClock", "PrivateTmp", "ProtectHome",
                "ProtectKernelModules", "ProtectProc", "PrivateNetwork", "PrivateUsers", "SystemCallArchitectures",
                "RestrictAddressFamilies", "RestrictSUIDSGID", "RestrictRealtime", "UMask"):  # fmt: skip
        assert re.search(rf"^(# )?{key}=", text, re.M) or f" {key}=" in text, f"{key} is not discussed in the unit"


# --- what systemd does to the service's processes, for the settings the unit turns on ------------------


def _no_new_privileges(value: str) -> None:
    assert value == "yes"
    import prctl

    prctl.set_no_new_privs(1)


def _memory_deny_write_execute(value: str) -> None:
    assert value == "yes"
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_MDWE)")


def _seccomp(service: dict[str, list[str]]) -> None:
    """LockPersonality and SystemCallArchitectures, as systemd's filters do them (one filter here)."""
    if "LockPersonality" not in service and "SystemCallArchitectures" not in service:
        return
    f = sc.SyscallFilter(sc.ALLOW)  # native architecture only: other ABIs' calls kill
    assert service.get("SystemCallArchitectures", ["native"]) == ["native"]
    if service.get("LockPersonality") == ["yes"]:
        # as strict as systemd's or stricter: even the query (0xffffffff) is refused
        f.add_rule(sc.ERRNO(errno.EPERM), "personality", sc.Arg(0, sc.NE, _personality()))
    f.load()


def _personality() -> int:
    import ctypes

    return int(ctypes.CDLL(None).personality(PERSONALITY_QUERY))


APPLIED: dict[str, Callable[[str], None] | None] = {
    "NoNewPrivileges": _no_new_privileges,
    "MemoryDenyWriteExecute": _memory_deny_write_execute,
    "LockPersonality": None,  # in _seccomp
    "SystemCallArchitectures": None,  # in _seccomp
}
SANDBOXING = set(APPLIED) | {
    "ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "PrivateNetwork", "PrivateIPC", "PrivateUsers",
    "PrivateMounts", "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups",
    "ProtectClock", "ProtectHostname", "ProtectProc", "ProcSubset", "RestrictNamespaces", "RestrictRealtime",
    "RestrictSUIDSGID", "RestrictAddressFamilies", "SystemCallFilter", "CapabilityBoundingSet",
    "AmbientCapabilities", "DevicePolicy", "DeviceAllow", "ReadOnlyPaths", "InaccessiblePaths", "ReadWritePaths",
    "TemporaryFileSystem", "BindPaths", "BindReadOnlyPaths", "MountFlags", "DynamicUser", "RemoveIPC",
    "IPAddressDeny", "IPAddressAllow", "SupplementaryGroups", "KeyringMode", "SecureBits",
}  # fmt: skip


def as_systemd_would(service: dict[str, list[str]], runtime_dir: Path) -> tuple[dict[str, str], Callable[[], None]]:
    """The environment and the set-up in the child (before exec) of every process the unit starts."""
    on = {key for key in service if key in SANDBOXING}
    assert on <= set(APPLIED), f"the unit turns on {sorted(on - set(APPLIED))}, which this test does not apply"
    user = pwd.getpwnam(service.get("User", ["root"])[-1])
    env = {"PATH": SYSTEMD_PATH, "RUNTIME_DIRECTORY": str(runtime_dir), "INVOCATION_ID": secrets.token_hex(16)}
    if "User" in service:
        env |= {"HOME": user.pw_dir, "USER": user.pw_name, "LOGNAME": user.pw_name, "SHELL": user.pw_shell}
    for line in service.get("Environment", []):
        env |= dict(word.split("=", 1) for word in shlex.split(line))
    umask = int(service.get("UMask", ["0022"])[-1], 8)
    nofile = int(service["LimitNOFILE"][-1]) if "LimitNOFILE" in service else None
    oom = service.get("OOMScoreAdjust", [None])[-1]

    def setup() -> None:
        os.setsid()
        os.umask(umask)
        # systemd has CAP_SYS_RESOURCE; where this test is denied it (this machine), the
        # limit stops at the hard limit and the OOM score is left alone
        if nofile is not None:
            hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            limit = nofile if SYS_RESOURCE or hard == resource.RLIM_INFINITY else min(nofile, hard)
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
        if oom is not None and SYS_RESOURCE:
            with open("/proc/self/oom_score_adj", "w") as f:
                f.write(oom)
        os.initgroups(user.pw_name, user.pw_gid)
        os.setgid(user.pw_gid)
        os.setuid(user.pw_uid)
        for key, apply in APPLIED.items():
            if apply is not None and key in service:
                apply(service[key][-1])
        _seccomp(service)

    return env, setup


def command(line: str, mainpid: int = 0) -> list[str]:
    """An Exec*= line as argv: systemd's `$MAINPID`, and no `-`/`@`/`+` prefixes (the unit uses none)."""
    argv = shlex.split(line.replace("$MAINPID", str(mainpid)))
    assert argv[0].startswith("/"), f"{argv[0]}: systemd wants an absolute path here"
    return argv


@contextlib.contextmanager
def started(
    service: dict[str, list[str]], tmp: Path
) -> Iterator[tuple[subprocess.Popen[bytes], Path, Callable[..., int]]]:
    """The unit's main process, after its ExecStartPre and ExecStartPost; stopped at the end."""
    runtime_dir = tmp / "run" / service["RuntimeDirectory"][-1]
    runtime_dir.mkdir(parents=True, exist_ok=True)
    user = pwd.getpwnam(service.get("User", ["root"])[-1])
    os.chown(runtime_dir, user.pw_uid, user.pw_gid)
    runtime_dir.chmod(int(service.get("RuntimeDirectoryMode", ["0755"])[-1], 8))
    env, setup = as_systemd_would(service, runtime_dir)
    journal = tmp / "journal"

    def run(line: str, mainpid: int = 0) -> int:
        with open(journal, "ab") as out:
            return subprocess.run(command(line, mainpid), env=env, preexec_fn=setup, stdin=subprocess.DEVNULL,
                                  stdout=out, stderr=out, timeout=30).returncode  # fmt: skip

    for line in service.get("ExecStartPre", []):
        assert run(line) == 0, journal.read_text()
    with open(journal, "ab") as out:
        main = subprocess.Popen(command(service["ExecStart"][-1]), env=env, preexec_fn=setup,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=out)  # fmt: skip
    try:
        for line in service.get("ExecStartPost", []):
            assert run(line) == 0, journal.read_text()
        yield main, journal, run
    finally:
        if main.poll() is None:
            main.kill()
            main.wait()


def _events(journal: Path, event: str) -> list[dict[str, object]]:
    return [r for r in read_audit(journal) if r.get("event") == event]


def _wait_for(journal: Path, event: str, timeout: float = 20) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while not (found := _events(journal, event)):
        assert time.monotonic() < deadline, f"no {event} from the service:\n{journal.read_text()[-3000:]}"
        time.sleep(0.05)
    return found[-1]


@pytest.mark.skipif(
    not all(shutil.which(t) for t in ("runc", "squashfuse")),
    reason="needs runc and squashfuse (contrib/setup.sh installs them)",
)
def test_the_unit_serves_a_runc_container_under_its_hardening_reloads_and_stops_cleanly(
    tmp_path: Path, workdir: Path, images: dict[str, Path], mountcall: Path
) -> None:
    _, service = installed_copy(tmp_path)
    (tmp_path / "etc" / "mountwarden").mkdir(parents=True)
    rules = [{"name": "squashfs-through-fuse", "match": {"target": "/mnt", "fstype": "squashfs"}, "action": "fuse",
              "daemon": "squashfuse", "options": ["ro"]},
             {"name": "images-on-mnt", "match": {"target": "/mnt"}, "action": "kernel"}]  # fmt: skip
    policy = write_policy(tmp_path / "etc" / "mountwarden" / "policy.yaml", rules)
    run_dir = tmp_path / "run" / "mountwarden"
    run_dir.mkdir(parents=True)
    (run_dir / "oci.sock").write_text("left by a serve that crashed\n")
    with started(service, tmp_path) as (main, journal, run):
        ready = _wait_for(journal, "serve-ready")
        assert ready["oci_socket"] == str(run_dir / "oci.sock"), ready
        assert stat.S_IMODE(run_dir.stat().st_mode) == 0o755
        for name in ("oci.sock", "lxc.sock"):
            st = (run_dir / name).stat()
            assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0, name
        st = (run_dir / "control.sock").stat()
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) & 0o006 == 0o006, "ordinary users reach it"
        status = Path(f"/proc/{main.pid}/status").read_text()
        assert re.search(r"^NoNewPrivs:\s+1$", status, re.M) and re.search(r"^Seccomp:\s+2$", status, re.M), status
        if SYS_RESOURCE:
            assert Path(f"/proc/{main.pid}/oom_score_adj").read_text().strip() == service["OOMScoreAdjust"][-1]
        assert "PATH=" + SYSTEMD_PATH in Path(f"/proc/{main.pid}/environ").read_bytes().decode().split("\0")

        _serve_loop_mounts(run_dir / "oci.sock", tmp_path, workdir, images, mountcall)
        decided = {(r["rule"], r["result"]) for r in _events(journal, "mount-decision") if r.get("rule")}
        assert decided == {("images-on-mnt", "OK"), ("squashfs-through-fuse", "OK")}, decided

        write_policy(policy, rules[1:])
        assert run(service["ExecReload"][-1], main.pid) == 0
        reloaded = _wait_for(journal, "policy-reloaded")
        assert reloaded["rules"] == 1, reloaded
        os.kill(main.pid, signal.Signals[service["KillSignal"][-1]])
        assert main.wait(timeout=int(service["TimeoutStopSec"][-1])) == 0, journal.read_text()[-3000:]
        assert not (run_dir / "oci.sock").exists()  # lxc.sock may stay: ExecStartPre removes what is left
        assert run_dir.is_dir(), "RuntimeDirectoryPreserve: what `run` shares there outlives the service"


def _serve_loop_mounts(socket: Path, tmp: Path, workdir: Path, images: dict[str, Path], mountcall: Path) -> None:
    """A runc container whose profile's listenerPath is the unit's socket mounts an ext4 image
    (by the kernel) and a squashfs one (by a FUSE daemon serve starts) with -o loop."""
    name = f"mwsvc-{os.getpid()}"
    root, imgdir = workdir / f"svc-root-{name}", workdir / f"svc-img-{name}"
    imgdir.mkdir(mode=0o755)
    try:
        for fstype in ("ext4", "squashfs"):
            shutil.copy(images[fstype], imgdir / f"data.{fstype}")
        subprocess.run(["chown", "-R", "100000:100000", str(imgdir)], check=True)
        oci.rootfs(root, mountcall)
        script = ("i=0; while [ ! -e /dev/loop-control ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done; "
                  "for t in ext4 squashfs; do mount -o loop,ro /img/data.$t /mnt && cat /mnt/pub.txt && umount /mnt; "
                  "done")  # fmt: skip
        profile = oci_source.profile(None, str(socket), runtime="runc")
        done = oci.run("runc", tmp, name, oci.config(root, ["/bin/sh", "-c", script], profile, imgdir))
        assert done.returncode == 0 and done.stdout.split() == ["public", "public"], done
    finally:
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(imgdir, ignore_errors=True)
