"""A real unprivileged LXC 5.0.2 container served over `lxc.seccomp.notify.proxy` by a real
`mountwarden serve`, started through its command line (tests/lxcrt.py drives LXC).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import lxcrt
import oci
import pytest
from conftest import write_policy

pytestmark = pytest.mark.skipif(shutil.which("lxc-start") is None, reason="needs lxc (apt-get install lxc)")

INIT = f"""{lxcrt.WAIT_FOR_POOL}
{{ mount -o loop /img/data.ext4 /mnt && cat /mnt/pub.txt && losetup -a && readlink /dev/loop0 && umount /mnt
  echo "rc=$?"; }} >/out/init.txt 2>&1
touch /out/init.done
exec sleep 1000
"""


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[oci.Serve]:
    policy = write_policy(
        tmp_path / "lxc.yaml",
        [{"name": "lxc-images", "containers": {"lxc_cookie": [lxcrt.COOKIE]},
          "match": {"fstype": ["ext4"], "target": "/mnt"}, "action": "kernel"}],
    )  # fmt: skip
    with oci.serving(tmp_path, policy, lxc=True) as serving:
        yield serving


@pytest.fixture
def container(serve: oci.Serve, workdir: Path, images: dict[str, Path]) -> Iterator[lxcrt.Container]:
    with lxcrt.started(workdir, serve.lxc_socket, f"mwtest{os.getpid()}", INIT, {"data.ext4": images["ext4"]}) as c:
        yield c


def test_loop_mount_inside_lxc(container: lxcrt.Container, serve: oci.Serve) -> None:
    """The container's init and an attached process mount an image through the private pool."""
    container.wait_for("init.done")
    out = container.out("init.txt").read_text()
    assert "public" in out and "rc=0" in out, out + serve.log.read_text()
    assert "/dev/loop0:" in out and "/img/data.ext4" in out  # the container's own numbering
    assert ".mountwarden/loop0" in out  # the pool's node, linked into the container's /dev
    attached = container.attach(
        "mount -o loop,ro /img/data.ext4 /mnt && cat /mnt/dir/nested.txt && losetup -a && umount /mnt && echo done"
    )
    assert attached.returncode == 0 and "nested" in attached.stdout and "done" in attached.stdout, attached
    records = [r for r in serve.records() if r.get("container") == container.name]
    assert any(r.get("rule") == "lxc-images" for r in records), records
    adopted = [r for r in serve.records("lxc-container-adopted") if r.get("key") == container.key]
    assert len(adopted) == 1, adopted  # one connection, one session


def test_sigkill_releases_everything(container: lxcrt.Container, serve: oci.Serve) -> None:
    """SIGKILL of the container's init with an image mounted: the monitor hangs up, the session goes."""
    container.wait_for("init.done")
    attached = container.attach("mount -o loop /img/data.ext4 /mnt && losetup -a")
    assert attached.returncode == 0, attached
    assert os.path.ismount(f"/proc/{container.init_pid()}/root/mnt")
    os.kill(container.init_pid(), signal.SIGKILL)
    container.monitor.wait(timeout=30)
    serve.wait_for_match("container-released", lambda r: r.get("key") == container.key)  # conftest: loops, mounts


def test_a_peer_that_is_no_monitor_is_turned_away(serve: oci.Serve) -> None:
    """A peer with no container init among its children is no LXC monitor: hung up on, logged."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.connect(str(serve.lxc_socket))
        sock.settimeout(5)
        assert sock.recv(200) == b""
    serve.wait_for_match("lxc-monitor-refused", lambda r: "no container init" in str(r.get("reason")))
    assert oct(serve.lxc_socket.stat().st_mode & 0o777) == "0o600"
