"""Identify the filesystem in a disk image from the image's own bytes.

The container asks for ``mount -t TYPE``, but that is a claim about bytes the
container wrote itself, so the supervisor names the kernel driver from the
superblock instead and lets policy judge that name. Everything read here is
attacker-controlled: all I/O is pread of the first ``PROBE_BYTES`` (68 KiB) into
one buffer, every layout is bounds-checked against that buffer before it is
unpacked, and anything malformed is simply "not recognised" rather than an
exception.

The container can still rewrite the image after the probe. That is harmless to
the decision, because the supervisor hands ``kernel_driver(fstype)`` to fsopen()
itself, so whatever the bytes become they are parsed by the driver policy
approved; the label and UUID are only informational.
"""

from __future__ import annotations

import fcntl
import os
import stat
import struct
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

# Every signature known here ends by 0x10000 + 4 KiB (the btrfs superblock is the
# furthest out), so a single read of this many bytes from offset 0 is all the I/O.
PROBE_BYTES = 0x11000

# BLKGETSIZE64 = _IOR(0x12, 114, size_t) in the x86-64/arm64 encoding: a block
# device's size in bytes, since its st_size is 0.
_BLKGETSIZE64 = 0x80081272
_U64 = struct.Struct("=Q")

_T = TypeVar("_T")


class _ExtSuper(NamedTuple):
    inodes_count: int
    blocks_count: int
    log_block_size: int
    magic: int
    rev_level: int
    feature_compat: int
    feature_incompat: int
    feature_ro_compat: int
    uuid: bytes
    volume_name: bytes


# ext2/3/4 superblock at 1024, little-endian, padded to its full 1 KiB so that a
# truncated superblock is never half-read.
_EXT_OFFSET = 1024
_EXT = struct.Struct("<II16xI28xH18xI12xIII16s16s888x")
_EXT_MAGIC = 0xEF53
_EXT_MAX_LOG_BLOCK_SIZE = 6  # 64 KiB blocks, the largest the kernel accepts
_EXT_MAX_REV = 1
_EXT_COMPAT_HAS_JOURNAL = 0x0004
_EXT_INCOMPAT_JOURNAL_DEV = 0x0008
# The features ext3 (and, without a journal, ext2) understood; any bit outside
# these is an ext4-era feature, which is how blkid tells the three apart.
_EXT3_INCOMPAT = 0x0002 | 0x0004 | 0x0010  # filetype, recover, meta_bg
_EXT2_INCOMPAT = 0x0002 | 0x0010  # filetype, meta_bg
_EXT3_RO_COMPAT = 0x0001 | 0x0002 | 0x0004  # sparse_super, large_file, btree_dir


class _SquashfsSuper(NamedTuple):
    magic: int
    block_size: int
    block_log: int
    major: int
    minor: int


# squashfs superblock at 0, little-endian, 96 bytes.
_SQUASHFS = struct.Struct("<I8xI6xH4xHH64x")
_SQUASHFS_MAGIC = 0x73717368  # "hsqs"
_SQUASHFS_VERSION = (4, 0)  # the only version the kernel reads
_SQUASHFS_MIN_BLOCK_LOG = 12
_SQUASHFS_MAX_BLOCK_LOG = 20


class _ErofsSuper(NamedTuple):
    magic: int
    blkszbits: int
    uuid: bytes
    volume_name: bytes


# erofs superblock at 1024, little-endian, 128 bytes.
_EROFS_OFFSET = 1024
_EROFS = struct.Struct("<I8xB35x16s16s48x")
_EROFS_MAGIC = 0xE0F5E1E2
_EROFS_MIN_BLKSZBITS = 9
_EROFS_MAX_BLKSZBITS = 16


class _F2fsSuper(NamedTuple):
    magic: int
    log_sectorsize: int
    log_sectors_per_block: int
    log_blocksize: int
    uuid: bytes
    volume_name: bytes  # 512 UTF-16LE code units


