"""Tests for supervisor.probe against images made by the real mkfs tools.

Nothing is mounted and no loop device is used: images are plain sparse files,
and the probe only ever reads them.
"""

from __future__ import annotations

import os
import random
import shutil
import struct
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from supervisor.loop import attach
from supervisor.probe import PROBE_BYTES, ImageFacts, kernel_driver, probe_fd

UUID = "0f1e2d3c-4b5a-4978-8796-a5b4c3d2e1f0"
MiB = 1024 * 1024
_TOOL_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


def _tool(*names: str) -> str:
    """The first of ``names`` that is installed, or skip the test."""
    for name in names:
        found = shutil.which(name, path=_TOOL_PATH)
        if found is not None:
            return found
    pytest.skip(f"none of {', '.join(names)} is installed")


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def _sparse(path: Path, size: int) -> Path:
    with path.open("wb") as f:
        f.truncate(size)
    return path


def _source_tree(root: Path) -> Path:
    src = root / "src"
    if not src.exists():
        (src / "dir").mkdir(parents=True)
        (src / "hello.txt").write_text("hello\n")
        (src / "dir" / "data.bin").write_bytes(bytes(range(256)) * 64)
    return src


def _mkfs_ext(flavour: str, *options: str) -> Callable[[Path], Path]:
    def build(root: Path) -> Path:
        image = _sparse(root / "image", 16 * MiB)
        _run(_tool(f"mkfs.{flavour}"), "-F", "-q", *options, str(image))
        return image

    return build


def _mksquashfs(root: Path) -> Path:
    image = root / "image"
    _run(_tool("mksquashfs"), str(_source_tree(root)), str(image), "-noappend", "-quiet")
    return image


def _mkfs_erofs(root: Path) -> Path:
    image = root / "image"
    _run(_tool("mkfs.erofs"), "--quiet", f"-U{UUID}", str(image), str(_source_tree(root)))
    return image


def _mkfs_vfat(size: int, *options: str) -> Callable[[Path], Path]:
    def build(root: Path) -> Path:
        image = _sparse(root / "image", size)
        _run(_tool("mkfs.vfat", "mkfs.fat"), "-i", "1234ABCD", *options, str(image))
        return image

    return build


def _mkfs_xfs(root: Path) -> Path:
    image = _sparse(root / "image", 300 * MiB)  # the smallest size current xfsprogs accepts
    _run(_tool("mkfs.xfs"), "-q", "-f", "-L", "xlabel", "-m", f"uuid={UUID}", str(image))
    return image


def _mkfs_btrfs(root: Path) -> Path:
    image = _sparse(root / "image", 128 * MiB)
    _run(_tool("mkfs.btrfs"), "-q", "-f", "-L", "blabel", "-U", UUID, str(image))
    return image


def _mkisofs(root: Path) -> Path:
    image = root / "image"
    tool = _tool("genisoimage", "xorriso", "mkisofs")
    prefix = [tool, "-as", "mkisofs"] if Path(tool).name == "xorriso" else [tool]
    _run(*prefix, "-quiet", "-V", "ISOLABEL", "-o", str(image), str(_source_tree(root)))
    return image


def _mkfs_f2fs(root: Path) -> Path:
    image = _sparse(root / "image", 64 * MiB)
    _run(_tool("mkfs.f2fs"), "-q", "-f", "-l", "flabel", "-U", UUID, str(image))
    return image


def _mkudffs(block_size: int) -> Callable[[Path], Path]:
    def build(root: Path) -> Path:
        image = _sparse(root / "image", 16 * MiB)
        _run(_tool("mkudffs"), f"--blocksize={block_size}", "--media-type=hd", "--label=ulabel", str(image))
        return image

    return build


def _udf_bridge(root: Path) -> Path:
    """ISO 9660 descriptors first, then the UDF ones: blkid and the kernel call it UDF."""
    image = root / "image"
    _run(_tool("genisoimage"), "-quiet", "-udf", "-V", "ISOLABEL", "-o", str(image), str(_source_tree(root)))
    return image


