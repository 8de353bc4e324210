"""Issue 9 (#3, #7, #8, #9): root in a container puts host files in the supervisor's way; the host stays as it was.

Each test is the attack a container's root performs through `mountwarden run`: binds of host
files and directories over entries of its /dev and /sys views, a FIFO there, a RENAME_EXCHANGE
race under an unmount, a tmpfs over its /dev with a node of a host loop device planted behind
/dev/loopN. The supervisor works in its own copies of those trees, makes superblocks from the
devices it holds and unmounts as the container's root, so none of it reaches the host.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import allow_policy, build_image, make_tree, mountwarden, run_container

CONTAINER_ROOT = 100000  # the host uid of the container's root (run's default id range)
LOOP_CTL_REMOVE = 0x4C81


def _sh(*lines: str) -> list[str]:
    return ["/bin/sh", "-c", "\n".join(lines)]


def _state(root: Path) -> dict[str, tuple[int, int, int, bytes]]:
    """Every entry under `root` with its mode, owner and content: what an attack must not change."""
    out = {}
    for path in [root, *sorted(root.rglob("*"))]:
        st = path.lstat()
        data = path.read_bytes() if stat.S_ISREG(st.st_mode) else b""
        out[str(path.relative_to(root))] = (st.st_mode, st.st_uid, st.st_gid, data)
    return out


@pytest.fixture
def victims(workdir: Path) -> Iterator[Path]:
    """Root-owned host files and directories, readable by everyone, that the container will bind."""
    root = workdir / "victims"
    root.mkdir(mode=0o755)
    for name in ("dir-a", "dir-b", "dir-c"):
        make_tree(root / name, {"keep.txt": f"host {name}\n", "sub/deep.txt": "deep\n"})
    (root / "file").write_text("host file\n")
    (root / "file").chmod(0o644)
    subprocess.run(["chmod", "-R", "a+rX", str(root)], check=True)
    yield root
    shutil.rmtree(root)


@pytest.fixture
def ct_dir(workdir: Path) -> Iterator[Path]:
    """A directory the container's root owns."""
    path = workdir / "ct-owned"
    path.mkdir(mode=0o755)
    os.chown(path, CONTAINER_ROOT, CONTAINER_ROOT)
    yield path
    shutil.rmtree(path)


def test_binds_over_the_sys_view_do_not_reach_host_files(
    tmp_path: Path, victims: Path, images: dict[str, Path], mountcall: Path
) -> None:
    """#7: LOOP_CTL_REMOVE, LOOP_CLR_FD and the container's exit with host binds over its /sys view."""
    before, mc, ext4 = _state(victims), str(mountcall), images["ext4"]
    script = _sh(
        f"losetup /dev/loop3 {ext4} && echo bound3",
        f"{mc} mount {victims}/dir-a /sys/block/loop3/loop - bind",
        f"{mc} mount {victims}/file /sys/block/loop3/size - bind",
        "losetup -d /dev/loop3 && echo cleared3",  # LOOP_CLR_FD: the view of loop3 is emptied and rewritten
        f"{mc} mount {victims}/dir-b /sys/block/loop5 - bind",
        f"{mc} ioctl-arg /dev/loop-control {LOOP_CTL_REMOVE} 5",  # the view of loop5 is removed
        f"losetup /dev/loop2 {ext4} && echo bound2",
        f"{mc} mount {victims}/dir-c /sys/block/loop2/queue - bind",
        f"{mc} mount {victims}/file /sys/block/loop2/loop/backing_file - bind",
        "cat /sys/block/loop2/loop/backing_file",  # the container sees its own bind, as it asked
    )  # ... and exits with loop2 bound under those binds: the session's release empties the view
    run = run_container(tmp_path, script, policy=allow_policy(tmp_path))
    assert run.stdout.splitlines() == [
        "bound3", "OK", "OK", "cleared3", "OK", "OK 0", "bound2", "OK", "OK", "host file",
    ], run.stderr  # fmt: skip
    assert _state(victims) == before