# f2fs superblock at 1024, little-endian, up to the end of the volume name.
_F2FS_OFFSET = 1024
_F2FS = struct.Struct("<I4xIII88x16s1024s")
_F2FS_MAGIC = 0xF2F52010
_F2FS_MIN_LOG_SECTORSIZE = 9
_F2FS_MAX_LOG_SECTORSIZE = 12
_F2FS_MIN_LOG_BLOCKSIZE = 12
_F2FS_MAX_LOG_BLOCKSIZE = 16


class _XfsSuper(NamedTuple):
    magic: int
    blocksize: int
    dblocks: int
    uuid: bytes
    agcount: int
    sectsize: int
    inodesize: int
    fname: bytes
    blocklog: int
    sectlog: int
    inodelog: int


# XFS superblock at 0, big-endian, padded to its 512-byte sector.
_XFS = struct.Struct(">IIQ16x16s40xI10xHH2x12sBBB389x")
_XFS_MAGIC = 0x58465342  # "XFSB"
_XFS_MIN_SECTLOG = 9
_XFS_MAX_SECTLOG = 15
_XFS_MAX_BLOCKLOG = 16
_XFS_MIN_INODELOG = 8
_XFS_MAX_INODELOG = 11


class _BtrfsSuper(NamedTuple):
    fsid: bytes
    bytenr: int
    magic: bytes
    sectorsize: int
    label: bytes


# btrfs primary superblock at 64 KiB, little-endian, 4 KiB.
_BTRFS_OFFSET = 0x10000
_BTRFS = struct.Struct("<32x16sQ8x8s72xI151x256s3541x")
_BTRFS_MAGIC = b"_BHRfS_M"
_BTRFS_MIN_SECTORSIZE = 4096
_BTRFS_MAX_SECTORSIZE = 65536


class _IsoDescriptor(NamedTuple):
    kind: int
    magic: bytes
    volume_id: bytes


# ISO 9660 volume descriptors: 2 KiB sectors from sector 16, each starting with
# a type byte and "CD001"; the primary one holds the volume identifier.
_ISO_OFFSET = 0x8000
_ISO_DESCRIPTOR = struct.Struct("<B5s34x32s1976x")
_ISO_MAGIC = b"CD001"
_ISO_PRIMARY = 1
_ISO_TERMINATOR = 255


# UDF: an ECMA-167 volume recognition sequence from 32 KiB, one 2 KiB descriptor per
# sector (per 4 KiB sector on 4Kn media, read at 2 KiB steps with the gaps skipped), its
# NSR02/NSR03 descriptor between BEA01 and TEA01 saying the volume is UDF.
_UDF_VRS_OFFSET = 0x8000
_UDF_VRS_STEP = 2048
_UDF_VRS_IDENT = struct.Struct("<x5s")
_UDF_BEGIN = b"BEA01"
_UDF_NSR = frozenset({b"NSR02", b"NSR03"})
_UDF_END = b"TEA01"
# Descriptors that may also stand in the sequence (ISO 9660's, in a UDF bridge image).
_UDF_OTHER = frozenset({b"CD001", b"CDW02", b"BOOT2"})


class _FatBpb(NamedTuple):
    sector_size: int
    cluster_sectors: int
    reserved_sectors: int
    fats: int
    root_entries: int
    total_sectors16: int
    media: int
    fat_length16: int
    total_sectors32: int
    fat_length32: int


class _FatExtended(NamedTuple):
    boot_signature: int
    serial: bytes


# FAT boot sector: the BIOS parameter block from 0x0B (CHS geometry and hidden
# sectors skipped), then an extended boot record whose place depends on whether
# the FAT is 32-bit; the sector ends with the 0x55AA boot signature.
_FAT_BPB_OFFSET = 0x0B
_FAT_BPB = struct.Struct("<HBHBHHBH8xII")
_FAT_EXTENDED_OFFSET16 = 0x26
_FAT_EXTENDED_OFFSET32 = 0x42
_FAT_EXTENDED = struct.Struct("<B4s")
_FAT_EXTENDED_SIGNATURE = 0x29
_FAT_SIGNATURE_OFFSET = 510
_FAT_SIGNATURE = b"\x55\xaa"
_FAT_SECTOR_SIZES = frozenset({512, 1024, 2048, 4096})
_FAT_DIRENT_SIZE = 32


