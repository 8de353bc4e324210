"""A real unprivileged LXC 5.0.2 container served over `lxc.seccomp.notify.proxy`.

The container is built here from the host's busybox-static (no download), mapped onto
100000:65536, with no network, and started with `lxc-start -F -P <tmp lxcpath>`: its monitor is
this test's child, connects to the proxy and forwards every notification of the container,
and of processes `lxc-attach`ed into it, over that one connection.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO, write_policy

from supervisor import audit
from supervisor.daemon import Daemon
from supervisor.policy import load_policy
from supervisor.sources import lxc

pytestmark = pytest.mark.skipif(shutil.which("lxc-start") is None, reason="needs lxc (apt-get install lxc)")

IDMAP = (100000, 65536)
APPLETS = ("sh", "cat", "ls", "mount", "umount", "losetup", "sleep", "touch", "readlink", "echo", "grep")
INIT = """#!/bin/sh
# The pool appears as soon as the monitor has connected to mountwarden, just after this starts.
i=0; while [ ! -e /dev/loop-control ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
{ mount -o loop /img/data.ext4 /mnt && cat /mnt/pub.txt && losetup -a && readlink /dev/loop0 && umount /mnt
  echo "rc=$?"; } >/out/init.txt 2>&1
touch /out/init.done
exec sleep 1000
"""


@dataclass
class Serving:
    daemon: Daemon
    proxy: lxc.LxcProxy
    socket: Path
    audit: Path


@pytest.fixture
def serving(tmp_path: Path) -> Iterator[Serving]:
    """An LXC proxy on a daemon's loop, run on a thread of the test."""
    policy = write_policy(
        tmp_path / "lxc.yaml",
        [{"name": "lxc-images", "containers": {"lxc_cookie": ["mwtest-cookie"]},
          "match": {"fstype": ["ext4"], "target": "/mnt"}, "action": "kernel"}],
    )  # fmt: skip
    log = tmp_path / "audit.log"
    stream = log.open("a")
    audit.configure(stream)
    daemon = Daemon([str(policy)], load_policy([str(policy)]), audit.logger())
    proxy = lxc.LxcProxy(daemon, str(tmp_path / "run" / "lxc.sock")).start()
    stop_r, stop_w = os.pipe()
    stopped = threading.Event()
    daemon.server.watch(stop_r, lambda fd, events: stopped.set())
    loop = threading.Thread(target=daemon.server.run, kwargs={"until": stopped.is_set})
    loop.start()
    try:
        yield Serving(daemon, proxy, tmp_path / "run" / "lxc.sock", log)
    finally:
        os.write(stop_w, b"x")
        loop.join()
        proxy.close()
        daemon.close()
        os.close(stop_r)
        os.close(stop_w)
        audit.configure()
        stream.close()


@dataclass
class Container:
    name: str
    lxcpath: Path
    rootfs: Path
    monitor: subprocess.Popen[bytes]

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

    def wait_for(self, name: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while not (self.rootfs / "out" / name).exists():
            if time.monotonic() > deadline or self.monitor.poll() is not None:
                pytest.fail(f"the container did not get to {name}: {self.log()}")
            time.sleep(0.05)
        return (self.rootfs / "out" / "init.txt").read_text()

    def log(self) -> str:
        path = self.lxcpath / f"{self.name}.log"
        return path.read_text()[-3000:] if path.exists() else "(no log)"


def build_rootfs(root: Path, image: Path) -> None:
    for d in ("bin", "proc", "dev", "sys", "tmp", "mnt", "img", "out"):
        (root / d).mkdir(parents=True)
    shutil.copy("/bin/busybox", root / "bin" / "busybox")
    for applet in APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    shutil.copy(image, root / "img" / "data.ext4")
    (root / "init.sh").write_text(INIT)
    (root / "init.sh").chmod(0o755)
    subprocess.run(["chown", "-R", "-h", f"{IDMAP[0]}:{IDMAP[0]}", str(root)], check=True)


def remove_lxc_leftovers(name: str) -> None:
    """LXC leaves empty cgroups behind (lxc.pivot, and the container's own when killed)."""
    for pattern in ("lxc.pivot", f"lxc.payload.{name}", f"lxc.monitor.{name}"):
        for path in sorted(glob.glob(f"/sys/fs/cgroup/*/{pattern}") + glob.glob(f"/sys/fs/cgroup/{pattern}"),
                           key=len, reverse=True):  # fmt: skip
            with contextlib.suppress(OSError):
                os.rmdir(path)


@pytest.fixture
def container(serving: Serving, workdir: Path, images: dict[str, Path]) -> Iterator[Container]:
    name = f"mwtest{os.getpid()}"
    lxcpath = Path(tempfile.mkdtemp(prefix="lxc.", dir=workdir))  # the container's root must reach its rootfs
    rootfs = lxcpath / name / "rootfs"
    build_rootfs(rootfs, images["ext4"])
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
            f"lxc.seccomp.notify.proxy = unix:{serving.socket}",
            "lxc.seccomp.notify.cookie = mwtest-cookie",
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
        subprocess.run(["lxc-stop", "-k", "-P", str(lxcpath), "-n", name], capture_output=True, timeout=30)
        try:
            monitor.wait(timeout=30)
        except subprocess.TimeoutExpired:
            monitor.kill()
            monitor.wait()
        subprocess.run(["lxc-destroy", "-P", str(lxcpath), "-n", name], capture_output=True, timeout=30)
        remove_lxc_leftovers(name)
        shutil.rmtree(lxcpath, ignore_errors=True)


def test_loop_mount_inside_lxc(container: Container, serving: Serving) -> None:
    """The container's init and an attached process mount an image through the private pool."""
    out = container.wait_for("init.done")
    assert "public" in out and "rc=0" in out, out + serving.audit.read_text()
    assert "/dev/loop0:" in out and "/img/data.ext4" in out  # the container's own numbering
    assert ".mountwarden/loop0" in out  # the pool's node, linked into the container's /dev
    attached = container.attach(
        "mount -o loop,ro /img/data.ext4 /mnt && cat /mnt/dir/nested.txt && losetup -a && umount /mnt && echo done"
    )
    assert attached.returncode == 0 and "nested" in attached.stdout and "done" in attached.stdout, attached
    records = [line for line in serving.audit.read_text().splitlines() if "mount-decision" in line]
    assert any(f'"container": "{container.name}"' in r and '"rule": "lxc-images"' in r for r in records), records
    assert serving.daemon.find(f"lxc:{container.monitor.pid}") is not None  # one connection, one session


def test_sigkill_releases_everything(container: Container, serving: Serving) -> None:
    """SIGKILL of the container's init with an image mounted: the monitor hangs up, the session goes."""
    container.wait_for("init.done")
    attached = container.attach("mount -o loop /img/data.ext4 /mnt && losetup -a")
    assert attached.returncode == 0, attached
    assert os.path.ismount(f"/proc/{container.init_pid()}/root/mnt")
    os.kill(container.init_pid(), signal.SIGKILL)
    container.monitor.wait(timeout=30)
    deadline = time.monotonic() + 10
    while serving.daemon.find(f"lxc:{container.monitor.pid}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert serving.daemon.find(f"lxc:{container.monitor.pid}") is None  # conftest checks loops and mounts


def test_a_peer_that_is_no_monitor_is_turned_away(serving: Serving) -> None:
    """A peer with no container init among its children is no LXC monitor: hung up on, logged."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.connect(str(serving.socket))
        sock.settimeout(5)
        assert sock.recv(200) == b""
    assert "no container init" in serving.audit.read_text()
    assert oct(serving.socket.stat().st_mode & 0o777) == "0o600"