def test_racing_binds_over_new_dev_nodes_leave_host_modes_alone(
    tmp_path: Path, victims: Path, images: dict[str, Path], mountcall: Path
) -> None:
    """#8: a host file bound over the names where the pool makes new nodes, while it makes them, again and again."""
    before, mc, ext4 = _state(victims), str(mountcall), images["ext4"]
    script = _sh(
        f"{mc} bind-race {victims}/file /dev/.mountwarden/loop0 6 &",
        f"{mc} bind-race {victims}/file /dev/.loop0.new 6 &",  # the name the pool used before
        "for i in $(seq 60); do losetup /dev/loop0 " + str(ext4) + " && losetup -d /dev/loop0 || echo failed; done",
        "wait",
        "stat -c '%a %u' /dev/loop0",
    )
    run = run_container(tmp_path, script, policy=allow_policy(tmp_path), timeout=120)
    lines = run.stdout.splitlines()
    assert "failed" not in lines and lines[-1] == "660 0", run.stdout + run.stderr
    assert sorted(lines[:2]) == ["OK binds=0", "OK binds=0"], lines  # the staging directory is host root's, 0700
    assert _state(victims) == before


def test_a_fifo_over_a_view_entry_does_not_block_the_supervisor(
    tmp_path: Path, ct_dir: Path, images: dict[str, Path], mountcall: Path
) -> None:
    """A FIFO bound over /sys/block/loop1/size: binding and clearing loop1 still answer at once."""
    mc, fifo = str(mountcall), ct_dir / "fifo"
    script = _sh(
        f"mkfifo {fifo}",
        f"{mc} mount {fifo} /sys/block/loop1/size - bind",
        f"{mc} mount {fifo} /sys/block/loop1/removable - bind",
        f"losetup /dev/loop1 {images['ext4']} && echo bound",
        "losetup -d /dev/loop1 && echo cleared",
    )
    run = run_container(tmp_path, script, policy=allow_policy(tmp_path), timeout=30)
    assert run.stdout.splitlines() == ["OK", "OK", "bound", "cleared"], run.stderr


@pytest.fixture
def host_fuse(workdir: Path, images: dict[str, Path]) -> Iterator[Path]:
    """A host FUSE mount (squashfuse, allow_other) the container can see and bind."""
    point = workdir / "host-fuse"
    point.mkdir(mode=0o755)
    subprocess.run(["squashfuse", "-o", "allow_other", str(images["squashfs"]), str(point)], check=True)
    try:
        yield point
    finally:
        subprocess.run(["umount", str(point)], check=False)
        point.rmdir()


def test_unmount_races_cannot_force_a_host_fuse_mount(
    tmp_path: Path, host_fuse: Path, ct_dir: Path, images: dict[str, Path], mountcall: Path
) -> None:
    """#9: umount2 of the supervisor's mount, MNT_FORCE, while the path is swapped to a bind of a host FUSE mount."""
    mc, a, b = str(mountcall), ct_dir / "a", ct_dir / "b"
    script = _sh(
        f"mkdir -p {a}/m {b}/m",
        f"{mc} mount {host_fuse} {b}/m - bind",
        f"{mc} mount {images['ext4']} {a}/m ext4 ro",
        f"{mc} umount {a}/m force",  # the kernel's answer to the container: MNT_FORCE needs host root
        f"{mc} umount-race {a}/m force {a} {b} 300",
        f"cat {a}/m/pub.txt {b}/m/pub.txt",
        f"{mc} umount-race {a}/m 0 {a} {b} 300",  # unforced: each call unmounts one of the two, as the container may
    )
    run = run_container(tmp_path, script, policy=allow_policy(tmp_path), timeout=60)
    lines = run.stdout.splitlines()
    assert lines[:5] == ["OK", "OK", "EPERM", "OK unmounted=0 refused=300", "public"], run.stdout + run.stderr
    assert (host_fuse / "pub.txt").read_text() == "public\n"  # the host's FUSE connection is alive