@dataclass(frozen=True)
class ImageFacts:
    """What the image's bytes say about it; ``fstype`` is None when not recognised."""

    fstype: str | None
    size: int
    label: str | None = None
    uuid: str | None = None


class _Match(NamedTuple):
    fstype: str
    label: str | None
    uuid: str | None


def probe_fd(fd: int) -> ImageFacts:
    """Probe the image open on ``fd``, reading at most ``PROBE_BYTES`` with pread.

    pread leaves the file offset alone, which matters because the open file may
    be shared with the container. Only OSError (from fstat, the size ioctl or
    pread) escapes; malformed contents give ``fstype=None``.
    """
    size = _image_size(fd)
    head = _read_head(fd, PROBE_BYTES)
    for probe in _PROBES:
        match = probe(head)
        if match is not None:
            return ImageFacts(match.fstype, size, match.label, match.uuid)
    return ImageFacts(None, size)


def kernel_driver(fstype: str) -> str:
    """The filesystem name to give fsopen() for a probed ``fstype``.

    The ext4 driver mounts ext2 and ext3 as well, and a kernel need not register
    the older names at all (ext3 has had no driver of its own since Linux 4.3),
    so one driver serves all three.
    """
    return "ext4" if fstype in ("ext2", "ext3") else fstype


def _image_size(fd: int) -> int:
    """Size in bytes; block devices need an ioctl because their st_size is 0."""
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        (size,) = _U64.unpack(fcntl.ioctl(fd, _BLKGETSIZE64, bytes(_U64.size)))
        return int(size)
    return st.st_size


def _read_head(fd: int, limit: int) -> bytes:
    """Up to ``limit`` bytes from offset 0, short only at end of file."""
    chunks: list[bytes] = []
    done = 0
    while done < limit:
        chunk = os.pread(fd, limit - done, done)
        if not chunk:
            break
        chunks.append(chunk)
        done += len(chunk)
    return b"".join(chunks)


def _unpack(layout: struct.Struct, make: Callable[..., _T], data: bytes, offset: int) -> _T | None:
    """``layout`` at ``offset`` as a ``make`` record, or None when ``data`` ends first."""
    if offset + layout.size > len(data):
        return None
    return make(*layout.unpack_from(data, offset))


def _text(raw: bytes, encoding: str) -> str | None:
    """A label safe to log: cut at NUL, undecodable or unprintable characters replaced."""
    text = raw.decode(encoding, errors="replace").split("\x00", 1)[0].rstrip(" ")
    return "".join(c if c.isprintable() else "\ufffd" for c in text) or None


def _uuid(raw: bytes) -> str | None:
    """Canonical form of a 16-byte UUID field; None when unset (all zero)."""
    return str(uuid.UUID(bytes=raw)) if any(raw) else None


def _is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def _probe_btrfs(head: bytes) -> _Match | None:
    """btrfs: 8-byte magic, and the superblock must say it lives where it was found."""
    sb = _unpack(_BTRFS, _BtrfsSuper, head, _BTRFS_OFFSET)
    if sb is None or sb.magic != _BTRFS_MAGIC or sb.bytenr != _BTRFS_OFFSET:
        return None
    if not _is_power_of_two(sb.sectorsize):
        return None
    if not _BTRFS_MIN_SECTORSIZE <= sb.sectorsize <= _BTRFS_MAX_SECTORSIZE:
        return None
    return _Match("btrfs", _text(sb.label, "utf-8"), _uuid(sb.fsid))


def _probe_xfs(head: bytes) -> _Match | None:
    """XFS: magic plus the geometry cross-checks that blkid and the kernel make."""
    sb = _unpack(_XFS, _XfsSuper, head, 0)
    if sb is None or sb.magic != _XFS_MAGIC or sb.agcount == 0 or sb.dblocks == 0:
        return None
    if not (
        _XFS_MIN_SECTLOG <= sb.sectlog <= _XFS_MAX_SECTLOG
        and sb.sectlog <= sb.blocklog <= _XFS_MAX_BLOCKLOG
        and _XFS_MIN_INODELOG <= sb.inodelog <= _XFS_MAX_INODELOG
        and sb.sectsize == 1 << sb.sectlog
        and sb.blocksize == 1 << sb.blocklog
        and sb.inodesize == 1 << sb.inodelog
    ):
        return None
    return _Match("xfs", _text(sb.fname, "utf-8"), _uuid(sb.uuid))


