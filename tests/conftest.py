"""Shared fixtures: real images, the static test tool, a `mountwarden run` driver, and the leak check.

Every test runs under `no_leaks`, which compares the host's loop devices, mount table, device
cgroups and this process's descendants before and after, and fails the test on any difference.
Teardown in the kernel is partly asynchronous (autoclear, namespace release), so the check
waits up to a few seconds for the machine to settle before calling it a leak.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
TOOLS = Path(__file__).resolve().parent / "tools"
CONTENT = {"pub.txt": "public\n", "dir/nested.txt": "nested\n"}


def loop_devices() -> set[tuple[str, str]]:
    out = set()
    for path in glob.glob("/sys/block/loop*/loop/backing_file"):
        with open(path) as f:
            out.add((path.split("/")[3], f.read().strip()))
    return out


def host_mounts() -> list[str]:
    with open("/proc/self/mounts") as f:
        return sorted(f.read().splitlines())


def descendants(pid: int) -> set[tuple[int, str]]:
    children: dict[int, list[int]] = {}
    names: dict[int, str] = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                text = f.read()
        except OSError:
            continue
        name = text[text.index("(") + 1 : text.rindex(")")]
        fields = text[text.rindex(")") + 2 :].split()
        me, ppid = int(stat.split("/")[2]), int(fields[1])
        if fields[0] == "Z" and ppid != pid:
            continue
        children.setdefault(ppid, []).append(me)
        names[me] = name
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add((child, names[child]))
            todo.append(child)
    return found


def device_cgroups() -> set[str]:
    return {p for root in ("devices", "unified", "") for p in glob.glob(f"/sys/fs/cgroup/{root}/mountwarden/*/")}


def snapshot() -> dict[str, Any]:
    return {
        "loop devices": loop_devices(),
        "mounts": host_mounts(),
        "processes": descendants(os.getpid()),
        "device cgroups": device_cgroups(),
    }


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    before = snapshot()
    yield
    deadline = time.monotonic() + 10
    while (after := snapshot()) != before and time.monotonic() < deadline:
        time.sleep(0.05)
    leaks = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
    if leaks:
        lines = []
        for what, (old, new) in leaks.items():
            lines.append(f"{what}: new {sorted(set(new) - set(old))}, gone {sorted(set(old) - set(new))}")
        pytest.fail("the test leaked kernel objects or processes:\n" + "\n".join(lines))


def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: the supervisor mounts for containers")


@pytest.fixture(scope="session")
def workdir() -> Iterator[Path]:
    """A world-readable scratch directory: the container's root is an unprivileged host uid."""
    _require_root()
    path = Path(tempfile.mkdtemp(prefix="mountwarden-test."))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def mountcall(workdir: Path) -> Path:
    """The static test tool: one raw system call per command, usable in any root filesystem."""
    out = workdir / "mountcall"
    subprocess.run(["gcc", "-O2", "-static", "-Wall", "-o", str(out), str(TOOLS / "mountcall.c")], check=True)
    return out


@pytest.fixture
def mnt(workdir: Path) -> Path:
    """A mount point the container's root may use."""
    path = workdir / "mnt"
    path.mkdir(exist_ok=True)
    return path


def make_tree(root: Path, files: dict[str, str] = CONTENT) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def build_image(fstype: str, source: Path, image: Path, size: str = "8M") -> Path:
    if fstype in ("ext2", "ext3", "ext4"):
        subprocess.run([f"mkfs.{fstype}", "-q", "-F", "-d", str(source), str(image), size], check=True)
    elif fstype == "squashfs":
        subprocess.run(
            ["mksquashfs", str(source), str(image), "-quiet", "-noappend"], check=True, stdout=subprocess.DEVNULL
        )
    elif fstype == "erofs":
        subprocess.run(["mkfs.erofs", "--quiet", str(image), str(source)], check=True)
    else:
        raise ValueError(fstype)
    image.chmod(0o644)
    return image


@pytest.fixture(scope="session")
def images(workdir: Path) -> dict[str, Path]:
    """One small image per kernel filesystem, readable by everyone, under workdir/img."""
    src = make_tree(workdir / "content")
    (workdir / "img").mkdir(mode=0o755)
    return {t: build_image(t, src, workdir / "img" / f"data.{t}") for t in ("ext4", "squashfs", "erofs")}


