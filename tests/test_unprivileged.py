"""`mountwarden run` by an ordinary host user, served by a running `mountwarden serve` (issue 11).

The user is a real unprivileged account; the container is its own user namespace mapping 0 to
the user alone; the policy selects rules by the user's host uid.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import oci
import pytest
from conftest import write_policy
from test_oci import WAIT_FOR_POOL

from supervisor.sources import oci as oci_source

USER = "mountwarden-user"


@pytest.fixture(scope="session")
def ordinary_user() -> pwd.struct_passwd:
    """An ordinary account (made once on this machine if it is missing)."""
    try:
        return pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/bin/sh", USER], check=True)
        return pwd.getpwnam(USER)


@pytest.fixture
def place(workdir: Path, tmp_path: Path, images: dict[str, Path]) -> Iterator[Path]:
    """A directory every user may walk: the images, the control socket."""
    where = workdir / f"user-{tmp_path.name}"
    where.mkdir(mode=0o755)
    for kind in ("ext4", "squashfs"):
        shutil.copy(images[kind], where / f"data.{kind}")
        (where / f"data.{kind}").chmod(0o644)
    yield where
    shutil.rmtree(where, ignore_errors=True)


def _as_user(user: pwd.struct_passwd, *argv: str) -> subprocess.CompletedProcess[str]:
    inner = " ".join(f"'{a}'" for a in argv)
    cmd = ["su", "-s", "/bin/sh", user.pw_name, "-c", f"cd / && {inner}"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def test_an_ordinary_user_mounts_an_image_under_the_rules_for_its_uid(
    ordinary_user: pwd.struct_passwd, place: Path, tmp_path: Path
) -> None:
    uid = ordinary_user.pw_uid
    rules = [
        {"name": "this-user-ext4", "containers": {"host_uid": [uid]},
         "match": {"source": f"{place}/*.ext4", "target": "/**"}, "action": "kernel"},
        {"name": "another-user-squashfs", "containers": {"host_uid": [uid + 1]},
         "match": {"source": f"{place}/*.squashfs", "target": "/**"}, "action": "kernel"},
    ]  # fmt: skip
    policy = write_policy(tmp_path / "users.yaml", rules)
    script = (
        f"id -u; mount -o loop,ro {place}/data.ext4 /mnt && cat /mnt/pub.txt; losetup -a | wc -l; umount /mnt "
        f"&& echo unmounted; mount -o loop,ro {place}/data.squashfs /mnt 2>/dev/null || echo refused"
    )
    with oci.serving(tmp_path, policy, control=place / "control.sock") as serve:
        run = _as_user(
            ordinary_user, *oci.mountwarden_argv(), "run", "--name", "mine", "--control-socket",
            str(place / "control.sock"), "--", "/bin/sh", "-c", script,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        assert run.stdout.split() == ["0", "public", "1", "unmounted", "refused"], run.stdout + run.stderr
        mounts = [r for r in serve.records() if r.get("syscall") == "mount" and r.get("fstype") != "proc"]
        assert [(m.get("rule"), m["result"]) for m in mounts] == [("this-user-ext4", "OK"), (None, "EPERM")], mounts
        adopted = serve.wait_for("container-adopted")
        assert adopted[-1]["key"] == f"user:{uid}:mine" and adopted[-1]["host_uid"] == uid, adopted
        serve.wait_for("container-released")


def test_an_ordinary_users_device_mounted_twice_is_one_filesystem_and_clears_at_last_unmount(
    ordinary_user: pwd.struct_passwd, place: Path, tmp_path: Path
) -> None:
    """In an ordinary user's container a kernel mount is made from a private device bound to the
    judged file (LoopPool.mount_device), not from /dev/loop0 itself: still, as natively, two
    mounts of /dev/loop0 are one filesystem, and a `losetup -d` while mounted waits for the last
    unmount."""
    rules = [{"name": "this-user-ext4", "containers": {"host_uid": [ordinary_user.pw_uid]},
              "match": {"source": f"{place}/*.ext4", "target": "/**"}, "action": "kernel"}]  # fmt: skip
    policy = write_policy(tmp_path / "users.yaml", rules)
    script = (
        f"losetup -r /dev/loop0 {place}/data.ext4 && mkdir -p /tmp/a /tmp/b && mount -o ro /dev/loop0 /tmp/a "
        "&& mount -o ro /dev/loop0 /tmp/b && touch /tmp/a/x 2>/dev/null; "
        "[ $(stat -c %d /tmp/a) = $(stat -c %d /tmp/b) ] && echo one-filesystem; cat /tmp/b/pub.txt; "
        "losetup -d /dev/loop0; losetup -a | wc -l; umount /tmp/a /tmp/b; losetup -a | wc -l"
    )
    with oci.serving(tmp_path, policy, control=place / "control.sock"):
        run = _as_user(
            ordinary_user, *oci.mountwarden_argv(), "run", "--name", "twice", "--control-socket",
            str(place / "control.sock"), "--", "/bin/sh", "-c", script,
        )  # fmt: skip
    assert run.stdout.split() == ["one-filesystem", "public", "1", "0"], run.stdout + run.stderr


def test_run_as_an_ordinary_user_says_what_it_needs(ordinary_user: pwd.struct_passwd, place: Path) -> None:
    missing = _as_user(ordinary_user, *oci.mountwarden_argv(), "run", "--control-socket", str(place / "none.sock"),
                       "--", "/bin/true")  # fmt: skip
    assert missing.returncode == 126 and "needs a running `mountwarden serve`" in missing.stderr, missing.stderr
    policy = _as_user(ordinary_user, *oci.mountwarden_argv(), "run", "--policy", "/etc/x.yaml", "--", "/bin/true")
    assert policy.returncode == 2 and "--policy need root" in policy.stderr, policy.stderr


def test_an_ordinary_users_rootless_runc_container_is_served_for_that_user(
    ordinary_user: pwd.struct_passwd, place: Path, tmp_path: Path, mountcall: Path
) -> None:
    """The runtime runs as the user and connects to the OCI socket opened to users (--oci-users):
    serve takes only a container in a user namespace that user owns, under the rules for its uid."""
    uid, gid = ordinary_user.pw_uid, ordinary_user.pw_gid
    rules = [{"name": "this-user-ext4", "containers": {"host_uid": [uid]},
              "match": {"source": "/img/*.ext4", "target": "/**"}, "action": "kernel"}]  # fmt: skip
    policy = write_policy(tmp_path / "users.yaml", rules)
    root = oci.rootfs(place / "rootfs", mountcall, owner=f"{uid}:{gid}")
    script = f"{WAIT_FOR_POOL}; mount -o loop,ro /img/data.ext4 /mnt && cat /mnt/pub.txt; umount /mnt && echo unmounted"
    with oci.serving(tmp_path, policy, control=place / "control.sock", oci_socket=place / "oci.sock",
                     extra=["--oci-users"]) as serve:  # fmt: skip
        profile = oci_source.profile(None, str(place / "oci.sock"), runtime="runc")
        cfg = oci.config(root, ["/bin/sh", "-c", script], profile, place, ids=(uid, gid), rootless=True)
        bundle = place / "bundle"
        bundle.mkdir()
        (bundle / "config.json").write_text(json.dumps(cfg))
        subprocess.run(["chown", "-R", f"{uid}:{gid}", str(bundle)], check=True)
        state = place / "state"
        state.mkdir()
        os.chown(state, uid, gid)
        run = _as_user(ordinary_user, "runc", "--root", str(state), "run", "--bundle", str(bundle), "mine")
        _as_user(ordinary_user, "runc", "--root", str(state), "delete", "--force", "mine")
        assert run.returncode == 0 and run.stdout.split() == ["public", "unmounted"], run.stdout + run.stderr
        adopted = serve.wait_for("container-adopted")
        assert adopted[-1]["key"] == f"oci:{uid}:mine" and adopted[-1]["host_uid"] == uid, adopted
        serve.wait_for("container-released")


SUBID_USER = "mountwarden-subids"


@pytest.fixture(scope="session")
def subid_user() -> pwd.struct_passwd:
    """An ordinary account with subordinate ids (made once on this machine if it is missing)."""
    try:
        pwd.getpwnam(SUBID_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/bin/sh", SUBID_USER], check=True)
    for path, flag in (("/etc/subuid", "--add-subuids"), ("/etc/subgid", "--add-subgids")):
        if not any(line.startswith(f"{SUBID_USER}:") for line in Path(path).read_text().splitlines()):
            subprocess.run(["usermod", flag, "400000-465535", SUBID_USER], check=True)
    return pwd.getpwnam(SUBID_USER)


@pytest.mark.skipif(shutil.which("newuidmap") is None, reason="uidmap (newuidmap) is not installed")
def test_a_user_with_subordinate_ids_gets_them_in_its_container(
    subid_user: pwd.struct_passwd, place: Path, tmp_path: Path
) -> None:
    uid = subid_user.pw_uid
    rules = [{"name": "this-user-ext4", "containers": {"host_uid": [uid]},
              "match": {"source": f"{place}/*.ext4", "target": "/**"}, "action": "kernel"}]  # fmt: skip
    policy = write_policy(tmp_path / "users.yaml", rules)
    script = (
        "cat /proc/self/uid_map | wc -l; setpriv --reuid=65534 --regid=65534 --clear-groups id -u; "
        f"mount -o loop,ro {place}/data.ext4 /mnt && cat /mnt/pub.txt; umount /mnt && echo unmounted"
    )
    with oci.serving(tmp_path, policy, control=place / "control.sock") as serve:
        run = _as_user(
            subid_user, *oci.mountwarden_argv(), "run", "--name", "subids", "--control-socket",
            str(place / "control.sock"), "--", "/bin/sh", "-c", script,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        lines = run.stdout.split()
        assert lines == ["2", "65534", "public", "unmounted"], run.stdout + run.stderr
        assert serve.wait_for("container-adopted")[-1]["host_uid"] == uid
