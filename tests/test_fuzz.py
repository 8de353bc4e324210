"""Fuzzing the decoders of untrusted input: each target is a hypothesis strategy and a check.

The container controls mount(2) flags and data strings, the loop structs it passes, the
memory its pointers lead to and the paths it names; operators write the policy files. Every
decoder of those must answer with KernelError (a real errno) or PolicyError (a sentence),
never with another exception, and must round-trip where an encoding exists. The suite runs
each target a few hundred times; bench/fuzz.py runs the same targets for a million inputs.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import struct
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hypothesis
import pytest
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from test_paths import build_tree, kernel_resolve

from supervisor import mountopts
from supervisor import syscalls as s
from supervisor.errors import KernelError
from supervisor.loop.abi import CONFIG, INFO64, NATIVE64, LoopInfo
from supervisor.mounting import _context_log
from supervisor.paths import resolve
from supervisor.policy import PolicyError, load_policy
from supervisor.registry import SYSCALLS, arch_name, syscall_name
from supervisor.seccomp import notify
from supervisor.target import Target

INFO_OLD, pack_old, unpack_old = NATIVE64.info_old, NATIVE64.pack_old, NATIVE64.unpack_old
U64 = st.integers(0, 2**64 - 1)
PAGE = mmap.PAGESIZE


@dataclass(frozen=True)
class FuzzTarget:
    """One decoder under test: inputs drawn from `strategy` are given to `check`, which raises on a bug."""

    name: str
    strategy: st.SearchStrategy[Any]
    check: Callable[[Any], None]


# --- mount(2) flags and data --------------------------------------------------------------------

_WORDS = [
    "ro", "rw", "nosuid", "nodev", "noexec", "noatime", "relatime", "strictatime", "nodiratime", "sync",
    "async", "dirsync", "lazytime", "nolazytime", "defaults", "loop", "loop=/dev/loop0", "acl", "errors=panic",
    "errors=remount-ro", "commit=5", "commit=x", "journal_path=/etc", "device=/dev/sda", "threads=multi",
    "cache_strategy=readahead", "data=journal", " ro ", "=", "==", "", ",", "\t", "\n", "é", "\udcff",
]  # fmt: skip
_FLAG_BITS = [1 << n for n in range(64)] + [s.MS_MGC_VAL, s.MS_MGC_MSK]
FLAGS = U64 | st.lists(st.sampled_from(_FLAG_BITS), max_size=6).map(lambda bits: sum(set(bits)))
DATA = st.none() | st.text(max_size=300) | st.lists(st.sampled_from(_WORDS) | st.text(max_size=8)).map(",".join)


def _render(opts: mountopts.MountOptions) -> str:
    """The options as a data string mount(2) would accept back."""
    return ",".join(["ro" if opts.read_only else "rw", *sorted(opts.attrs), *opts.sb_flags, *opts.fs_options])


def check_mount_options(case: tuple[int, str | None, str]) -> None:
    flags, data, fstype = case
    try:
        opts = mountopts.parse(flags, data)
    except KernelError as exc:
        assert exc.errno == errno.EINVAL
        return
    assert opts.attrs <= set(mountopts.OPTION_ATTRS) - {"ro"}
    assert mountopts.parse(0, _render(opts)) == opts  # the decoded options say all that was asked
    forced = opts.with_forced(("noexec",))
    assert {"nosuid", "nodev", "noexec"} <= forced.attrs and forced.attr_flags & s.MOUNT_ATTR_NOSUID
    forced.describe()
    try:
        mountopts.check_fs_options(fstype, opts.fs_options)
    except KernelError as exc:
        assert exc.errno == errno.EPERM
        return
    for opt in opts.fs_options:  # what passes must be a known key with a harmless value
        key, _, value = opt.partition("=")
        assert key not in ("journal_path", "journal_dev", "device") and value != "panic"


MOUNT_OPTIONS = FuzzTarget(
    "mountopts.parse",
    st.tuples(FLAGS, DATA, st.sampled_from([*mountopts.SAFE_OPTIONS, "xfs", "vfat", ""])),
    check_mount_options,
)


# --- loop ABI structs ---------------------------------------------------------------------------


def check_loop_info64(raw: bytes) -> None:
    info = LoopInfo.unpack(raw)
    assert info.pack() == raw
    assert LoopInfo.unpack(info.pack()) == info
    assert isinstance(info.name, str)


def check_loop_config(raw: bytes) -> None:
    """struct loop_config as the LOOP_CONFIGURE handler splits it: fd, block size, loop_info64."""
    fd, block_size, info_raw, *reserved = CONFIG.unpack(raw)
    info = LoopInfo.unpack(raw, 8)
    assert info.pack() == info_raw and CONFIG.pack(fd, block_size, info.pack(), *reserved) == raw


def _old_padding_cleared(raw: bytes) -> bytes:
    """`raw` with the compiler's padding and the reserved bytes zeroed: nothing reads them."""
    out = bytearray(raw)
    out[4:8] = bytes(4)
    out[160:168] = bytes(8)
    return bytes(out)


