"""paths.resolve on real directory trees: no escape from the root, kernel errnos, no fd leaks.

Everything runs in tmp_path without mounting anything. Where the kernel can answer the same
question, openat2(RESOLVE_IN_ROOT) is the oracle: it implements the very rules resolve()
promises (absolute links restart at the root, ``..`` stops there).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor.errors import KernelError
from supervisor.paths import MAX_SYMLINKS, PATH_MAX, absolute, resolve

HOST_FILE = "/etc/hostname"  # exists on the host, never inside the test trees


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def open_root(path: Path) -> int:
    return os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)


def walk(root_fd: int, path: str, follow_last: bool = True) -> tuple[str, os.stat_result]:
    """Resolve, check the fd is live, close it, and check nothing else was left open."""
    before = fd_count()
    found = resolve(root_fd, path, follow_last=follow_last)
    try:
        assert os.fstat(found.fd).st_ino == found.st.st_ino
        assert fd_count() == before + 1
    finally:
        found.close()
    assert fd_count() == before, f"fd leak resolving {path!r}"
    return found.path, found.st


def walk_errno(root_fd: int, path: str, follow_last: bool = True) -> int:
    """The errno resolve() fails with; failing must not leak fds either."""
    before = fd_count()
    with pytest.raises(KernelError) as info:
        resolve(root_fd, path, follow_last=follow_last)
    assert fd_count() == before, f"fd leak resolving {path!r}"
    assert info.value.errno is not None
    return info.value.errno


def same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


_libc = ctypes.CDLL(None, use_errno=True)
_NR_OPENAT2 = 437
_RESOLVE_IN_ROOT = 0x10


def kernel_resolve(root_fd: int, path: str, follow_last: bool = True) -> tuple[str | None, int | None]:
    """The kernel's answer, openat2(RESOLVE_IN_ROOT): (canonical path, None) or (None, errno)."""
    flags = os.O_PATH | os.O_CLOEXEC | (0 if follow_last else os.O_NOFOLLOW)
    how = struct.pack("QQQ", flags, 0, _RESOLVE_IN_ROOT)
    fd = _libc.syscall(
        ctypes.c_long(_NR_OPENAT2), ctypes.c_long(root_fd), os.fsencode(path), how, ctypes.c_long(len(how))
    )
    if fd < 0:
        return None, ctypes.get_errno()
    try:
        full = os.readlink(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)
    inside = os.path.relpath(full, os.readlink(f"/proc/self/fd/{root_fd}"))
    return "/" if inside == "." else "/" + inside, None


@pytest.fixture
def root(tmp_path: Path) -> Iterator[int]:
    fd = open_root(tmp_path)
    yield fd
    os.close(fd)


def build_tree(base: Path) -> None:
    """A small tree with every kind of link resolve() must handle."""
    (base / "a" / "b").mkdir(parents=True)
    (base / "a" / "b" / "f").write_text("deep")
    (base / "f").write_text("top")
    links = {
        "lf": "f",
        "a/up": "..",
        "a/top": "/",
        "a/abs": "/a/b",
        "a/esc": "../../../../..",
        "a/hostfile": HOST_FILE,
        "a/climb": "../../../../../etc/hostname",
        "loop1": "loop2",
        "loop2": "loop1",
        "self": "self",
        "dangling": "nope",
    }
    for name, target in links.items():
        os.symlink(target, base / name)


@pytest.fixture
def tree(tmp_path: Path, root: int) -> int:
    build_tree(tmp_path)
    return root


# --- plain paths and canonical output ------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "canonical"),
    [
        ("/", "/"),
        ("/f", "/f"),
        ("/a/b/f", "/a/b/f"),
        ("a/b/f", "/a/b/f"),
        ("//a///b//f", "/a/b/f"),
        ("/./a/./b/./f", "/a/b/f"),
        ("/a/b/../b/f", "/a/b/f"),
        ("/a/b/../../f", "/f"),
        ("/a/b/", "/a/b"),
        ("/a/b/.", "/a/b"),
    ],
)
def test_plain_paths_give_canonical_names(tree: int, tmp_path: Path, path: str, canonical: str) -> None:
    found, st_ = walk(tree, path)
    assert found == canonical
    assert same_file(st_, os.stat(tmp_path / canonical.lstrip("/")))


@pytest.mark.parametrize("path", ["/..", "/../..", "/../../..", "/a/../../..", "/a/b/../../../../.."])
def test_dotdot_stops_at_the_root(tree: int, tmp_path: Path, path: str) -> None:
    found, st_ = walk(tree, path)
    assert found == "/"
    assert same_file(st_, os.stat(tmp_path))