BUILDERS: dict[str, Callable[[Path], Path]] = {
    "ext2": _mkfs_ext("ext2", "-L", "elabel", "-U", UUID),
    "ext3": _mkfs_ext("ext3", "-L", "elabel", "-U", UUID),
    "ext4": _mkfs_ext("ext4", "-L", "elabel", "-U", UUID),
    "ext4-4k": _mkfs_ext("ext4", "-b", "4096", "-U", UUID),
    "ext2+extents": _mkfs_ext("ext2", "-O", "extents", "-U", UUID),
    "ext-journal-dev": _mkfs_ext("ext4", "-O", "journal_dev"),
    "squashfs": _mksquashfs,
    "erofs": _mkfs_erofs,
    "fat12": _mkfs_vfat(4 * MiB, "-F", "12", "-n", "FLABEL"),
    "fat16": _mkfs_vfat(32 * MiB, "-F", "16"),
    "fat32": _mkfs_vfat(64 * MiB, "-F", "32"),
    "xfs": _mkfs_xfs,
    "btrfs": _mkfs_btrfs,
    "iso9660": _mkisofs,
    "f2fs": _mkfs_f2fs,
    "udf": _mkudffs(2048),
    "udf-512": _mkudffs(512),
    "udf-4k": _mkudffs(4096),
    "udf-bridge": _udf_bridge,
}

# kind -> (fstype, label, uuid) the probe must report. FAT labels are not reported
# (the real one lives in the root directory), only the volume serial.
EXPECTED: dict[str, tuple[str | None, str | None, str | None]] = {
    "ext2": ("ext2", "elabel", UUID),
    "ext3": ("ext3", "elabel", UUID),
    "ext4": ("ext4", "elabel", UUID),
    "ext4-4k": ("ext4", None, UUID),
    "ext2+extents": ("ext4", None, UUID),
    "ext-journal-dev": (None, None, None),
    "squashfs": ("squashfs", None, None),
    "erofs": ("erofs", None, UUID),
    "fat12": ("vfat", None, "1234-ABCD"),
    "fat16": ("vfat", None, "1234-ABCD"),
    "fat32": ("vfat", None, "1234-ABCD"),
    "xfs": ("xfs", "xlabel", UUID),
    "btrfs": ("btrfs", "blabel", UUID),
    "iso9660": ("iso9660", "ISOLABEL", None),
    "f2fs": ("f2fs", "flabel", UUID),
    "udf": ("udf", None, None),
    "udf-512": ("udf", None, None),
    "udf-4k": ("udf", None, None),
    "udf-bridge": ("udf", None, None),
}


# Every type the probe can answer, for the property tests.
KNOWN_TYPES = {fstype for fstype, _, _ in EXPECTED.values() if fstype is not None}


class Images:
    """Builds each kind of image once per module; the mkfs runs dominate the test time."""

    def __init__(self, root: Path) -> None:
        self._root = root
        self._built: dict[str, Path] = {}

    def path(self, kind: str) -> Path:
        if kind not in self._built:
            workdir = self._root / kind
            workdir.mkdir()
            self._built[kind] = BUILDERS[kind](workdir)
        return self._built[kind]

    def head(self, kind: str) -> bytes:
        with self.path(kind).open("rb") as f:
            return f.read(PROBE_BYTES)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Images:
    return Images(tmp_path_factory.mktemp("images"))


def probe_path(path: Path) -> ImageFacts:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return probe_fd(fd)
    finally:
        os.close(fd)


@contextmanager
def memfd(data: bytes) -> Iterator[int]:
    """An fd holding ``data``, so property tests need no files on disk."""
    fd = os.memfd_create("probe-test", os.MFD_CLOEXEC)
    try:
        os.write(fd, data)
        yield fd
    finally:
        os.close(fd)


def probe_bytes(data: bytes) -> ImageFacts:
    with memfd(data) as fd:
        return probe_fd(fd)


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_real_images(images: Images, kind: str) -> None:
    path = images.path(kind)
    fstype, label, uuid = EXPECTED[kind]
    assert probe_path(path) == ImageFacts(fstype, path.stat().st_size, label, uuid)


def test_ext2_has_no_ext4_features(images: Images) -> None:
    """Guards the expectation above: the ext2 image must really lack a journal and extents."""
    head = images.head("ext2")
    compat, incompat = struct.unpack_from("<II", head, 1024 + 0x5C)
    assert compat & 0x4 == 0
    assert incompat & 0x40 == 0


def test_iso_with_fat_boot_sector_is_iso(images: Images, tmp_path: Path) -> None:
    """A hybrid ISO whose system area holds a valid FAT boot sector is still an ISO."""
    boot_sector = images.head("fat16")[:512]
    assert probe_bytes(boot_sector).fstype == "vfat"
    hybrid = tmp_path / "hybrid.iso"
    hybrid.write_bytes(boot_sector + images.path("iso9660").read_bytes()[512:])
    assert probe_path(hybrid).fstype == "iso9660"