def _probe_squashfs(head: bytes) -> _Match | None:
    """squashfs 4.0 with a block size the kernel accepts; it has no label or UUID."""
    sb = _unpack(_SQUASHFS, _SquashfsSuper, head, 0)
    if sb is None or sb.magic != _SQUASHFS_MAGIC or (sb.major, sb.minor) != _SQUASHFS_VERSION:
        return None
    if not _SQUASHFS_MIN_BLOCK_LOG <= sb.block_log <= _SQUASHFS_MAX_BLOCK_LOG:
        return None
    if sb.block_size != 1 << sb.block_log:
        return None
    return _Match("squashfs", None, None)


def _probe_erofs(head: bytes) -> _Match | None:
    """erofs: magic and a block size the kernel could accept."""
    sb = _unpack(_EROFS, _ErofsSuper, head, _EROFS_OFFSET)
    if sb is None or sb.magic != _EROFS_MAGIC:
        return None
    if not _EROFS_MIN_BLKSZBITS <= sb.blkszbits <= _EROFS_MAX_BLKSZBITS:
        return None
    return _Match("erofs", _text(sb.volume_name, "utf-8"), _uuid(sb.uuid))


def _probe_f2fs(head: bytes) -> _Match | None:
    """f2fs: magic, and sector and block sizes that add up as the kernel requires."""
    sb = _unpack(_F2FS, _F2fsSuper, head, _F2FS_OFFSET)
    if sb is None or sb.magic != _F2FS_MAGIC:
        return None
    if not (
        _F2FS_MIN_LOG_SECTORSIZE <= sb.log_sectorsize <= _F2FS_MAX_LOG_SECTORSIZE
        and _F2FS_MIN_LOG_BLOCKSIZE <= sb.log_blocksize <= _F2FS_MAX_LOG_BLOCKSIZE
        and sb.log_sectorsize + sb.log_sectors_per_block == sb.log_blocksize
    ):
        return None
    return _Match("f2fs", _text(sb.volume_name, "utf-16-le"), _uuid(sb.uuid))


def _probe_ext(head: bytes) -> _Match | None:
    """ext2/3/4, told apart by feature flags the way blkid does.

    The magic is only two bytes, so the whole superblock must be present and its
    counts, revision and block size plausible. An external journal device carries
    the same magic but holds no filesystem.
    """
    sb = _unpack(_EXT, _ExtSuper, head, _EXT_OFFSET)
    if sb is None or sb.magic != _EXT_MAGIC or sb.inodes_count == 0 or sb.blocks_count == 0:
        return None
    if sb.log_block_size > _EXT_MAX_LOG_BLOCK_SIZE or sb.rev_level > _EXT_MAX_REV:
        return None
    if sb.feature_incompat & _EXT_INCOMPAT_JOURNAL_DEV:
        return None
    if sb.feature_ro_compat & ~_EXT3_RO_COMPAT or sb.feature_incompat & ~_EXT3_INCOMPAT:
        fstype = "ext4"
    elif sb.feature_compat & _EXT_COMPAT_HAS_JOURNAL:
        fstype = "ext3"
    elif sb.feature_incompat & ~_EXT2_INCOMPAT:
        fstype = "ext4"  # needs journal recovery yet has no journal: only ext4 would try
    else:
        fstype = "ext2"
    return _Match(fstype, _text(sb.volume_name, "utf-8"), _uuid(sb.uuid))


