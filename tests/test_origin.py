"""Policy globs mean the host's files: a container's own binds, moves, mounts or chroot cannot make a
source glob match a file the host does not have at that path (supervisor/origin.py)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import build_image, calls, run_container, write_policy

from supervisor import mountinfo
from supervisor import syscalls as s
from supervisor.origin import Tree

CONTAINER_ROOT = 100000  # host uid of the container's root (the mountwarden subuid range)


@dataclass(frozen=True)
class Place:
    trusted: Path  # root-owned, what the policy trusts: genuine.ext4 lies here
    own: Path  # the container's own directory: evil.ext4 lies here
    mnt: Path


@pytest.fixture
def place(workdir: Path, images: dict[str, Path]) -> Iterator[Place]:
    trusted, own, mnt = workdir / "trusted", workdir / "own", workdir / "origin-mnt"
    for d in (trusted, own, mnt):
        d.mkdir(mode=0o755)
    shutil.copy(images["ext4"], trusted / "genuine.ext4")
    shutil.copy(images["ext4"], own / "evil.ext4")
    for p in (trusted / "genuine.ext4", own / "evil.ext4"):
        p.chmod(0o644)
    for p in (own, own / "evil.ext4"):
        os.chown(p, CONTAINER_ROOT, CONTAINER_ROOT)
    yield Place(trusted, own, mnt)
    for d in (trusted, own, mnt):
        shutil.rmtree(d)


def _policy(tmp_path: Path, place: Place, *, container_sources: bool = False) -> Path:
    match: dict[str, Any] = {"source": f"{place.trusted}/*.ext4"}
    if container_sources:
        match["container_sources"] = True
    return write_policy(tmp_path / "p.yaml", [{"name": "trusted", "match": match, "action": "kernel"}])


def _image_mounts(run: Any) -> list[dict[str, Any]]:
    return [d for d in run.decisions("mount") if d.get("source_origin")]


def test_bind_of_own_image_over_trusted_file_is_not_the_hosts(tmp_path: Path, place: Place, mountcall: Path) -> None:
    genuine = place.trusted / "genuine.ext4"
    script = calls(
        mountcall,
        f"mount {place.own}/evil.ext4 {genuine} - bind",  # native: binds are not intercepted
        f"mount {genuine} {place.mnt} ext4 ro",
        f"umount {genuine}",
        f"mount {genuine} {place.mnt} ext4 ro",  # the host's own file again
        f"umount {place.mnt}",
    )
    run = run_container(tmp_path, script, policy=_policy(tmp_path, place))
    assert run.stdout.splitlines() == ["OK", "EPERM", "OK", "OK", "OK"], run.stderr
    refused, served = _image_mounts(run)
    assert (refused["result"], refused["source_origin"], refused.get("rule")) == ("EPERM", "container", None)
    assert "source made by the container" in refused["reason"]
    assert (served["result"], served["source_origin"], served["rule"]) == ("OK", "host", "trusted")


def test_bind_of_own_directory_over_trusted_directory(tmp_path: Path, place: Place, mountcall: Path) -> None:
    script = calls(
        mountcall,
        f"mount {place.own} {place.trusted} - bind",
        f"mount {place.trusted}/evil.ext4 {place.mnt} ext4 ro",
    )
    run = run_container(tmp_path, script, policy=_policy(tmp_path, place))
    assert run.stdout.splitlines() == ["OK", "EPERM"], run.stderr
    assert [d["source_origin"] for d in _image_mounts(run)] == ["container"]


def test_rule_with_container_sources_accepts_the_containers_file(tmp_path: Path, place: Place, mountcall: Path) -> None:
    script = calls(
        mountcall,
        f"mount {place.own} {place.trusted} - bind",
        f"mount {place.trusted}/evil.ext4 {place.mnt} ext4 ro",
        f"umount {place.mnt}",
    )
    run = run_container(tmp_path, script, policy=_policy(tmp_path, place, container_sources=True))
    assert run.stdout.splitlines() == ["OK", "OK", "OK"], run.stderr
    (served,) = _image_mounts(run)
    assert (served["source_origin"], served["rule"]) == ("container", "trusted")


def test_image_inside_a_supervisor_mount_is_the_containers(
    tmp_path: Path, place: Place, mountcall: Path, images: dict[str, Path]
) -> None:
    """The supervisor's own mount on a trusted path holds the image's bytes, not the host's files."""
    content = tmp_path / "outer"
    content.mkdir()
    shutil.copy(images["squashfs"], content / "inner.sqfs")
    build_image("ext4", content, place.trusted / "outer.ext4", size="16M")
    (place.trusted / "sub").mkdir()
    policy = write_policy(
        tmp_path / "p.yaml", [{"name": "trusted-tree", "match": {"source": f"{place.trusted}/**"}, "action": "kernel"}]
    )
    script = calls(
        mountcall,
        f"mount {place.trusted}/outer.ext4 {place.trusted}/sub ext4 ro",
        f"mount {place.trusted}/sub/inner.sqfs {place.mnt} squashfs ro",
        f"umount {place.trusted}/sub",
    )
    run = run_container(tmp_path, script, policy=policy)
    assert run.stdout.splitlines() == ["OK", "EPERM", "OK"], run.stderr
    assert [d["source_origin"] for d in _image_mounts(run)] == ["host", "container"]