def test_truncated_ext4_is_unknown(images: Images) -> None:
    """1500 bytes still holds the ext magic at 1080, but not the whole superblock."""
    head = images.head("ext4")[:1500]
    assert struct.unpack_from("<H", head, 1024 + 0x38) == (0xEF53,)
    assert probe_bytes(head) == ImageFacts(None, 1500)


def test_empty_file_is_unknown(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.touch()
    assert probe_path(empty) == ImageFacts(None, 0)


@pytest.mark.parametrize("seed", range(8))
def test_random_bytes_are_unknown(seed: int) -> None:
    data = random.Random(seed).randbytes(256 * 1024)
    assert probe_bytes(data) == ImageFacts(None, len(data))


def test_label_is_sanitised(images: Images) -> None:
    """Escape sequences and invalid UTF-8 in a label must not reach the audit log."""
    data = bytearray(images.head("ext4"))
    data[1024 + 0x78 : 1024 + 0x88] = b"a\x1b[31m\xffb".ljust(16, b"\x00")
    assert probe_bytes(bytes(data)).label == "a\ufffd[31m\ufffdb"


def _patched(head: bytes, offset: int, fmt: str, value: int | bytes) -> bytes:
    data = bytearray(head)
    struct.pack_into(fmt, data, offset, value)
    return bytes(data)


# One implausible field each: the image must then be unknown, not half-trusted.
CORRUPTIONS = [
    ("ext4", 1024 + 0x00, "<I", 0, "no inodes"),
    ("ext4", 1024 + 0x18, "<I", 7, "blocks over 64 KiB"),
    ("ext4", 1024 + 0x4C, "<I", 2, "unknown revision"),
    ("ext4", 1024 + 0x60, "<I", 0x8, "external journal device"),
    ("squashfs", 28, "<H", 3, "squashfs 3"),
    ("squashfs", 22, "<H", 11, "block_log too small"),
    ("squashfs", 12, "<I", 12345, "block_size disagrees with block_log"),
    ("erofs", 1024 + 12, "<B", 8, "blocks under 512 bytes"),
    ("xfs", 88, ">I", 0, "no allocation groups"),
    ("xfs", 102, ">H", 1000, "sector size disagrees with its log"),
    ("btrfs", 0x10000 + 48, "<Q", 0, "superblock claims another place"),
    ("btrfs", 0x10000 + 144, "<I", 3000, "sector size not a power of two"),
    ("btrfs", 0x10000 + 144, "<I", 1 << 17, "sector size over 64 KiB"),
    ("f2fs", 1024 + 16, "<I", 11, "blocks under 4 KiB"),
    ("fat32", 0x0B, "<H", 700, "odd sector size"),
    ("fat32", 0x0E, "<H", 0, "no reserved sectors"),
    ("fat32", 0x15, "<B", 0x12, "bad media byte"),
    ("fat32", 0x20, "<I", 10, "FATs larger than the volume"),
    ("fat32", 510, "<H", 0, "no boot signature"),
    ("iso9660", 0x8000, "<B", 255, "terminator before the primary descriptor"),
    ("iso9660", 0x8001, "5s", b"CD002", "wrong descriptor magic"),
]


@pytest.mark.parametrize(
    ("kind", "offset", "fmt", "value"),
    [pytest.param(*case[:4], id=f"{case[0]}: {case[4]}") for case in CORRUPTIONS],
)
def test_implausible_superblock_is_unknown(
    images: Images, kind: str, offset: int, fmt: str, value: int | bytes
) -> None:
    assert probe_bytes(images.head(kind)).fstype is not None
    assert probe_bytes(_patched(images.head(kind), offset, fmt, value)).fstype is None


def test_ext_recovery_without_journal_is_ext4(images: Images) -> None:
    """Only the ext4 driver would look at an ext2 that claims to need journal recovery."""
    head = images.head("ext2")
    (incompat,) = struct.unpack_from("<I", head, 1024 + 0x60)
    assert probe_bytes(_patched(head, 1024 + 0x60, "<I", incompat | 0x4)).fstype == "ext4"


def test_fat_serial_needs_extended_boot_signature(images: Images) -> None:
    facts = probe_bytes(_patched(images.head("fat32"), 0x42, "<B", 0))
    assert (facts.fstype, facts.uuid) == ("vfat", None)


def _bytes_read() -> int:
    """This process's read byte count as the kernel keeps it (rchar in /proc/self/io)."""
    with open("/proc/self/io", "rb") as f:
        text = f.read()
    return int(text.split(b"rchar:")[1].split()[0])


def test_reads_only_the_head_with_pread(tmp_path: Path, images: Images) -> None:
    """The probe must not move the file offset (it may be shared) nor read past its bound,
    however large the image: measured by the kernel's own count of bytes read."""
    big = tmp_path / "big.img"
    with open(big, "wb") as f:
        f.write(images.path("ext4").read_bytes()[:PROBE_BYTES])
        f.truncate(1 << 30)  # a sparse 1 GiB image
    fd = os.open(big, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.lseek(fd, 12345, os.SEEK_SET)
        before = _bytes_read()
        facts = probe_fd(fd)
        read = _bytes_read() - before
        assert os.lseek(fd, 0, os.SEEK_CUR) == 12345
    finally:
        os.close(fd)
    assert facts.fstype == "ext4"
    assert 0 < read <= PROBE_BYTES + 4096  # the probe's reads, plus reading /proc/self/io once


def test_block_device_size_comes_from_ioctl(images: Images) -> None:
    """Block devices report st_size 0; the size must come from BLKGETSIZE64 (a real loop device)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to attach a loop device")
    backing = os.open(images.path("ext4"), os.O_RDONLY | os.O_CLOEXEC)
    try:
        device = attach(backing, read_only=True)
    finally:
        os.close(backing)
    try:
        dev_fd = os.open(device.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            assert os.fstat(dev_fd).st_size == 0
            facts = probe_fd(dev_fd)
        finally:
            os.close(dev_fd)
    finally:
        device.close()
    assert (facts.fstype, facts.size) == ("ext4", images.path("ext4").stat().st_size)


def test_unreadable_fd_raises_oserror(tmp_path: Path) -> None:
    """Only pread's own OSError may escape, e.g. for a directory."""
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(OSError):
            probe_fd(fd)
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    ("fstype", "driver"),
    [
        ("ext2", "ext4"),
        ("ext3", "ext4"),
        ("ext4", "ext4"),
        ("squashfs", "squashfs"),
        ("vfat", "vfat"),
        ("iso9660", "iso9660"),
    ],
)
def test_kernel_driver(fstype: str, driver: str) -> None:
    assert kernel_driver(fstype) == driver


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=PROBE_BYTES + 1024))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    facts = probe_bytes(data)
    assert facts.size == len(data)
    assert facts.fstype is None or facts.fstype in KNOWN_TYPES