def check_loop_info_old(case: tuple[bytes, int]) -> None:
    raw, sizelimit = case
    info = unpack_old(raw, sizelimit)
    assert info.sizelimit == sizelimit
    info.pack()  # what LOOP_SET_STATUS hands on must be a valid loop_info64
    assert pack_old(info) == _old_padding_cleared(raw)  # a sign-extended offset folds back


LOOP_STRUCTS = [
    FuzzTarget("LoopInfo.unpack/pack", st.binary(min_size=INFO64.size, max_size=INFO64.size), check_loop_info64),
    FuzzTarget("loop_config", st.binary(min_size=CONFIG.size, max_size=CONFIG.size), check_loop_config),
    FuzzTarget(
        "loop_info (old ABI)",
        st.tuples(st.binary(min_size=INFO_OLD.size, max_size=INFO_OLD.size), U64),
        check_loop_info_old,
    ),
]


# --- seccomp notifications ----------------------------------------------------------------------

_KNOWN_CALLS = st.sampled_from(sorted(SYSCALLS))


def check_notification(case: tuple[bytes, tuple[int, int] | None]) -> None:
    raw, known = case
    if known is not None:  # give the interesting (arch, nr) pairs a fair share
        raw = raw[:16] + struct.pack("<iI", known[1], known[0]) + raw[24:]
    notif = notify.decode(raw)
    nid, pid, _, nr, arch, _, *args = notify.NOTIF.unpack(raw)
    assert (notif.id, notif.pid, notif.nr, notif.arch, notif.args) == (nid, pid, nr, arch, tuple(args))
    name = syscall_name(notif)
    assert (name is not None) == ((arch, nr) in SYSCALLS)
    assert arch_name(arch)
    for response in (
        notify.Response.errno(nid, 1 + nr % 4095),
        notify.Response.success(nid, args[0] - 2**63),
        notify.Response.continue_(nid),
    ):
        assert notify.RESP.unpack(response.pack()) == (response.id, response.val, response.error, response.flags)


NOTIFICATIONS = FuzzTarget(
    "seccomp_notif decode",
    st.tuples(st.binary(min_size=notify.NOTIF.size, max_size=notify.NOTIF.size), st.none() | _KNOWN_CALLS),
    check_notification,
)


# --- strings and structs read from the caller's memory ------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


class _SelfTarget(Target):
    """This process as its own caller: there is no notification whose validity could lapse."""

    def check(self) -> None:
        pass


class CallerMemory:
    """Three readable pages followed by an unmapped one, read the way handlers read a caller.

    The Target reads this process through /proc/self/mem exactly as it reads a container task.
    """

    SIZE = 3 * PAGE

    def __init__(self) -> None:
        base = _libc.mmap(None, self.SIZE + PAGE, mmap.PROT_READ | mmap.PROT_WRITE, 0x22, -1, 0)  # PRIVATE|ANON
        if base in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap")
        self.base: int = base
        _libc.munmap(base + self.SIZE, PAGE)  # the guard: reads running into it fault
        self.target = _SelfTarget(-1, notify.Notification(0, os.getpid(), 0, 0, (0, 0, 0, 0, 0, 0)))
        self.target.mem = os.open("/proc/self/mem", os.O_RDWR | os.O_CLOEXEC)
        self.target.proc = os.open(f"/proc/{os.getpid()}", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)

    def fill(self, offset: int, data: bytes) -> bytes:
        """Non-NUL filler with `data` at `offset`; returns what lies from `offset` to the guard."""
        ctypes.memset(self.base, 0xAA, self.SIZE)
        data = data[: self.SIZE - offset]
        ctypes.memmove(self.base + offset, data, len(data))
        return data + b"\xaa" * (self.SIZE - offset - len(data))

    def close(self) -> None:
        os.close(self.target.mem)
        os.close(self.target.proc)
        _libc.munmap(self.base, self.SIZE)


