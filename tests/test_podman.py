"""Podman containers served by `mountwarden serve` (issue 11): rootful, and rootless as an
ordinary host user with subordinate ids of its own.

Podman starts each container from `--rootfs DIR` with `--security-opt seccomp=PROFILE`, a
profile from `mountwarden profile oci --runtime runc` whose listenerPath is serve's OCI socket,
and with contrib/podman/containers.conf (runc, cgroupfs, events to a file: this machine has
neither systemd nor a cgroup layout crun 1.8.1 accepts). Every podman gets storage, run state
and temporary files of its own under the test's directory, removed at the end with the
processes podman leaves behind (a rootless podman's pause process, conmon's cgroups).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import oci
import pytest
from conftest import REPO, write_policy
from test_oci import WAIT_FOR_POOL

from supervisor.sources import oci as oci_source

USER = "mountwarden-podman"
CONTAINERS_CONF = REPO / "contrib" / "podman" / "containers.conf"
CRUN_HYBRID = REPO / "contrib" / "podman" / "crun-hybrid"
SCRIPT = (
    f"{WAIT_FOR_POOL}; mount -o loop,ro /img/data.ext4 /mnt && cat /mnt/pub.txt; losetup -a | wc -l; "
    "readlink /dev/loop0; umount /mnt && echo unmounted; mount -o loop,ro /img/data.squashfs /mnt 2>/dev/null "
    "|| echo refused"
)


@pytest.fixture(scope="session")
def podman_user() -> pwd.struct_passwd:
    """An ordinary account with a home and subordinate ids of its own (made once on this machine;
    useradd gives it the next free 65536 ids in /etc/subuid and /etc/subgid)."""
    try:
        user = pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", "--comment", "mountwarden podman tests",
                        USER], check=True)  # fmt: skip
        user = pwd.getpwnam(USER)
    for table in ("/etc/subuid", "/etc/subgid"):
        with open(table) as f:
            assert any(line.startswith(f"{USER}:") for line in f), f"{USER} has no entry in {table}"
    return user


class Podman:
    """podman as root (`user` None) or as `user`, with its storage, run state and temporary files in
    a directory of its own; `cleanup` removes its containers, its pause process and what it made there."""

    def __init__(self, user: pwd.struct_passwd | None) -> None:
        # podman refuses a run root path longer than 50 characters: a short directory of its own.
        self.place, self.user = Path(tempfile.mkdtemp(prefix="mw-podman.")), user
        place = self.place
        if user:
            (place / "xdg").mkdir(mode=0o700)
            shutil.chown(place, user.pw_uid, user.pw_gid)
            shutil.chown(place / "xdg", user.pw_uid, user.pw_gid)
        self.cgroups_before = _libpod_cgroups()
        # Rootful: crun, because runc 1.1 sets the container's rlimits with prlimit(2) from
        # outside its user namespace, which needs CAP_SYS_RESOURCE, and root on this machine has
        # none; crun sets them inside. Rootless: runc (crun-hybrid cannot unmount what the
        # user's namespace inherited locked), whose prlimit the user's own container allows.
        self.runtime = "runc" if user else str(CRUN_HYBRID)

    def argv(self, *args: str) -> list[str]:
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "CONTAINERS_CONF": str(CONTAINERS_CONF)}
        if self.user:
            env |= {"HOME": self.user.pw_dir, "XDG_RUNTIME_DIR": str(self.place / "xdg")}
        podman = ["podman", "--runtime", self.runtime, "--root", str(self.place / "storage"),
                  "--runroot", str(self.place / "run"), "--tmpdir", str(self.place / "tmp"), "--storage-driver", "vfs",
                  *args]  # fmt: skip
        prefix = ["runuser", "-u", self.user.pw_name, "--"] if self.user else []
        return [*prefix, "env", "-i", *(f"{k}={v}" for k, v in env.items()), *podman]

    def __call__(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(*args), capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)  # fmt: skip

    def run_args(self, profile: Path, images: Path, rootfs: Path, name: str) -> list[str]:
        """`podman run`'s options for a container that may mount what serve lets it, from `rootfs`."""
        args = ["--name", name, "--cidfile", str(self.place / f"{name}.cid"), "--network", "none",
                "--cap-add", "SYS_ADMIN", "--security-opt", f"seccomp={profile}", "--volume", f"{images}:/img:ro",
                "--annotation", "org.example.mountwarden=podman"]  # fmt: skip
        if not self.user:
            # Without a user namespace the container would be the host's root: map it like `run`'s.
            args += ["--uidmap", "0:100000:65536", "--gidmap", "0:100000:65536"]
            # Rootful podman asks for RLIMIT_NOFILE 1048576 and RLIMIT_NPROC 4194304, above this
            # machine's hard limits, and root here lacks CAP_SYS_RESOURCE: ask for less.
            args += ["--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096"]
        return [*args, "--rootfs", str(rootfs)]  # a flag: the root is the first argument after the options

    def container_id(self, name: str) -> str:
        return (self.place / f"{name}.cid").read_text().strip()

    def cleanup(self) -> None:
        self("rm", "--all", "--force", "--time", "0")
        pause = self.place / "tmp" / "pause.pid"
        with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
            os.kill(int(pause.read_text()), signal.SIGKILL)  # rootless podman's keeper of its user namespace
        for cgroup in sorted(_libpod_cgroups() - self.cgroups_before, key=len, reverse=True):
            with contextlib.suppress(OSError):
                os.rmdir(cgroup)  # rootful conmon's, left empty by podman with cgroupfs
        shutil.rmtree(self.place, ignore_errors=True)