# Where each fuzzed image keeps the fields its probe checks (see the Struct layouts
# in supervisor/probe.py); about half the mutations land there, so that they get
# past the magic and exercise the checks behind it.
FUZZ_REGIONS = {
    "ext4": (1024, 1024 + 0x88),
    "squashfs": (0, 32),
    "erofs": (1024, 1024 + 16),
    "xfs": (0, 128),
    "btrfs": (0x10000 + 32, 0x10000 + 152),
    "iso9660": (0x8000, 0x8000 + 8),
    "fat32": (0, 0x48),
    "f2fs": (1024, 1024 + 20),
}


@pytest.fixture(scope="module")
def fuzz_seeds(images: Images) -> list[tuple[bytes, tuple[int, int]]]:
    """The heads of every image type whose mkfs is installed, with its hot region."""
    seeds = []
    for kind, region in FUZZ_REGIONS.items():
        try:
            seeds.append((images.head(kind), region))
        except pytest.skip.Exception:
            continue
    return seeds


@st.composite
def mutated(draw: st.DrawFn, seeds: list[tuple[bytes, tuple[int, int]]]) -> bytes:
    seed, (lo, hi) = draw(st.sampled_from(seeds))
    head = bytearray(seed)
    offsets = st.integers(lo, hi - 1) | st.integers(0, len(head) - 1)
    for offset, value in draw(st.lists(st.tuples(offsets, st.integers(0, 255)), max_size=24)):
        head[offset] = value
    cut = draw(st.none() | st.integers(0, len(head)))
    return bytes(head if cut is None else head[:cut])


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_superblocks_never_raise(fuzz_seeds: list[tuple[bytes, tuple[int, int]]], data: st.DataObject) -> None:
    image = data.draw(mutated(fuzz_seeds))
    facts = probe_bytes(image)
    assert facts.size == len(image)
    assert facts.fstype is None or facts.fstype in KNOWN_TYPES