def check_caller_string(memory: CallerMemory, case: tuple[int, bytes, int]) -> None:
    """read_cstring gives what strncpy_from_user would: the string, EFAULT or ENAMETOOLONG."""
    offset, data, limit = case
    readable = memory.fill(offset, data)
    window = readable[:limit]
    try:
        got: str | KernelError = memory.target.read_cstring(memory.base + offset, limit)
    except KernelError as exc:
        got = exc
    if b"\0" in window:
        assert got == window[: window.index(b"\0")].decode("utf-8", "surrogateescape")
    else:
        assert isinstance(got, KernelError)
        assert got.errno == (errno.ENAMETOOLONG if len(readable) >= limit else errno.EFAULT)


def check_caller_struct(memory: CallerMemory, case: tuple[int, bytes, int]) -> None:
    offset, data, size = case
    readable = memory.fill(offset, data)
    try:
        got = memory.target.read_bytes(memory.base + offset, size)
    except KernelError as exc:
        assert exc.errno == errno.EFAULT and size > len(readable)
    else:
        assert got == readable[:size]
    try:
        memory.target.write_bytes(memory.base + offset, data[:size])
    except KernelError as exc:
        assert exc.errno == errno.EFAULT and min(size, len(data)) > len(readable)


_OFFSETS = st.integers(0, CallerMemory.SIZE - 1) | st.integers(CallerMemory.SIZE - 300, CallerMemory.SIZE - 1)
_BYTES = st.binary(max_size=600) | st.binary(max_size=8).map(lambda b: b.replace(b"\0", b"x") * 700)


def memory_targets(memory: CallerMemory) -> list[FuzzTarget]:
    return [
        FuzzTarget(
            "Target.read_cstring",
            st.tuples(_OFFSETS, _BYTES, st.integers(1, 5000)),
            lambda case: check_caller_string(memory, case),
        ),
        FuzzTarget(
            "Target.read_bytes/write_bytes",
            st.tuples(_OFFSETS, _BYTES, st.integers(0, 600)),
            lambda case: check_caller_struct(memory, case),
        ),
    ]


# --- path resolution ----------------------------------------------------------------------------

_NAMES = ["a", "b", "f", "lf", "up", "top", "abs", "esc", "hostfile", "climb", "loop1", "self", "dangling"]
_COMPONENT = st.sampled_from([*_NAMES, "..", ".", "", "nope", "x" * 256]) | st.binary(min_size=1, max_size=6).map(
    lambda b: b.replace(b"\0", b"").replace(b"/", b"").decode("utf-8", "surrogateescape")
)
PATHS = st.tuples(st.booleans(), st.lists(_COMPONENT, max_size=10), st.booleans()).map(
    lambda t: ("/" if t[0] else "") + "/".join(t[1]) + ("/" if t[2] else "")
)


def check_resolve(root: tuple[int, str], case: tuple[str, str, bool]) -> None:
    """Never outside the root; the canonical path names the object; the kernel agrees."""
    root_fd, root_path = root
    path, cwd, follow_last = case
    want_path, want_err = kernel_resolve(root_fd, path if path.startswith("/") else f"{cwd}/{path}", follow_last)
    try:
        found = resolve(root_fd, path, cwd=cwd, follow_last=follow_last)
    except KernelError as exc:
        assert want_err is not None and exc.errno == want_err, (path, exc, want_path)
        return
    with found:
        real = os.readlink(f"/proc/self/fd/{found.fd}")
        assert real == root_path or real.startswith(root_path + "/"), real
        assert found.path == want_path and real == root_path + (found.path if found.path != "/" else "")
        parts = found.path.split("/")[1:]
        assert found.path.startswith("/") and not {".", ".."} & set(parts)
        assert found.path == "/" or "" not in parts


def path_target(root: tuple[int, str]) -> FuzzTarget:
    cwd = st.sampled_from(["/", "/a", "/a/b"])
    return FuzzTarget(
        "paths.resolve",
        st.tuples(PATHS.filter(bool), cwd, st.booleans()),
        lambda case: check_resolve(root, case),
    )


# --- policy files -------------------------------------------------------------------------------

