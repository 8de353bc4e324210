"""Driving a real unprivileged LXC 5.0.2 container against a real `mountwarden serve`, for the tests.

The container is built from the host's busybox-static (no download), mapped onto
100000:65536, with no network, and started with `lxc-start -F -P <its own lxcpath>`: its
monitor is the test's child, connects to serve's LXC socket and forwards every notification
of the container, and of processes `lxc-attach`ed into it, over that one connection. The
container writes what it has to say into /out of its root, which the test reads on the host.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO

IDMAP = (100000, 65536)
APPLETS = ("sh", "cat", "ls", "mount", "umount", "losetup", "sleep", "touch", "readlink", "echo", "grep", "wc")
COOKIE = "mwtest-cookie"
# The pool appears as soon as the monitor has connected to mountwarden, just after the init starts.
WAIT_FOR_POOL = "i=0; while [ ! -e /dev/loop-control ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done"


@dataclass
class Container:
    name: str
    lxcpath: Path
    rootfs: Path
    monitor: subprocess.Popen[bytes]

    @property
    def key(self) -> str:
        """The daemon's key for this container: its monitor's pid."""
        return f"lxc:{self.monitor.pid}"

    def attach(self, command: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["lxc-attach", "-P", str(self.lxcpath), "-n", self.name, "--", "/bin/sh", "-c", command],
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip

    def init_pid(self) -> int:
        out = subprocess.run(
            ["lxc-info", "-P", str(self.lxcpath), "-n", self.name, "-p", "-H"], capture_output=True, text=True
        ).stdout
        return int(out.strip())

    def out(self, name: str) -> Path:
        return self.rootfs / "out" / name

    def wait_for(self, name: str, timeout: float = 30) -> None:
        """Until the container has written /out/`name`."""
        deadline = time.monotonic() + timeout
        while not self.out(name).exists():
            if time.monotonic() > deadline or self.monitor.poll() is not None:
                pytest.fail(f"the container {self.name} did not get to {name}: {self.log()}")
            time.sleep(0.05)

    def log(self) -> str:
        path = self.lxcpath / f"{self.name}.log"
        return path.read_text()[-3000:] if path.exists() else "(no log)"


def build_rootfs(root: Path, images: dict[str, Path], init: str, tools: tuple[Path, ...] = ()) -> None:
    """A busybox root with `images` (name in /img -> host image), `tools` in /bin and /init.sh
    running `init`."""
    for d in ("bin", "proc", "dev", "sys", "tmp", "mnt", "img", "out"):
        (root / d).mkdir(parents=True)
    shutil.copy("/bin/busybox", root / "bin" / "busybox")
    for applet in APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    for tool in tools:
        shutil.copy(tool, root / "bin" / tool.name)
    for name, image in images.items():
        shutil.copy(image, root / "img" / name)
    (root / "init.sh").write_text("#!/bin/sh\n" + init)
    (root / "init.sh").chmod(0o755)
    subprocess.run(["chown", "-R", "-h", f"{IDMAP[0]}:{IDMAP[0]}", str(root)], check=True)


def remove_leftovers(name: str) -> None:
    """LXC leaves empty cgroups behind (lxc.pivot, and the container's own when killed)."""
    for pattern in ("lxc.pivot", f"lxc.payload.{name}", f"lxc.monitor.{name}"):
        for path in sorted(glob.glob(f"/sys/fs/cgroup/*/{pattern}") + glob.glob(f"/sys/fs/cgroup/{pattern}"),
                           key=len, reverse=True):  # fmt: skip
            with contextlib.suppress(OSError):
                os.rmdir(path)


@contextlib.contextmanager
def started(
    workdir: Path, proxy: Path, name: str, init: str, images: dict[str, Path], tools: tuple[Path, ...] = ()
) -> Iterator[Container]:
    """The container `name` running `init`, its monitor connected to the proxy socket `proxy`;
    stopped, destroyed and its leftovers removed at the end, however it ended."""
    lxcpath = Path(tempfile.mkdtemp(prefix="lxc.", dir=workdir))  # the container's root must reach its rootfs
    rootfs = lxcpath / name / "rootfs"
    build_rootfs(rootfs, images, init, tools)
    (lxcpath / name / "config").write_text(
        "\n".join([
            f"lxc.uts.name = {name}",
            f"lxc.rootfs.path = dir:{rootfs}",
            f"lxc.idmap = u 0 {IDMAP[0]} {IDMAP[1]}",
            f"lxc.idmap = g 0 {IDMAP[0]} {IDMAP[1]}",
            "lxc.net.0.type = empty",
            "lxc.mount.auto = proc:mixed sys:ro",
            "lxc.autodev = 1",
            "lxc.tty.max = 0",
            "lxc.pty.max = 4",
            "lxc.console.path = none",
            "lxc.apparmor.profile = unconfined",
            f"lxc.seccomp.profile = {REPO / 'contrib/lxc/mountwarden.seccomp'}",
            f"lxc.seccomp.notify.proxy = unix:{proxy}",
            f"lxc.seccomp.notify.cookie = {COOKIE}",
            "lxc.init.cmd = /init.sh",
        ]) + "\n"
    )  # fmt: skip
    lxcpath.chmod(0o755)
    monitor = subprocess.Popen(
        ["lxc-start", "-F", "-P", str(lxcpath), "-n", name, "-l", "DEBUG", "-o", str(lxcpath / f"{name}.log")],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        yield Container(name, lxcpath, rootfs, monitor)
    finally:
        if monitor.poll() is None:
            subprocess.run(["lxc-stop", "-k", "-P", str(lxcpath), "-n", name], capture_output=True, timeout=30)
        try:
            monitor.wait(timeout=30)
        except subprocess.TimeoutExpired:
            monitor.kill()
            monitor.wait()
        subprocess.run(["lxc-destroy", "-P", str(lxcpath), "-n", name], capture_output=True, timeout=30)
        remove_leftovers(name)
        shutil.rmtree(lxcpath, ignore_errors=True)
