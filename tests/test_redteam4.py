"""Fourth red-team pass: `mountwarden serve` with runtime containers (runc), and its OCI socket.

The attacker is the root of a runc container (root of its user namespace, CAP_SYS_ADMIN there,
under the profile `mountwarden profile oci` prints), or, for the socket, a root process of the
host posing as a runtime. Each hole found is kept as the test that now fails closed, its
docstring saying what was wrong; attacks that failed stay as guards.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import oci
import pytest
from conftest import allow_policy, write_policy

from supervisor.sources import oci as oci_source

WAIT_FOR_POOL = "i=0; while [ ! -e /dev/loop-control ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done"


@pytest.fixture
def bundle_root(tmp_path: Path, workdir: Path, mountcall: Path, images: dict[str, Path]) -> Iterator[Path]:
    """A busybox root with an image of the container's own at /tmp/evil/data.ext4."""
    root = oci.rootfs(workdir / f"oci-root-{tmp_path.name}", mountcall)
    evil = root / "tmp" / "evil"
    evil.mkdir()
    shutil.copy(images["ext4"], evil / "data.ext4")
    for path in (evil, evil / "data.ext4"):
        os.chown(path, 100000, 100000)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _host_images_only(tmp_path: Path) -> Path:
    """Only the host's images under /img may be mounted by the kernel; nothing else."""
    rule = {"name": "host-images", "match": {"source": "/img/*.ext4", "target": "/**"}, "action": "kernel"}
    return write_policy(tmp_path / "host-only.yaml", [rule])


def _runc(serve: oci.Serve, tmp_path: Path, root: Path, images: Path, name: str, script: str | list[str]) -> list[str]:
    profile = oci_source.profile(None, str(serve.socket), runtime="runc", metadata="redteam4")
    args = ["/bin/sh", "-c", script] if isinstance(script, str) else script
    cfg = oci.config(root, args, profile, images)
    run = oci.run("runc", tmp_path, name, cfg)
    assert run.returncode == 0, run.stdout + run.stderr
    serve.wait_for("container-released")
    return run.stdout.split()


BIND = "mount -o bind /tmp/evil /img && echo bound"  # the container's own images over the host's /img
MOUNT = "mount -o loop,ro /img/data.ext4 /mnt && echo mounted && umount /mnt; true"


def _image_mounts(serve: oci.Serve) -> list[dict[str, Any]]:
    """The mount records of /img/data.ext4 (busybox binds it to a loop device first: `backing_file`)."""
    return [r for r in serve.records() if r.get("syscall") == "mount" and r.get("backing_file") == "/img/data.ext4"]


def test_a_bind_of_the_containers_image_made_after_adoption_is_the_containers(
    tmp_path: Path, bundle_root: Path, images: dict[str, Path]
) -> None:
    """Guard (threat model #4 in serve): once adopted, a bind over a host path does not pass for the host's file."""
    with oci.serving(tmp_path, _host_images_only(tmp_path)) as serve:
        out = _runc(
            serve, tmp_path, bundle_root, images["ext4"].parent, "mw-rt4-late", f"{WAIT_FOR_POOL}; {BIND}; {MOUNT}"
        )
        assert out == ["bound"], out
        records = _image_mounts(serve)
        assert records and records[-1]["source_origin"] == "container" and records[-1]["result"] != "OK", records


def test_a_bind_made_before_adoption_does_not_make_the_containers_image_the_hosts(
    tmp_path: Path, bundle_root: Path, images: dict[str, Path]
) -> None:
    """Hole: serve recorded the container's mount tree (origin.Tree) when it adopted the
    container, on its worker, after the runtime had started the container's command: a bind the
    command made at once over a trusted host path was in that tree, so the container's own image
    passed for the host's (source_origin: host) and a host-only rule gave it to the kernel's
    ext4 driver. The container's first process binds first thing, then execs the shell; it won
    the race against adoption often, not always: a few tries.

    Fixed: a runtime's profile notifies every mount(2), binds and moves included, and refuses
    open_tree and move_mount; the session takes the tree before it answers any call.
    """
    first = ["/bin/mountcall", "seq", "mount", "/tmp/evil", "/img", "none", "bind", ";", "exec-as", "0", "/bin/sh"]
    for attempt in range(12):
        (tmp_path / str(attempt)).mkdir()
        with oci.serving(tmp_path / str(attempt), _host_images_only(tmp_path)) as serve:
            name = f"mw-rt4-early{attempt}"
            out = _runc(
                serve, tmp_path, bundle_root, images["ext4"].parent, name, [*first, "-c", f"{WAIT_FOR_POOL}; {MOUNT}"]
            )
            assert out[:1] == ["OK"], out
            records = _image_mounts(serve)
            assert records, serve.records()
            assert "mounted" not in out and records[-1]["source_origin"] == "container", (attempt, out, records)


def _connect(serve: oci.Serve) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.connect(str(serve.socket))
    return sock


def _fds(serve: oci.Serve) -> int:
    return len(os.listdir(f"/proc/{serve.proc.pid}/fd"))


