"""fdops on the real kernel: strict openat2 walks and detached clones that the original tree's later mounts miss."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from supervisor import fdops
from supervisor import syscalls as s
from supervisor.errors import KernelError


def _in_private_namespace(body: str, tmp: Path) -> None:
    """Run `body` (a test step) in a child with a private mount namespace, so no mount outlives it."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit status
        code = 1
        try:
            s.unshare(s.CLONE_NEWNS)
            s.mount(None, "/", None, s.MS_REC | s.MS_PRIVATE)
            code = 0 if _STEPS[body](tmp) else 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, body


def _refuses(dir_fd: int, path: str, err: int) -> bool:
    try:
        os.close(fdops.open_beneath(dir_fd, path, os.O_RDONLY))
    except KernelError as exc:
        return exc.errno == err
    return False


def _crossing_refused(tmp: Path) -> bool:
    (tmp / "sub").mkdir()
    s.mount("tmpfs", str(tmp / "sub"), "tmpfs", 0)
    (tmp / "sub" / "f").write_text("x")
    fd = os.open(tmp, os.O_PATH | os.O_DIRECTORY)
    return _refuses(fd, "sub/f", errno.EXDEV)


def _clone_misses_later_mounts(tmp: Path) -> bool:
    (tmp / "view").mkdir()
    s.mount("tmpfs", str(tmp / "view"), "tmpfs", 0, "mode=755")
    (tmp / "view" / "entry").mkdir()
    clone = fdops.clone_tree(os.open(tmp, os.O_PATH | os.O_DIRECTORY), "view")
    (tmp / "elsewhere").mkdir()
    (tmp / "elsewhere" / "host.txt").write_text("host\n")
    s.mount(str(tmp / "elsewhere"), str(tmp / "view" / "entry"), None, s.MS_BIND)  # the attacker's bind
    fd = fdops.open_beneath(clone, "entry/new", os.O_WRONLY | os.O_CREAT, 0o444)
    os.close(fd)
    return not (tmp / "elsewhere" / "new").exists() and sorted(os.listdir(tmp / "elsewhere")) == ["host.txt"]


_STEPS = {"crossing": _crossing_refused, "clone": _clone_misses_later_mounts}


@pytest.fixture
def tree(tmp_path: Path) -> int:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_text("x")
    (tmp_path / "link").symlink_to("d")
    os.mkfifo(tmp_path / "fifo")
    return os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)


def test_symlinks_and_escapes_are_refused(tree: int) -> None:
    assert _refuses(tree, "link/f", errno.ELOOP)
    assert _refuses(tree, "../etc/passwd", errno.EXDEV)
    assert _refuses(tree, "/etc/passwd", errno.EXDEV)
    os.close(fdops.open_beneath(tree, "d/f", os.O_RDONLY))


def test_a_fifo_never_blocks(tree: int) -> None:
    assert _refuses(tree, "fifo", errno.ENXIO) is False  # a read open of a FIFO succeeds at once with O_NONBLOCK
    with pytest.raises(KernelError) as exc:
        fdops.open_beneath(tree, "fifo", os.O_WRONLY)
    assert exc.value.errno == errno.ENXIO  # no reader: a write open fails at once instead of waiting


def test_mounts_are_not_crossed(tmp_path: Path) -> None:
    _in_private_namespace("crossing", tmp_path)


def test_a_clone_does_not_see_binds_made_after_it(tmp_path: Path) -> None:
    _in_private_namespace("clone", tmp_path)