def test_dotdot_cannot_reach_a_host_file(tree: int) -> None:
    assert walk_errno(tree, "/../../../.." + HOST_FILE) == errno.ENOENT
    assert walk(tree, "/../../f")[0] == "/f"


# --- symlinks --------------------------------------------------------------------------------


def test_relative_link_resolves_beside_itself(tree: int, tmp_path: Path) -> None:
    found, st_ = walk(tree, "/lf")
    assert found == "/f"
    assert same_file(st_, os.stat(tmp_path / "f"))


@pytest.mark.parametrize(
    ("path", "canonical"),
    [("/a/top", "/"), ("/a/top/a/b/f", "/a/b/f"), ("/a/abs/f", "/a/b/f"), ("/a/abs/../up/f", "/f")],
)
def test_absolute_links_restart_at_the_given_root(tree: int, path: str, canonical: str) -> None:
    assert walk(tree, path)[0] == canonical


def test_absolute_link_to_a_host_file_stays_inside(tree: int, tmp_path: Path) -> None:
    """The link names a file the host has; inside the tree it does not exist, so ENOENT."""
    if not os.path.exists(HOST_FILE):
        pytest.skip(f"the host has no {HOST_FILE} to tempt an escape")
    assert walk_errno(tree, "/a/hostfile") == errno.ENOENT
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "hostname").write_text("inside")
    found, st_ = walk(tree, "/a/hostfile")
    assert found == HOST_FILE
    assert same_file(st_, os.stat(tmp_path / "etc" / "hostname"))
    assert not same_file(st_, os.stat(HOST_FILE))


@pytest.mark.parametrize("path", ["/a/climb", "/a/esc/etc/hostname", "/a/up/a/up/a/esc/etc/hostname"])
def test_relative_links_cannot_climb_out(tree: int, tmp_path: Path, path: str) -> None:
    assert walk_errno(tree, path) == errno.ENOENT
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "hostname").write_text("inside")
    found, st_ = walk(tree, path)
    assert found == HOST_FILE
    assert same_file(st_, os.stat(tmp_path / "etc" / "hostname"))


def test_link_escaping_to_root_then_dotdot(tree: int) -> None:
    assert walk(tree, "/a/esc")[0] == "/"
    assert walk(tree, "/a/esc/..")[0] == "/"


@pytest.mark.parametrize("path", ["/loop1", "/loop2/x", "/self", "/a/../self"])
def test_symlink_loops_fail_with_eloop(tree: int, path: str) -> None:
    assert walk_errno(tree, path) == errno.ELOOP


def test_symlink_chain_limit_matches_the_kernel(tmp_path: Path, root: int) -> None:
    """MAX_SYMLINKS links may be followed in one lookup; one more is ELOOP."""
    (tmp_path / "f").write_text("end")
    os.symlink("f", tmp_path / f"l{MAX_SYMLINKS}")
    for i in range(MAX_SYMLINKS):
        os.symlink(f"l{i + 1}", tmp_path / f"l{i}")
    assert walk(root, "/l1")[0] == "/f"  # 40 links
    assert walk_errno(root, "/l0") == errno.ELOOP  # 41 links
    assert kernel_resolve(root, "/l1") == ("/f", None)
    assert kernel_resolve(root, "/l0") == (None, errno.ELOOP)


@pytest.mark.parametrize("path", ["/lf", "/loop1", "/self", "/dangling", "/a/top", "/a/esc"])
def test_follow_last_false_returns_the_link_itself(tree: int, tmp_path: Path, path: str) -> None:
    found, st_ = walk(tree, path, follow_last=False)
    assert found == path
    assert same_file(st_, os.lstat(tmp_path / path.lstrip("/")))


def test_follow_last_false_still_follows_links_in_the_middle(tree: int) -> None:
    assert walk(tree, "/a/abs/f", follow_last=False)[0] == "/a/b/f"


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "err"),
    [
        ("", errno.ENOENT),
        ("/nope", errno.ENOENT),
        ("/nope/f", errno.ENOENT),
        ("/dangling", errno.ENOENT),
        ("/f/x", errno.ENOTDIR),
        ("/f/..", errno.ENOTDIR),
        ("/lf/x", errno.ENOTDIR),
        ("/a/b/f/f", errno.ENOTDIR),
    ],
)
def test_lookup_errors(tree: int, path: str, err: int) -> None:
    assert walk_errno(tree, path) == err


