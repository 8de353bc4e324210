"""`mountwarden serve` for OCI runtimes: real runc and crun containers, `listenerPath`.

Each test runs the runtime's container in the foreground against a real `serve`; inside, the
container's own tools (busybox) mount images through its private loop pool.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import oci
import pytest
from conftest import allow_policy, write_policy

from supervisor.sources import oci as oci_source

RUNTIMES = ["runc", "crun"]
# A runtime lets the container run while it hands the listener over: the pool's nodes appear
# a few milliseconds later (docs/runtimes.md).
WAIT_FOR_POOL = "i=0; while [ ! -e /dev/loop-control ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done"


@pytest.fixture
def bundle_root(tmp_path: Path, workdir: Path, mountcall: Path) -> Iterator[Path]:
    """The container's root, where its root may walk (pytest's own directories are 0700)."""
    root = oci.rootfs(workdir / f"oci-root-{tmp_path.name}", mountcall)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _profile(serve: oci.Serve, runtime: str) -> dict[str, object]:
    return oci_source.profile(None, str(serve.socket), runtime=runtime, metadata="mountwarden-test")


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_mount_o_loop_inside_a_runtime_container_uses_its_private_pool(
    runtime: str, tmp_path: Path, bundle_root: Path, images: dict[str, Path]
) -> None:
    script = (
        f"{WAIT_FOR_POOL}; mount -o loop,ro /img/data.ext4 /mnt && cat /mnt/pub.txt; "
        "losetup -a | wc -l; ls -l /dev/loop0 | grep -c .mountwarden/loop0; "
        "grep ' /mnt ' /proc/self/mountinfo | grep -c nosuid,nodev; umount /mnt && echo unmounted"
    )
    with oci.serving(tmp_path, allow_policy(tmp_path)) as serve:
        cfg = oci.config(bundle_root, ["/bin/sh", "-c", script], _profile(serve, runtime), images["ext4"].parent)
        run = oci.run(runtime, tmp_path, f"mw-{runtime}-loop", cfg)
        assert run.returncode == 0, run.stderr
        assert run.stdout.split() == ["public", "1", "1", "1", "unmounted"], run.stdout + run.stderr
        mounts = [r for r in serve.records() if r.get("syscall") == "mount"]
        assert mounts and mounts[-1]["action"] == "kernel" and mounts[-1]["result"] == "OK", mounts
        assert mounts[-1]["container"] == f"mw-{runtime}-loop"
        serve.wait_for("container-released")


def test_a_fuse_handoff_in_a_runtime_container(tmp_path: Path, bundle_root: Path, images: dict[str, Path]) -> None:
    """The jailed daemon joins the runtime's container (its namespaces and device cgroup) and its
    superblock reaches the container's target; the daemon ends with the unmount."""
    rule = {"name": "via-fuse", "match": {"target": "/**"}, "action": "fuse", "options": ["noexec"]}
    policy = write_policy(tmp_path / "fuse.yaml", [rule])
    script = (
        f"{WAIT_FOR_POOL}; mount -o loop,ro /img/data.ext4 /mnt && cat /mnt/pub.txt; "
        "grep ' /mnt ' /proc/self/mountinfo | cut -d' ' -f6; grep ' /mnt ' /proc/self/mountinfo | sed 's/.* - //'; "
        "umount /mnt && echo unmounted"
    )
    with oci.serving(tmp_path, policy) as serve:
        cfg = oci.config(bundle_root, ["/bin/sh", "-c", script], _profile(serve, "runc"), images["ext4"].parent)
        run = oci.run("runc", tmp_path, "mw-runc-fuse", cfg)
        assert run.returncode == 0, run.stderr
        lines = run.stdout.splitlines()
        assert lines[0] == "public" and lines[-1] == "unmounted", run.stdout + run.stderr
        options, fstype = lines[1], lines[2].split()[0]
        assert fstype.startswith("fuse") and {"ro", "nosuid", "nodev", "noexec"} <= set(options.split(",")), lines
        mount = [r for r in serve.records() if r.get("syscall") == "mount" and r.get("caller") != "fuse-daemon"][-1]
        assert mount["action"] == "fuse" and mount["result"] == "OK", mount
        serve.wait_for("container-released")


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_a_write_to_a_read_write_image_reaches_the_image(
    runtime: str, tmp_path: Path, workdir: Path, bundle_root: Path, images: dict[str, Path]
) -> None:
    """The container's root opens the image read-write itself; what it writes is in the file afterwards."""
    own = workdir / f"oci-rw-{tmp_path.name}"
    own.mkdir()
    image = own / "rw.ext4"
    shutil.copy(images["ext4"], image)
    image.chmod(0o666)
    script = (
        f"{WAIT_FOR_POOL}; mount -o loop /img/rw.ext4 /mnt && echo written-inside > /mnt/new.txt && umount /mnt "
        "&& mount -o loop,ro /img/rw.ext4 /mnt && cat /mnt/new.txt && umount /mnt"
    )
    try:
        with oci.serving(tmp_path, allow_policy(tmp_path)) as serve:
            cfg = oci.config(bundle_root, ["/bin/sh", "-c", script], _profile(serve, runtime), own, rw_images=True)
            run = oci.run(runtime, tmp_path, f"mw-{runtime}-rw", cfg)
            assert run.returncode == 0 and run.stdout.split() == ["written-inside"], run.stdout + run.stderr
        shown = subprocess.run(["debugfs", "-R", "cat /new.txt", str(image)], capture_output=True, text=True)
        assert shown.stdout.strip() == "written-inside", shown.stderr
    finally:
        shutil.rmtree(own, ignore_errors=True)
