"""Driving real OCI runtimes (runc, crun) against a real `mountwarden serve`, for the tests.

crun 1.8.1 refuses this machine's hybrid cgroup layout; it runs in a mount namespace of its
own where the cgroup2 mount is gone (shared runtime-facts §4c), which touches nothing else.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from conftest import mountwarden, read_audit

CAPS = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_SETUID", "CAP_SETGID", "CAP_SYS_ADMIN", "CAP_KILL",
        "CAP_SYS_CHROOT", "CAP_MKNOD"]  # fmt: skip
BUSYBOX_TOOLS = (
    "sh",
    "cat",
    "echo",
    "grep",
    "ls",
    "losetup",
    "mount",
    "umount",
    "mkdir",
    "sleep",
    "wc",
    "test",
    "dd",
    "touch",
    "readlink",
)


def rootfs(path: Path, mountcall: Path, *, owner: str = "100000:100000") -> Path:
    """A busybox root owned by the container's root (host uid 100000 unless `owner`)."""
    for d in ("bin", "proc", "dev", "sys", "tmp", "mnt", "img", "etc", "out"):
        (path / d).mkdir(parents=True, exist_ok=True)
    shutil.copy("/bin/busybox", path / "bin" / "busybox")
    for tool in BUSYBOX_TOOLS:
        with contextlib.suppress(FileExistsError):
            (path / "bin" / tool).symlink_to("busybox")
    shutil.copy(mountcall, path / "bin" / "mountcall")
    subprocess.run(["chown", "-R", owner, str(path)], check=True)
    return path


def config(
    root: Path, args: list[str], seccomp: dict[str, Any], images: Path, *, rw_images: bool = False,
    ids: tuple[int, int] | None = None, rootless: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """A minimal OCI config: user namespace (0 -> 100000 x 65536, or 0 -> `ids` alone), no network,
    the images bound at /img. `rootless`: for a runtime an ordinary user runs."""
    uids = [{"containerID": 0, "hostID": ids[0] if ids else 100000, "size": 1 if ids else 65536}]
    gids = [{"containerID": 0, "hostID": ids[1] if ids else 100000, "size": 1 if ids else 65536}]
    sys_mount = {"destination": "/sys", "type": "none", "source": "/sys", "options": ["rbind", "nosuid", "noexec",
                 "nodev", "ro"]} if rootless else {"destination": "/sys", "type": "sysfs", "source": "sysfs",
                 "options": ["nosuid", "noexec", "nodev", "ro"]}  # fmt: skip
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "cwd": "/",
            "env": ["PATH=/bin", "HOME=/"],
            "capabilities": {k: CAPS for k in ("bounding", "effective", "permitted")},
            "noNewPrivileges": False,
        },  # fmt: skip
        "root": {"path": str(root), "readonly": False},
        "hostname": "mw-oci",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {
                "destination": "/dev",
                "type": "tmpfs",
                "source": "tmpfs",
                "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
            },
            {
                "destination": "/dev/pts",
                "type": "devpts",
                "source": "devpts",
                "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"],
            },
            sys_mount,
            {
                "destination": "/img",
                "type": "bind",
                "source": str(images),
                "options": ["rbind", "rw" if rw_images else "ro"],
            },
        ],  # fmt: skip
        "linux": {
            "uidMappings": uids,
            "gidMappings": gids,
            "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount", "network", "user")],
            "seccomp": seccomp,
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list"],
        },
    }