_YAML_TOKENS = [
    "version: 1\n", "version: 2\n", "rules:\n", "limits: ", "{loop_devices: ", "loop_devices_per_host_uid: ",
    "  - name: r\n", "  - name: ", "    match:\n", "      source: ", "      target: ", "      fstype: ",
    "      size: {max: ", "      sha256: ", "      read_only: ", "      options_allowed: ", "      options_forbidden: ",
    "      max_loop_devices: ", "    action: ", "    errno: ", "    options: ", "    idmap: ", "    daemon: ",
    "    containers: ", "{name: ", "host_uid: ", "lxc_cookie: ", "oci_id: ", "oci_annotations: {",
    "kernel", "fuse", "deny", "EPERM", "ENOENT", "EFOO", "1", "0", "-1", "2G", "1.5T", "99999999999999999999",
    "/srv/**", "/**", "**", "/a/*/b", "[", "]", "{", "}", ",", ": ", "- ", "\n", "  ", "\t", "'", '"', "&a ", "*a",
    "<<: ", "!!binary ", "!!python/object/apply:os.system ", "~", "null", "true", "ext4", "squashfs",
    "a" * 64, "é", "\x00", "\ufeff", "---\n", "...\n", "%YAML 1.1\n", "? ", "|\n", ">-\n", "#",
]  # fmt: skip
_SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
_VALUES = st.recursive(
    _SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
)
_RULE_KEYS = ["name", "match", "action", "errno", "options", "idmap", "daemon", "containers"]
_MATCH_KEYS = ["source", "target", "fstype", "size", "sha256", "read_only", "options_allowed", "max_loop_devices"]
_RULES = st.fixed_dictionaries(
    {"name": st.text(max_size=10) | _SCALARS, "action": st.sampled_from(["kernel", "fuse", "deny"]) | _SCALARS},
    optional={
        **{key: _VALUES for key in _RULE_KEYS[3:]},
        "match": st.dictionaries(st.sampled_from(_MATCH_KEYS), _VALUES, max_size=4),
    },
)
_DOCUMENTS = st.fixed_dictionaries(
    {"version": st.just(1) | _SCALARS, "rules": st.lists(_RULES, max_size=4) | _VALUES},
    optional={"limits": st.dictionaries(st.sampled_from(["loop_devices", "loop_devices_per_host_uid"]), _VALUES)},
)
POLICY_TEXT = st.one_of(
    st.text(max_size=400).map(str.encode),
    st.lists(st.sampled_from(_YAML_TOKENS), max_size=60).map(lambda tokens: "".join(tokens).encode()),
    _DOCUMENTS.map(lambda doc: yaml.safe_dump(doc, allow_unicode=True).encode()),
    st.binary(max_size=200),
    st.tuples(st.integers(1, 3000), st.sampled_from(["[", "{a: ", "- "])).map(
        lambda t: (t[1] * t[0] + ("]" if t[1] == "[" else "}" if t[1] == "{a: " else "x") * t[0]).encode()
    ),
)


def check_policy(path: Path, text: bytes) -> None:
    path.write_bytes(text)
    try:
        policy = load_policy([path])
    except PolicyError as exc:
        for line in str(exc).splitlines():  # every problem is pinned to the file
            assert line.startswith(str(path)), line
        return
    assert all(rule.name for rule in policy.rules)


def policy_target(path: Path) -> FuzzTarget:
    return FuzzTarget("load_policy", POLICY_TEXT, lambda text: check_policy(path, text))


# --- the fs context's message log ---------------------------------------------------------------

_FS_KEYS = st.sampled_from(["source", "errors", "commit", "ro", "acl", "data", "threads", "sb", "x"]) | st.text(
    max_size=12
).filter(lambda k: "\0" not in k)


def check_fs_context(case: tuple[str, list[tuple[str, str | None]]]) -> None:
    """Option strings reaching fsconfig fail with KernelError only; the kernel's log reads as text."""
    fstype, options = case
    fsfd = s.fsopen(fstype)
    try:
        for key, value in options:
            with contextlib.suppress(KernelError):
                s.fsconfig(fsfd, s.FSCONFIG_SET_STRING if value is not None else s.FSCONFIG_SET_FLAG, key, value)
        assert isinstance(_context_log(fsfd), str)
    finally:
        os.close(fsfd)


def check_context_log_bytes(chunks: list[bytes]) -> None:
    """The log parser on arbitrary bytes (a pipe stands in for the fs context fd)."""
    read_end, write_end = os.pipe()
    try:
        for chunk in chunks:
            os.write(write_end, chunk)
        os.close(write_end)
        write_end = -1
        assert isinstance(_context_log(read_end), str)
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)


FS_CONTEXT = [
    FuzzTarget(
        "fsconfig + context log",
        st.tuples(
            st.sampled_from(["ext4", "squashfs", "erofs"]),
            st.lists(st.tuples(_FS_KEYS, st.none() | st.text(max_size=20).filter(lambda v: "\0" not in v)), max_size=5),
        ),
        check_fs_context,
    ),
    FuzzTarget("context log parser", st.lists(st.binary(max_size=1200), max_size=6), check_context_log_bytes),
]