def test_chroot_into_a_lookalike_tree_is_not_the_hosts(tmp_path: Path, place: Place, mountcall: Path) -> None:
    """No mount at all: a chroot makes the trusted path name the container's file."""
    fake = place.own / "root"
    inside = fake / str(place.trusted).lstrip("/")
    script = [
        "/bin/sh",
        "-c",
        f"mkdir -p {inside} {fake}/mnt && cp {place.own}/evil.ext4 {inside}/genuine.ext4 && "
        f"cp {mountcall} {fake}/mountcall && chroot {fake} /mountcall mount {place.trusted}/genuine.ext4 /mnt ext4 ro",
    ]
    run = run_container(tmp_path, script, policy=_policy(tmp_path, place))
    assert run.stdout.splitlines() == ["EPERM"], run.stderr
    assert [d["source_origin"] for d in _image_mounts(run)] == ["container"]


def test_loop_device_is_judged_when_bound(tmp_path: Path, place: Place, mountcall: Path) -> None:
    """Bound through a bind that is gone by mount time: the path now names the host's file, the device does not."""
    genuine, mc = place.trusted / "genuine.ext4", str(mountcall)
    script = [
        "/bin/sh",
        "-c",
        f"{mc} mount {place.own}/evil.ext4 {genuine} - bind; "
        f"losetup /dev/loop0 {genuine}; "
        f"{mc} umount {genuine} detach; "  # the loop device holds the file: busy
        f"{mc} mount /dev/loop0 {place.mnt} ext4 ro; "
        f"losetup -r /dev/loop1 {genuine}; "  # the host's file, bound directly
        f"{mc} mount /dev/loop1 {place.mnt} ext4 ro; {mc} umount {place.mnt}; "
        "losetup -d /dev/loop0; losetup -d /dev/loop1",
    ]
    run = run_container(tmp_path, script, policy=_policy(tmp_path, place))
    assert run.stdout.splitlines() == ["OK", "OK", "EPERM", "OK", "OK"], run.stderr
    binds = [d for d in run.decisions() if d.get("op") in ("LOOP_SET_FD", "LOOP_CONFIGURE")]
    assert [(d["backing_file"], d["source_origin"]) for d in binds] == [
        (str(genuine), "container"),
        (str(genuine), "host"),
    ]
    refused, served = _image_mounts(run)
    assert (refused["result"], refused["source_origin"], refused["backing_file"]) == (
        "EPERM",
        "container",
        str(genuine),
    )
    assert (served["result"], served["source_origin"]) == ("OK", "host")


def test_deleted_backing_file_matches_no_source_glob(tmp_path: Path, place: Place, mountcall: Path) -> None:
    """Bound from an fd whose file lost its name: no glob can say which file that was."""
    victim = place.own / "gone.ext4"
    policy = write_policy(
        tmp_path / "p.yaml",
        [{"name": "any", "match": {"source": "/**", "container_sources": True}, "action": "kernel"}],
    )
    bind_unlinked = (
        "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); os.unlink(sys.argv[1]); "
        "fcntl.ioctl(os.open('/dev/loop0', os.O_RDONLY), 0x4C00, fd)"  # LOOP_SET_FD
    )
    script = [
        "/bin/sh",
        "-c",
        f'cp {place.own}/evil.ext4 {victim} && /usr/bin/python3 -c "{bind_unlinked}" {victim} && '
        f"{mountcall} mount /dev/loop0 {place.mnt} ext4 ro; losetup -d /dev/loop0",
    ]
    run = run_container(tmp_path, script, policy=policy)
    assert run.stdout.splitlines() == ["EPERM"], run.stderr
    (bound,) = [d for d in run.decisions() if d.get("op") == "LOOP_SET_FD"]
    assert (bound["backing_file"], bound["source_origin"]) == (f"{victim} (deleted)", "deleted")
    (refused,) = _image_mounts(run)
    assert refused["source_origin"] == "deleted"


def test_move_of_an_original_mount_cannot_lead_a_trusted_path_into_it(
    tmp_path: Path, rootfs: Path, mountcall: Path
) -> None:
    """The staged /tmp of a --rootfs container is an original mount the container can write to."""
    policy = write_policy(tmp_path / "p.yaml", [{"name": "img", "match": {"source": "/img/*"}, "action": "kernel"}])
    script = [
        "/bin/sh",
        "-c",
        "cp /img/data.ext4 /tmp/evil.ext4; mount --move /tmp /img 2>/dev/null && echo moved || echo not-moved; "
        "/bin/mountcall mount /img/evil.ext4 /mnt ext4 ro",
    ]
    run = run_container(tmp_path, script, policy=policy, rootfs=rootfs)
    # The kernel refuses to move a mount it locked; where it would not, policy refuses the image.
    assert run.stdout.splitlines() in (["not-moved", "ENOENT"], ["moved", "EPERM"]), run.stderr