def _probe_iso9660(head: bytes) -> _Match | None:
    """ISO 9660: a run of "CD001" descriptors from sector 16 that includes a primary one.

    The kernel cannot mount without the primary descriptor, so a run that ends
    (or leaves the probed bytes) before one turns up is not recognised.
    """
    for offset in range(_ISO_OFFSET, len(head), _ISO_DESCRIPTOR.size):
        vd = _unpack(_ISO_DESCRIPTOR, _IsoDescriptor, head, offset)
        if vd is None or vd.magic != _ISO_MAGIC or vd.kind == _ISO_TERMINATOR:
            return None
        if vd.kind == _ISO_PRIMARY:
            return _Match("iso9660", _text(vd.volume_id, "ascii"), None)
    return None


def _probe_udf(head: bytes) -> _Match | None:
    """UDF: an NSR descriptor inside an extended area (BEA01 ... TEA01) of the recognition sequence.

    A UDF bridge disc carries ISO 9660 descriptors first; blkid and the kernel call it UDF,
    so this probe runs before the ISO 9660 one. The label lives in the logical volume
    descriptor, beyond what is read here, and is left out.
    """
    extended = False
    for offset in range(_UDF_VRS_OFFSET, len(head) - _UDF_VRS_IDENT.size + 1, _UDF_VRS_STEP):
        (ident,) = _UDF_VRS_IDENT.unpack_from(head, offset)
        if ident == _UDF_BEGIN:
            extended = True
        elif ident in _UDF_NSR and extended:
            return _Match("udf", None, None)
        elif ident == _UDF_END:
            extended = False
        elif ident not in _UDF_OTHER and any(head[offset : offset + _UDF_VRS_STEP]):
            return None  # the sequence ended without an NSR
    return None


def _probe_vfat(head: bytes) -> _Match | None:
    """FAT12/16/32: probed last, as the boot signature and BPB are the weakest evidence.

    The OEM name and "FAT12"/"FAT16"/"FAT32" type strings are free text that
    formatters fill as they please and the kernel ignores, so the decision rests
    on the boot signature plus a BIOS parameter block consistent enough for the
    kernel's fat driver. That also turns away NTFS and exFAT, which share the
    signature but zero these fields.
    """
    bpb = _unpack(_FAT_BPB, _FatBpb, head, _FAT_BPB_OFFSET)
    signature = head[_FAT_SIGNATURE_OFFSET : _FAT_SIGNATURE_OFFSET + len(_FAT_SIGNATURE)]
    if bpb is None or signature != _FAT_SIGNATURE:
        return None
    total_sectors = bpb.total_sectors16 or bpb.total_sectors32
    fat_length = bpb.fat_length16 or bpb.fat_length32
    if bpb.sector_size not in _FAT_SECTOR_SIZES or not _is_power_of_two(bpb.cluster_sectors):
        return None
    if bpb.reserved_sectors == 0 or bpb.fats == 0 or total_sectors == 0 or fat_length == 0:
        return None
    if bpb.media != 0xF0 and bpb.media < 0xF8:
        return None
    root_sectors = (bpb.root_entries * _FAT_DIRENT_SIZE + bpb.sector_size - 1) // bpb.sector_size
    if bpb.reserved_sectors + bpb.fats * fat_length + root_sectors >= total_sectors:
        return None
    is_fat32 = bpb.fat_length16 == 0
    extended = _unpack(
        _FAT_EXTENDED,
        _FatExtended,
        head,
        _FAT_EXTENDED_OFFSET32 if is_fat32 else _FAT_EXTENDED_OFFSET16,
    )
    serial = None
    if extended is not None and extended.boot_signature == _FAT_EXTENDED_SIGNATURE:
        s = extended.serial
        serial = f"{s[3]:02X}{s[2]:02X}-{s[1]:02X}{s[0]:02X}"
    return _Match("vfat", None, serial)


# Strongest evidence first, so that a hybrid image (an ISO with a FAT boot sector
# in its system area, say) is named by the filesystem it really carries.
_PROBES: tuple[Callable[[bytes], _Match | None], ...] = (
    _probe_btrfs,
    _probe_xfs,
    _probe_squashfs,
    _probe_erofs,
    _probe_f2fs,
    _probe_ext,
    _probe_udf,
    _probe_iso9660,
    _probe_vfat,
)