def _libpod_cgroups() -> set[str]:
    return set(glob.glob("/sys/fs/cgroup/*/libpod_parent")) | set(glob.glob("/sys/fs/cgroup/*/libpod_parent/**/"))


@pytest.fixture
def place(workdir: Path, tmp_path: Path, images: dict[str, Path]) -> Iterator[Path]:
    """A directory every user may walk: the images, serve's sockets, the profile."""
    where = workdir / f"podman-{tmp_path.name}"
    (where / "img").mkdir(parents=True, mode=0o755)
    where.chmod(0o755)
    for kind in ("ext4", "squashfs"):
        shutil.copy(images[kind], where / "img" / f"data.{kind}")
        (where / "img" / f"data.{kind}").chmod(0o644)
    yield where
    shutil.rmtree(where, ignore_errors=True)


def _profile(place: Path, runtime: str = "runc") -> Path:
    path = place / f"seccomp-{runtime}.json"
    path.write_text(json.dumps(oci_source.profile(None, str(place / "oci.sock"), runtime=runtime)))
    path.chmod(0o644)
    return path


@contextlib.contextmanager
def _podman(user: pwd.struct_passwd | None) -> Iterator[Podman]:
    podman = Podman(user)
    try:
        yield podman
    finally:
        podman.cleanup()


def test_a_rootful_podman_container_mounts_an_image_through_its_pool(
    place: Path, tmp_path: Path, mountcall: Path
) -> None:
    rules = [{"name": "podman-ext4", "containers": {"oci_annotations": {"org.example.mountwarden": "podman"}},
              "match": {"source": "/img/*.ext4", "target": "/**"}, "action": "kernel"}]  # fmt: skip
    policy = write_policy(tmp_path / "podman.yaml", rules)
    rootfs = oci.rootfs(place / "rootfs", mountcall)
    with oci.serving(tmp_path, policy, oci_socket=place / "oci.sock") as serve, _podman(None) as podman:
        run = podman("run", "--rm", *podman.run_args(_profile(place, "crun"), place / "img", rootfs, "mw-rootful"),
                     "/bin/sh", "-c", SCRIPT)  # fmt: skip
        assert run.returncode == 0, run.stderr
        assert run.stdout.split() == ["public", "1", ".mountwarden/loop0", "unmounted", "refused"], run.stdout
        cid = podman.container_id("mw-rootful")
        adopted = serve.wait_for("container-adopted")
        assert adopted[-1]["key"] == f"oci:{cid}" and adopted[-1]["host_uid"] == 100000, adopted
        mounts = [r for r in serve.records() if r.get("syscall") == "mount"]
        decided = [(m.get("rule"), m["result"]) for m in mounts]
        # busybox tries the squashfs image as ext3, ext2, ext4 (EINVAL: it is none), then as squashfs
        assert decided[0] == ("podman-ext4", "OK") and decided[-1] == (None, "EPERM"), mounts
        assert mounts[-1]["fstype"] == "squashfs" and ("podman-ext4", "OK") not in decided[1:], mounts
        serve.wait_for("container-released")