def _still_serving(serve: oci.Serve, seconds: float = 1.0) -> None:
    """serve is alive after `seconds` and still accepts a connection."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert serve.proc.poll() is None, "mountwarden serve died"
        time.sleep(0.05)
    _connect(serve).close()


def test_malformed_runtime_documents_are_dropped_and_serve_goes_on(tmp_path: Path) -> None:
    """Guard: garbage, a document naming a listener it does not send, a non-listener fd as the
    listener, an oversized document, an fd flood and more idle connections than it keeps."""
    state = {"ociVersion": "1.0.2", "id": "rt4-forged", "status": "creating", "pid": 1, "bundle": "/"}
    good_state = {"ociVersion": "1.0.2", "fds": ["seccompFd"], "pid": 1, "state": state}
    with oci.serving(tmp_path, allow_policy(tmp_path)) as serve:
        before = _fds(serve)
        for payload in (b"\xff\xfe not json", b'{"state": 3}', json.dumps(good_state).encode()):
            with _connect(serve) as sock:
                sock.sendall(payload)
        with _connect(serve) as sock, open("/dev/null", "rb") as null:
            socket.send_fds(sock, [json.dumps(good_state).encode()], [null.fileno()] * 12)
        with _connect(serve) as sock:
            sock.sendall(b'{"a": "' + b"x" * (oci_source.MAX_DOCUMENT + 10))
        idle = [_connect(serve) for _ in range(oci_source.MAX_PENDING + 8)]
        try:
            _still_serving(serve)
        finally:
            for sock in idle:
                sock.close()
        deadline = time.monotonic() + 5
        while _fds(serve) > before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _fds(serve) <= before, "serve kept fds of dropped connections"
        assert not [r for r in serve.records("container-adopted")], "a forged document adopted a container"


def test_a_deeply_nested_document_does_not_end_serve(tmp_path: Path) -> None:
    """Hole: the OCI source parsed on the loop thread outside any try: a deeply nested document
    raised RecursionError (not ValueError), which ended serve and released every container.
    Fixed: such a document is refused; no socket callback can end the loop."""
    with oci.serving(tmp_path, allow_policy(tmp_path)) as serve:
        with _connect(serve) as sock:
            sock.sendall(b"[" * 5000)
            _still_serving(serve)


SECRET = b"SECRET-HOST-DATA"


def test_a_killed_serve_leaves_no_grant_on_a_host_loop_device_the_host_reuses(
    tmp_path: Path, bundle_root: Path, images: dict[str, Path]
) -> None:
    """Hole: a SIGKILL of serve left the runtime's v1 device cgroup granting the pool's host loop
    devices and the nodes in /dev/.mountwarden: once autoclear freed a device and the host bound
    it again, the container read the host's data. Fixed: the namespace helper, which outlives
    serve by a death signal, denies the grants and removes the nodes (nshelper.Guard)."""
    secret = tmp_path / "secret.img"
    secret.write_bytes(SECRET * 4096)
    dev_txt, go = bundle_root / "tmp" / "dev.txt", bundle_root / "tmp" / "go"
    script = (
        f"{WAIT_FOR_POOL}; losetup /dev/loop0 /img/data.ext4 && ls -lL /dev/loop0 > /tmp/dev.txt; "
        "while [ ! -e /tmp/go ]; do sleep 0.05; done; "
        f"dd if=/dev/loop0 bs=4096 count=1 2>/dev/null | grep -c {SECRET.decode()}; echo done"
    )
    bundle = tmp_path / "bundle-mw-rt4-kill"
    bundle.mkdir()
    state = tmp_path / "runc-state"
    host_dev = ""
    with oci.serving(tmp_path, allow_policy(tmp_path)) as serve:
        profile = oci_source.profile(None, str(serve.socket), runtime="runc", metadata="redteam4")
        bundle.joinpath("config.json").write_text(
            json.dumps(oci.config(bundle_root, ["/bin/sh", "-c", script], profile, images["ext4"].parent))
        )
        argv = oci.runtime_argv("runc", state, "run", "--bundle", str(bundle), "mw-rt4-kill")
        out_to = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "stdin": subprocess.DEVNULL}
        runc = subprocess.Popen(argv, text=True, **out_to)
        try:
            deadline = time.monotonic() + 20
            while not dev_txt.exists() or not dev_txt.read_text().strip():
                assert time.monotonic() < deadline and runc.poll() is None, "the container did not bind loop0"
                time.sleep(0.05)
            found = re.search(r"(\d+),\s*(\d+)", dev_txt.read_text())
            assert found and found.group(1) == "7", dev_txt.read_text()
            host_dev = f"/dev/loop{found.group(2)}"
            serve.proc.kill()
            serve.proc.wait()
            backing = Path(f"/sys/block/loop{found.group(2)}/loop/backing_file")
            while backing.exists():  # autoclear, once the dead pool's fd is gone
                assert time.monotonic() < deadline, f"{host_dev} stays bound after serve died"
                time.sleep(0.05)
            subprocess.run(["losetup", "-r", host_dev, str(secret)], check=True)  # the host reuses the device
            go.touch()
            out, _ = runc.communicate(timeout=20)
        finally:
            if runc.poll() is None:
                subprocess.run(oci.runtime_argv("runc", state, "kill", "mw-rt4-kill", "KILL"), capture_output=True)
                runc.wait(timeout=20)
            subprocess.run(oci.runtime_argv("runc", state, "delete", "--force", "mw-rt4-kill"), capture_output=True)
            if host_dev:
                subprocess.run(["losetup", "-d", host_dev], capture_output=True)
    assert out.split()[-2:] == ["0", "done"], out