@pytest.fixture(scope="session")
def rootfs(workdir: Path, images: dict[str, Path], mountcall: Path) -> Path:
    """A busybox root with an image inside and symlinks that try to lead outside."""
    root = workdir / "rootfs"
    for d in ("bin", "proc", "dev", "sys", "tmp", "mnt", "img"):
        (root / d).mkdir(parents=True)
    shutil.copy("/bin/busybox", root / "bin" / "busybox")
    for tool in ("sh", "cat", "grep", "ls", "losetup", "mount", "umount"):
        (root / "bin" / tool).symlink_to("busybox")
    shutil.copy(mountcall, root / "bin" / "mountcall")
    shutil.copy(images["ext4"], root / "img" / "data.ext4")
    (root / "abs-escape").symlink_to(images["ext4"].parent)  # absolute host path
    (root / "rel-escape").symlink_to("../" * 12 + str(images["ext4"].parent).lstrip("/"))
    (root / "mnt-escape").symlink_to("../" * 12 + "tmp")
    subprocess.run(["chmod", "-R", "a+rX", str(root)], check=True)
    return root


UTIL_LINUX_TOOLS = ("losetup", "mount", "umount", "sh", "cat", "wc", "ls")


@pytest.fixture(scope="session")
def debian_rootfs(workdir: Path, images: dict[str, Path]) -> Path:
    """A root holding the host's own util-linux and shell binaries with the libraries they load."""
    root = workdir / "debian-rootfs"
    for d in ("proc", "dev", "sys", "tmp", "mnt", "img", "usr/bin", "usr/sbin", "usr/lib", "usr/lib64"):
        (root / d).mkdir(parents=True)
    for link in ("bin", "sbin", "lib", "lib64"):
        (root / link).symlink_to(f"usr/{link}")
    binaries = [shutil.which(tool) or tool for tool in UTIL_LINUX_TOOLS]
    ldd = subprocess.run(["ldd", *binaries], capture_output=True, text=True, check=True).stdout
    libs = {p for line in ldd.splitlines() for p in line.split() if p.startswith("/") and not p.endswith(":")}
    for lib in libs:  # at the path the binaries ask for; /lib and /lib64 lead into usr/ as on Debian
        dest = root / lib.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(lib).resolve(), dest)
    for tool, path in zip(UTIL_LINUX_TOOLS, binaries, strict=True):
        shutil.copy(Path(path).resolve(), root / "usr" / "bin" / tool)
    shutil.copy(images["ext4"], root / "img" / "data.ext4")
    subprocess.run(["chmod", "-R", "a+rX", str(root)], check=True)
    return root


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    audit: list[dict[str, Any]] = field(default_factory=list)

    def decisions(self, syscall: str | None = None) -> list[dict[str, Any]]:
        return [a for a in self.audit if a.get("event") == "mount-decision" and syscall in (None, a.get("syscall"))]


def write_policy(path: Path, rules: list[dict[str, Any]]) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({"version": 1, "rules": rules}))
    return path


def allow_policy(tmp_path: Path, source: str = "/**", target: str = "/**", options: list[str] | None = None) -> Path:
    rule: dict[str, Any] = {"name": "allow-test", "match": {"source": source, "target": target}, "action": "kernel"}
    if options:
        rule["options"] = options
    return write_policy(tmp_path / "allow.yaml", [rule])


def mountwarden(*args: str) -> list[str]:
    return [sys.executable, "-m", "mountwarden", *args]


def run_container(
    tmp_path: Path,
    command: list[str],
    *,
    policy: Path | None = None,
    rootfs: Path | None = None,
    timeout: float = 60,
    extra: list[str] | None = None,
) -> Run:
    """`mountwarden run` as a user would call it; returns its output and the parsed audit log."""
    log = tmp_path / f"audit-{time.monotonic_ns()}.log"
    args = ["run", "--audit-log", str(log), *(extra or [])]
    if policy:
        args += ["--policy", str(policy)]
    if rootfs:
        args += ["--rootfs", str(rootfs)]
    proc = subprocess.run(mountwarden(*args, "--", *command), capture_output=True, text=True, timeout=timeout, cwd=REPO)
    return Run(proc.returncode, proc.stdout, proc.stderr, read_audit(log))


def read_audit(log: Path) -> list[dict[str, Any]]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def calls(mountcall: Path, *commands: str) -> list[str]:
    """argv for the test tool running several calls in one process: calls(mc, "mount a b ext4 ro", "umount b")."""
    argv = [str(mountcall), "seq"]
    for i, command in enumerate(commands):
        argv += [";"] * bool(i) + command.split()
    return argv