def test_a_rootless_podman_container_is_served_under_the_rules_for_its_users_uid(
    podman_user: pwd.struct_passwd, place: Path, tmp_path: Path, mountcall: Path
) -> None:
    """The user's podman maps the container's root to the user and the rest to its subordinate
    ids; its runc connects to the socket opened to users as that user, so serve takes the
    container as the user's and applies only the rules for that uid."""
    uid = podman_user.pw_uid
    rules = [
        {"name": "this-user-ext4", "containers": {"host_uid": [uid]},
         "match": {"source": "/img/*.ext4", "target": "/**"}, "action": "kernel"},
        {"name": "another-user-squashfs", "containers": {"host_uid": [uid + 1]},
         "match": {"source": "/img/*.squashfs", "target": "/**"}, "action": "kernel"},
    ]  # fmt: skip
    policy = write_policy(tmp_path / "users.yaml", rules)
    rootfs = oci.rootfs(place / "rootfs", mountcall, owner=f"{uid}:{podman_user.pw_gid}")
    script = f"cat /proc/self/uid_map; {SCRIPT}"
    with oci.serving(tmp_path, policy, oci_socket=place / "oci.sock", extra=["--oci-users"]) as serve, \
            _podman(podman_user) as podman:  # fmt: skip
        run = podman("run", "--rm", *podman.run_args(_profile(place), place / "img", rootfs, "mw-rootless"),
                     "/bin/sh", "-c", script)  # fmt: skip
        assert run.returncode == 0, run.stderr
        subids = _subordinate(USER, "/etc/subuid")
        assert run.stdout.split() == ["0", str(uid), "1", "1", str(subids[0]), str(subids[1]),
                                      "public", "1", ".mountwarden/loop0", "unmounted", "refused"], run.stdout
        cid = podman.container_id("mw-rootless")
        adopted = serve.wait_for("container-adopted")
        assert adopted[-1]["key"] == f"oci:{uid}:{cid}" and adopted[-1]["host_uid"] == uid, adopted
        mounts = [r for r in serve.records() if r.get("syscall") == "mount"]
        decided = [(m.get("rule"), m["result"]) for m in mounts]
        # busybox tries the squashfs image as ext3, ext2, ext4 (EINVAL: it is none), then as squashfs
        assert decided[0] == ("this-user-ext4", "OK") and decided[-1] == (None, "EPERM"), mounts
        assert mounts[-1]["fstype"] == "squashfs" and ("this-user-ext4", "OK") not in decided[1:], mounts
        serve.wait_for("container-released")


def test_a_process_podman_execs_in_a_rootless_container_is_served_too(
    podman_user: pwd.struct_passwd, place: Path, tmp_path: Path, mountcall: Path
) -> None:
    """`podman exec` makes runc connect again with a new listener for the exec'd process: serve
    adds it to the user's container it already serves."""
    uid = podman_user.pw_uid
    rules = [{"name": "this-user-ext4", "containers": {"host_uid": [uid]},
              "match": {"source": "/img/*.ext4", "target": "/**"}, "action": "kernel"}]  # fmt: skip
    policy = write_policy(tmp_path / "users.yaml", rules)
    rootfs = oci.rootfs(place / "rootfs", mountcall, owner=f"{uid}:{podman_user.pw_gid}")
    with oci.serving(tmp_path, policy, oci_socket=place / "oci.sock", extra=["--oci-users"]) as serve, \
            _podman(podman_user) as podman:  # fmt: skip
        started = podman("run", "--detach", *podman.run_args(_profile(place), place / "img", rootfs, "mw-exec"),
                         "/bin/sleep", "600")  # fmt: skip
        assert started.returncode == 0, started.stderr
        exec_ = podman("exec", "mw-exec", "/bin/sh", "-c", SCRIPT)
        assert exec_.returncode == 0, exec_.stderr
        assert exec_.stdout.split() == ["public", "1", ".mountwarden/loop0", "unmounted", "refused"], exec_.stdout
        listeners = serve.records("oci-listener")
        assert [r["status"] for r in listeners] == ["creating", "running"], listeners
        assert {r["key"] for r in listeners} == {f"oci:{uid}:{podman.container_id('mw-exec')}"}, listeners
        assert podman("rm", "--force", "--time", "0", "mw-exec").returncode == 0
        serve.wait_for("container-released")


def test_the_shipped_profile_is_the_one_mountwarden_makes() -> None:
    shipped = json.loads((REPO / "contrib" / "podman" / "seccomp.json").read_text())
    assert shipped == oci_source.profile(None, oci_source.DEFAULT_SOCKET, runtime="runc")


def _subordinate(user: str, table: str) -> tuple[int, int]:
    with open(table) as f:
        for line in f:
            name, start, count = line.strip().split(":")
            if name == user:
                return int(start), int(count)
    raise AssertionError(f"{user} has no entry in {table}")