class Serve:
    """`mountwarden serve` on a socket of its own, with its audit log."""

    def __init__(
        self, tmp: Path, policy: Path, *, lxc: bool = False, control: Path | None = None,
        oci_socket: Path | None = None, extra: list[str] | None = None,
    ) -> None:  # fmt: skip
        self.socket = oci_socket or tmp / "oci.sock"
        self.lxc_socket = tmp / "lxc.sock"  # served with `lxc`
        self.control_socket = control or tmp / "control.sock"
        self.log = tmp / "serve-audit.log"
        cmd = mountwarden(
            "serve", "--policy", str(policy), "--oci-socket", str(self.socket), "--audit-log", str(self.log),
            "--control-socket", str(self.control_socket), *(extra or []),
        )  # fmt: skip
        if lxc:
            cmd += ["--lxc-socket", str(self.lxc_socket)]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 20
        while not any(r.get("event") == "serve-ready" for r in read_audit(self.log)):
            assert self.proc.poll() is None, self.proc.stderr.read() if self.proc.stderr else ""
            assert time.monotonic() < deadline, "mountwarden serve did not start"
            time.sleep(0.05)

    def records(self, event: str = "mount-decision") -> list[dict[str, Any]]:
        return [r for r in read_audit(self.log) if r.get("event") == event]

    def wait_for(self, event: str, timeout: float = 10) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while not (found := self.records(event)):
            assert time.monotonic() < deadline, f"no {event} in the audit log"
            time.sleep(0.05)
        return found

    def wait_for_match(
        self, event: str, match: Callable[[dict[str, Any]], bool], timeout: float = 10
    ) -> dict[str, Any]:
        """The first `event` record `match` accepts, waiting for it to be written."""
        deadline = time.monotonic() + timeout
        while not (found := [r for r in self.records(event) if match(r)]):
            assert time.monotonic() < deadline, f"no such {event} in the audit log"
            time.sleep(0.05)
        return found[0]

    def stop(self) -> int:
        self.proc.terminate()
        try:
            return self.proc.wait(timeout=30)
        finally:
            if self.proc.stderr:
                self.proc.stderr.close()


@contextlib.contextmanager
def serving(
    tmp: Path, policy: Path, *, lxc: bool = False, control: Path | None = None, oci_socket: Path | None = None,
    extra: list[str] | None = None,
) -> Iterator[Serve]:  # fmt: skip
    serve = Serve(tmp, policy, lxc=lxc, control=control, oci_socket=oci_socket, extra=extra)
    try:
        yield serve
    finally:
        if serve.proc.poll() is None:
            serve.stop()


def runtime_argv(runtime: str, state: Path, *args: str) -> list[str]:
    if runtime == "crun":
        inner = shlex.join(["crun", "--root", str(state), *args])
        return ["unshare", "-m", "--propagation", "private", "sh", "-c",
                f"umount /sys/fs/cgroup/unified 2>/dev/null; exec {inner}"]  # fmt: skip
    return ["runc", "--root", str(state), *args]


def run(
    runtime: str, tmp: Path, name: str, cfg: dict[str, Any], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run the container `name` to its end in the foreground; delete it whatever happens."""
    bundle, state = _bundle(tmp, name, cfg), tmp / f"{runtime}-state"
    try:
        return subprocess.run(
            runtime_argv(runtime, state, "run", "--bundle", str(bundle), name),
            capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    finally:
        subprocess.run(runtime_argv(runtime, state, "kill", name, "KILL"), capture_output=True)
        subprocess.run(runtime_argv(runtime, state, "delete", "--force", name), capture_output=True)


def _bundle(tmp: Path, name: str, cfg: dict[str, Any]) -> Path:
    bundle = tmp / f"bundle-{name}"
    bundle.mkdir(exist_ok=True)
    (bundle / "config.json").write_text(json.dumps(cfg))
    return bundle


@contextlib.contextmanager
def running(runtime: str, tmp: Path, name: str, cfg: dict[str, Any]) -> Iterator[subprocess.Popen[bytes]]:
    """The container `name` started in the foreground (its runtime this process's child, its
    output in tmp/NAME.out); killed and deleted at the end, however it ended."""
    bundle, state = _bundle(tmp, name, cfg), tmp / f"{runtime}-state"
    with open(tmp / f"{name}.out", "wb") as out:
        proc = subprocess.Popen(
            runtime_argv(runtime, state, "run", "--bundle", str(bundle), name),
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        yield proc
    finally:
        subprocess.run(runtime_argv(runtime, state, "kill", name, "KILL"), capture_output=True)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        subprocess.run(runtime_argv(runtime, state, "delete", "--force", name), capture_output=True)


def init_pid(runtime: str, tmp: Path, name: str) -> int:
    """The host pid of the running container's init, as its runtime reports it."""
    out = subprocess.run(runtime_argv(runtime, tmp / f"{runtime}-state", "state", name),
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    return int(json.loads(out)["pid"])


def exec_in(runtime: str, tmp: Path, name: str, script: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`runc exec` / `crun exec` of a shell running `script` in the running container `name`."""
    return subprocess.run(
        runtime_argv(runtime, tmp / f"{runtime}-state", "exec", name, "/bin/sh", "-c", script),
        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def mountwarden_argv() -> list[str]:
    """The command line of the `mountwarden` under test, for another user to run."""
    return mountwarden()