def test_path_length_limit(tree: int) -> None:
    """PATH_MAX counts the terminating NUL: 4095 bytes are fine, 4096 are too long."""
    longest = "/" + "./" * ((PATH_MAX - 2) // 2)
    assert len(longest) == PATH_MAX - 1
    assert walk(tree, longest)[0] == "/"
    assert walk_errno(tree, longest + "a") == errno.ENAMETOOLONG
    assert walk_errno(tree, "/" + "a/" * PATH_MAX) == errno.ENAMETOOLONG
    assert kernel_resolve(tree, longest + "a") == (None, errno.ENAMETOOLONG)


def test_component_length_limit(tmp_path: Path, root: int) -> None:
    (tmp_path / ("n" * 255)).write_text("longest name")
    assert walk(root, "/" + "n" * 255)[0] == "/" + "n" * 255
    assert walk_errno(root, "/" + "n" * 256) == errno.ENAMETOOLONG
    assert walk_errno(root, "/" + "n" * 256 + "/x") == errno.ENAMETOOLONG
    assert walk_errno(root, "/" + "é" * 128) == errno.ENAMETOOLONG  # 128 characters, 256 bytes


def test_resolved_fd_is_o_path_and_close_is_idempotent(tree: int) -> None:
    """The fd pins the object without granting I/O; Resolved closes it exactly once."""
    found = resolve(tree, "/f")
    assert fcntl.fcntl(found.fd, fcntl.F_GETFL) & os.O_PATH
    with found:
        pass
    assert found.fd == -1
    found.close()


# --- absolute() ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "cwd", "expected"),
    [
        ("x", "/", "/x"),
        ("x", "/a/b", "/a/b/x"),
        ("x", "/a/b/", "/a/b/x"),
        ("../x", "/a", "/a/../x"),
        ("/abs", "/a", "/abs"),
        ("/", "/a", "/"),
    ],
)
def test_absolute_joins_relative_paths_to_cwd(path: str, cwd: str, expected: str) -> None:
    assert absolute(path, cwd) == expected


def test_relative_path_resolves_from_cwd(tree: int) -> None:
    assert walk(tree, absolute("b/f", "/a"))[0] == "/a/b/f"
    assert walk(tree, absolute("../f", "/a"))[0] == "/f"


# --- edge cases where the kernel's answer is easy to miss -------------------------------------


def test_empty_relative_path_is_enoent(tree: int) -> None:
    assert walk_errno(tree, "") == errno.ENOENT


def test_non_utf8_name_is_looked_up(tmp_path: Path, root: int) -> None:
    (tmp_path / os.fsdecode(b"\xff")).write_text("latin-1 name")
    assert walk(root, os.fsdecode(b"/\xff"))[0] == os.fsdecode(b"/\xff")


@pytest.mark.parametrize("path", ["/f/", "/f/.", "/lf/"])
def test_trailing_slash_on_a_file_is_enotdir(tree: int, path: str) -> None:
    assert kernel_resolve(tree, path) == (None, errno.ENOTDIR)
    assert walk_errno(tree, path) == errno.ENOTDIR


def test_trailing_slash_follows_the_last_link(tree: int) -> None:
    assert walk(tree, "/a/top/", follow_last=False)[0] == "/"


def test_path_length_limit_counts_bytes(tree: int) -> None:
    path = "/" + "é/" * 1500  # 3001 characters, 4501 bytes
    assert kernel_resolve(tree, path) == (None, errno.ENAMETOOLONG)
    assert walk_errno(tree, path) == errno.ENAMETOOLONG


# --- the kernel as oracle, on random paths ----------------------------------------------------


@pytest.fixture(scope="module")
def oracle_tree(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    base = tmp_path_factory.mktemp("oracle")
    build_tree(base)
    fd = open_root(base)
    yield fd
    os.close(fd)


_NAMES = ["a", "b", "f", "lf", "up", "top", "abs", "esc", "hostfile", "climb", "loop1", "self", "dangling", "nope"]
_COMPONENTS = st.sampled_from([*_NAMES, "..", ".", ""])


@settings(max_examples=400, deadline=None)
@given(
    middle=st.lists(_COMPONENTS, max_size=7),
    last=st.sampled_from([*_NAMES, "..", ".", ""]),
    follow_last=st.booleans(),
)
def test_resolve_agrees_with_openat2_in_root(oracle_tree: int, middle: list[str], last: str, follow_last: bool) -> None:
    """Same object or same errno as the kernel, trailing slashes and dots included."""
    path = "/" + "/".join([*middle, last])
    expected_path, expected_err = kernel_resolve(oracle_tree, path, follow_last)
    if expected_err is not None:
        assert walk_errno(oracle_tree, path, follow_last) == expected_err
    else:
        assert walk(oracle_tree, path, follow_last)[0] == expected_path