@pytest.fixture
def host_loop(workdir: Path) -> Iterator[tuple[str, Path]]:
    """A host loop device the container must never reach, and a node of it planted in a readable directory."""
    image = build_image("ext4", make_tree(workdir / "victim-src", {"victim.txt": "victim\n"}), workdir / "victim.ext4")
    device = subprocess.run(["losetup", "-f", "--show", "-r", str(image)], capture_output=True, text=True, check=True)
    node_dir = workdir / "planted"
    node_dir.mkdir(mode=0o755)
    rdev = os.stat(device.stdout.strip()).st_rdev
    os.mknod(node_dir / "node", stat.S_IFBLK | 0o600, rdev)
    try:
        yield device.stdout.strip(), node_dir / "node"
    finally:
        subprocess.run(["losetup", "-d", device.stdout.strip()], check=True)
        shutil.rmtree(node_dir)
        shutil.rmtree(workdir / "victim-src")
        image.unlink()


def test_a_planted_dev_loop_node_is_not_what_gets_mounted(
    tmp_path: Path, host_loop: tuple[str, Path], images: dict[str, Path], mountcall: Path, mnt: Path
) -> None:
    """#3: a tmpfs over /dev with /dev/loop0 leading to a host loop device, then `mount image`."""
    mc, (device, node) = str(mountcall), host_loop
    script = _sh(
        f"{mc} mount none /dev tmpfs 0",
        f"ln -s {node} /dev/loop0",
        f"{mc} mount {images['ext4']} {mnt} ext4 ro",
        f"cat {mnt}/pub.txt; ls {mnt}/victim.txt 2>&1 | grep -c 'No such'",
        f"grep ' {mnt} ' /proc/self/mountinfo | sed 's/.* - //'",
        f"{mc} umount {mnt}",
    )
    run = run_container(tmp_path, script, policy=allow_policy(tmp_path))
    assert run.stdout.splitlines() == ["OK", "OK", "public", "1", "ext4 /dev/loop0 ro", "OK"], run.stderr
    mounted = [line.split()[0] for line in Path("/proc/self/mounts").read_text().splitlines()]
    assert device not in mounted


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def test_helpers_are_named_and_keep_only_the_capabilities_they_use(tmp_path: Path, mountcall: Path) -> None:
    """`ps` tells the helpers apart; each runs with no_new_privs and a trimmed capability set."""
    log = tmp_path / "audit.log"
    cmd = [*mountwarden("run", "--audit-log", str(log), "--"), str(mountcall), "wait"]
    with subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "READY"
            children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
            helpers = {_status(int(pid))["Name"]: int(pid) for pid in children}
            assert {"mw-nshelper", "mw-minter"} <= set(helpers), helpers
            cap = {"CAP_CHOWN": 0, "CAP_SETGID": 6, "CAP_SETUID": 7, "CAP_SYS_ADMIN": 21, "CAP_MKNOD": 27}
            expected = {
                "mw-nshelper": (1 << cap["CAP_SYS_ADMIN"]) | (1 << cap["CAP_SETUID"]) | (1 << cap["CAP_SETGID"])
                | (1 << cap["CAP_CHOWN"]),
                "mw-minter": (1 << cap["CAP_SYS_ADMIN"]) | (1 << cap["CAP_MKNOD"]),
            }
            for name, mask in expected.items():
                status = _status(helpers[name])
                assert status["NoNewPrivs"] == "1"
                assert int(status["CapEff"], 16) == int(status["CapBnd"], 16) == mask, (name, status)
            own_ns = os.readlink("/proc/self/ns/mnt")
            minter_ns = os.readlink(f"/proc/{helpers['mw-minter']}/ns/mnt")
            helper_ns = os.readlink(f"/proc/{helpers['mw-nshelper']}/ns/mnt")
            assert len({own_ns, minter_ns, helper_ns}) == 3  # the minter's /dev is its own
        finally:
            proc.communicate("\n", timeout=30)
    assert proc.returncode == 0
