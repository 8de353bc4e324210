"""Device cgroups: each mechanism the host has (v1 devices.allow, v2 BPF program and map) refuses
devices off the allow list, and grants and revocations made later take effect."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import calls, run_container

from supervisor import cgroup

TUN = (10, 200)  # not on the allow list; the node is world-accessible, so only the cgroup refuses it


@pytest.fixture
def nodes(workdir: Path) -> Iterator[dict[str, Path]]:
    paths = {"null": workdir / "dev-null", "tun": workdir / "dev-tun"}
    os.mknod(paths["null"], 0o20666, os.makedev(1, 3))
    os.mknod(paths["tun"], 0o20666, os.makedev(*TUN))
    for p in paths.values():
        p.chmod(0o666)
    yield paths
    for p in paths.values():
        p.unlink()


def _open_in(group: cgroup.DeviceCgroup, path: Path) -> str:
    """Open `path` from a child that is a member of `group` only: OK or the errno name."""
    go_r, go_w = os.pipe()
    out_r, out_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os.close(go_w)
        os.read(go_r, 1)
        try:
            os.close(os.open(path, os.O_RDWR))
            os.write(out_w, b"OK")
        except OSError as exc:
            os.write(out_w, os.strerror(exc.errno or 0).encode())
        os._exit(0)
    os.close(go_r)
    os.close(out_w)
    try:
        group.add(pid)
        os.write(go_w, b"x")
        return os.read(out_r, 200).decode()
    finally:
        os.close(go_w)
        os.close(out_r)
        os.waitpid(pid, 0)


def test_every_mechanism_refuses_devices_off_the_list(nodes: dict[str, Path]) -> None:
    groups = cgroup.create("test")
    assert groups, "this machine has a device cgroup mechanism"
    try:
        for group in groups:
            assert _open_in(group, nodes["null"]) == "OK", group.path
            assert _open_in(group, nodes["tun"]) == os.strerror(1), group.path  # EPERM
            group.allow(("c", *TUN))
            assert _open_in(group, nodes["tun"]) != os.strerror(1), group.path  # no longer the cgroup's refusal
            group.deny(("c", *TUN))
            assert _open_in(group, nodes["tun"]) == os.strerror(1), group.path
    finally:
        for group in groups:
            group.remove()


def test_container_cannot_open_devices_off_the_list(tmp_path: Path, nodes: dict[str, Path], mountcall: Path) -> None:
    run = run_container(tmp_path, calls(mountcall, f"open {nodes['null']} rw", f"open {nodes['tun']} rw"))
    assert run.stdout.split() == ["OK", "EPERM"]