# --- the judge on the real kernel, in a private mount namespace of the test ------------------------


def _in_private_namespace(work: Callable[[Path], dict[str, Any]], where: Path) -> dict[str, Any]:
    """Run `work` in a child with a mount namespace of its own (nothing locked, every move allowed)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(read)
        try:
            s.unshare(s.CLONE_NEWNS)
            s.mount(None, "/", None, s.MS_REC | s.MS_PRIVATE)
            result = work(where)
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            result = {"error": repr(exc)}
        os.write(write, json.dumps(result).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    result: dict[str, Any] = json.loads(data)
    assert "error" not in result, result["error"]
    return result


def _judge(tree: Tree, path: Path) -> str:
    proc = os.open("/proc/self", os.O_PATH | os.O_DIRECTORY)
    root = os.open("/", os.O_PATH | os.O_DIRECTORY)
    fd = os.open(path, os.O_PATH)
    try:
        return tree.judge(proc_fd=proc, root_fd=root, fd=fd, path=str(path))
    finally:
        for held in (proc, root, fd):
            os.close(held)


def _moves_and_reuse(d: Path) -> dict[str, Any]:
    for sub in ("a", "b", "c"):
        (d / sub).mkdir()
    s.mount("tmpfs", str(d / "a"), "tmpfs", 0, "size=1m")
    (d / "a" / "f").write_text("original")
    (d / "c" / "hidden").write_text("under c")
    s.mount("tmpfs", str(d / "c"), "tmpfs", 0, "size=1m")
    tree = Tree.take(os.getpid())
    out = {"original": _judge(tree, d / "a" / "f")}
    s.mount(str(d / "a"), str(d / "b"), None, s.MS_MOVE)
    out["moved"] = _judge(tree, d / "b" / "f")
    s.mount(str(d / "b"), str(d / "a"), None, s.MS_MOVE)
    out["moved back"] = _judge(tree, d / "a" / "f")
    s.umount2(str(d / "c"))
    out["hidden file under an original mount"] = _judge(tree, d / "c" / "hidden")
    s.mount("tmpfs", str(d / "c"), "tmpfs", 0, "size=1m")  # likely gets the freed mount id again
    (d / "c" / "new").write_text("new")
    out["new mount on the old place"] = _judge(tree, d / "c" / "new")
    s.mount(str(d / "a"), str(d / "b"), None, s.MS_BIND)
    out["bind of an original"] = _judge(tree, d / "b" / "f")
    return out


def test_judge_follows_moves_hidden_files_and_reused_ids(tmp_path: Path) -> None:
    assert _in_private_namespace(_moves_and_reuse, tmp_path) == {
        "original": "host",
        "moved": "container",
        "moved back": "host",
        "hidden file under an original mount": "container",
        "new mount on the old place": "container",
        "bind of an original": "container",
    }


def test_owner_walks_the_recorded_tree() -> None:
    m = mountinfo.Mount
    mounts = {
        1: m(1, 0, 1, "/", "/", "rw", "ext4", "/dev/vda"),
        2: m(2, 1, 2, "/", "/srv", "rw", "xfs", "/dev/vdb"),
        3: m(3, 2, 3, "/", "/srv", "rw", "tmpfs", "tmpfs"),  # stacked over 2
        4: m(4, 1, 4, "/", "/srv/img", "rw", "tmpfs", "tmpfs"),  # hidden: its parent's /srv is covered
        5: m(5, 1, 5, "/", "/", "rw", "tmpfs", "tmpfs"),  # over the root itself: lookups never enter it
        6: m(6, 1, 6, "/", "/two", "rw", "tmpfs", "tmpfs"),
        7: m(7, 1, 7, "/", "/two", "rw", "tmpfs", "tmpfs"),  # two on one place under one parent
    }
    tree = Tree.of(mounts, {}, 1, (0, 0))
    owners = {p: getattr(tree.owner(p), "mnt_id", None) for p in ("/", "/etc/x", "/srv/img/x", "/srvx", "/two/x")}
    assert owners == {"/": 1, "/etc/x": 1, "/srv/img/x": 3, "/srvx": 1, "/two/x": None}


def test_mountinfo_parser_reads_escapes_and_optional_fields() -> None:
    text = (
        "36 35 98:0 /mnt1 /mnt\\0402 rw,noatime master:1 shared:2 - ext3 /dev/root rw,errors=continue\n"
        "37 36 0:5 / /a\\134b\\011c\\012d rw - tmpfs tmp\\040fs rw\n"
    )
    first, second = mountinfo.parse(text).values()
    assert (first.mnt_id, first.parent_id, first.dev, first.root) == (36, 35, os.makedev(98, 0), "/mnt1")
    assert (first.mount_point, first.fstype, first.source) == ("/mnt 2", "ext3", "/dev/root")
    assert (second.mount_point, second.source) == ("/a\\b\tc\nd", "tmp fs")
    with pytest.raises(Exception, match="cannot parse the mountinfo line"):
        mountinfo.parse("36 35 98:0 / / rw no-separator\n")