# --- all targets, for the suite and for bench/fuzz.py ------------------------------------------


@contextlib.contextmanager
def fuzz_targets() -> Iterator[list[FuzzTarget]]:
    """Every target, with the scratch tree, policy file and caller memory some of them need."""
    with contextlib.ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mountwarden-fuzz.")))
        (scratch / "root").mkdir()
        build_tree(scratch / "root")
        root_fd = os.open(scratch / "root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        stack.callback(os.close, root_fd)
        memory = CallerMemory()
        stack.callback(memory.close)
        yield [
            MOUNT_OPTIONS,
            *LOOP_STRUCTS,
            NOTIFICATIONS,
            *memory_targets(memory),
            path_target((root_fd, os.path.realpath(scratch / "root"))),
            policy_target(scratch / "policy.yaml"),
            *FS_CONTEXT,
        ]


def run_target(target: FuzzTarget, examples: int, seed: int | None = None) -> int:
    """Run `target` on `examples` generated inputs (no shrinking database); returns how many ran."""
    count = 0

    def counted(case: Any) -> None:
        nonlocal count
        count += 1
        target.check(case)

    test = settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=[Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
    )(given(target.strategy)(counted))
    (test if seed is None else hypothesis.seed(seed)(test))()
    return count


with fuzz_targets() as _probe:
    TARGET_NAMES = [t.name for t in _probe]


@pytest.fixture(scope="module")
def targets() -> Iterator[dict[str, FuzzTarget]]:
    with fuzz_targets() as found:
        yield {t.name: t for t in found}


@pytest.mark.parametrize("name", TARGET_NAMES)
def test_decoder_holds_on_fuzzed_input(targets: dict[str, FuzzTarget], name: str) -> None:
    assert run_target(targets[name], examples=150) > 0


# --- regressions: what the fuzzing found ---------------------------------------------------------


def test_old_loop_info_ints_convert_as_the_kernel_converts_them() -> None:
    """LOOP_SET_STATUS with negative ints raised struct.error (EIO, "internal error") on the way on."""
    raw = INFO_OLD.pack(2**32 - 1, 0, 0, 0, -512, 2**32 - 1, 0, 2**32 - 1, b"", b"", 0, 0, b"")
    info = unpack_old(raw, 0)
    assert (info.number, info.offset, info.flags) == (2**32 - 1, 2**64 - 512, 2**32 - 1)  # offset sign-extended
    assert LoopInfo.unpack(info.pack())._replace(crypt_name=b"") == info
    assert pack_old(info) == raw
    with pytest.raises(KernelError) as too_big:
        pack_old(info._replace(offset=2**31))
    assert too_big.value.errno == errno.EOVERFLOW


@pytest.mark.parametrize(
    ("text", "where", "says"),
    [
        ("version: 1\nrules: " + "[" * 5000 + "]" * 5000, ":2:39:", "nest more than 32 deep"),  # was RecursionError
        ("{a: " * 3000 + "1" + "}" * 3000, ":1:129:", "nest more than 32 deep"),
        ("version: 1\nrules: []\n\x1f", ":3:1:", "character U+001F is not allowed"),  # was two lines, one unpinned
        ('(:\n"\\r": 1', ":2:1:", "['\\r']: unknown key '\\r'"),  # the key's line break split the message
    ],
)
def test_policy_errors_stay_one_pinned_line(tmp_path: Path, text: str, where: str, says: str) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(PolicyError) as info:
        load_policy([path])
    lines = str(info.value).splitlines()
    assert all(line.startswith(f"{path}:") for line in lines)
    assert any(line.startswith(f"{path}{where}") and says in line for line in lines), lines


def test_alias_bomb_is_refused_before_it_is_expanded(tmp_path: Path) -> None:
    """Nine levels of ten aliases each stand for 10**9 values: refused at once, not validated for hours."""
    levels = ['x0: &a0 ["/a", "/a", "/a", "/a", "/a", "/a", "/a", "/a", "/a", "/a"]']
    levels += [f"x{n}: &a{n} [{', '.join([f'*a{n - 1}'] * 10)}]" for n in range(1, 9)]
    path = tmp_path / "bomb.yaml"
    rule = "  - {name: r, match: {source: *a8}, action: kernel}"
    path.write_text("\n".join(["version: 1", *levels, "rules:", rule, ""]))
    started = time.monotonic()
    with pytest.raises(PolicyError, match=r"bomb.yaml:1:1: with its aliases .* more than 100000 values"):
        load_policy([path])
    assert time.monotonic() - started < 5
