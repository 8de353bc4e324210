"""32-bit callers get the kernel's compat layouts, tested with real i386 (and x32) binaries.

The binary (tests/tools/abi32.c) puts every result in a buffer of 0xA5 bytes and reports
whether anything past the struct's 32-bit size changed: an answer in the x86-64 layout
(168-byte loop_info, 8-byte unsigned long) overruns it.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import TOOLS, allow_policy, run_container

from supervisor.errors import KernelError
from supervisor.loop.abi import BLKGETSIZE64, BLKGETSIZE64_32, COMPAT32, NATIVE64, Layouts, LoopInfo
from supervisor.registry import kernel_has_x32


def build(workdir: Path, flag: str) -> Path:
    out = workdir / f"abi32{flag}"
    proc = subprocess.run(
        ["gcc", flag, "-O2", "-static", "-Wall", "-o", str(out), str(TOOLS / "abi32.c")], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.fail(f"gcc {flag} -static failed (contrib/setup.sh installs gcc-multilib): {proc.stderr[-400:]}")
    return out


@pytest.fixture(scope="session")
def abi32(workdir: Path) -> Path:
    return build(workdir, "-m32")


def expected_lines(image: Path, sectors: int) -> list[str]:
    return [
        "sizeof loop_info=140 long=4",
        "set-fd OK",
        f"get-status OK number=0 flags=1 offset=0 name={image} tail=clean",
        f"blkgetsize OK {sectors} tail=clean",
        f"blkgetsize64 OK {sectors * 512} tail=clean",
        "set-status OK offset=1024 sizelimit=0",
        "clear OK",
    ]


def test_i386_loop_status_and_sizes_use_the_32_bit_layouts(
    tmp_path: Path, abi32: Path, images: dict[str, Path]
) -> None:
    """LOOP_SET_FD, GET_STATUS, BLKGETSIZE(64), SET_STATUS, CLR_FD from an i386 program on the
    fd it opened before binding (the case the supervisor answers itself)."""
    image = images["ext4"]
    run = run_container(tmp_path, [str(abi32), "loop", "/dev/loop0", str(image)], policy=allow_policy(tmp_path))
    assert run.stdout.splitlines() == expected_lines(image, image.stat().st_size // 512), run.stderr
    served = {d["request"]: d for d in run.decisions("ioctl")}
    for request in ("0x4c00", "0x4c03", "0x1260", "0x80041272", "0x4c02", "0x4c01"):
        assert served[request]["abi"] == "i386" and served[request]["result"] == "OK", request


def test_i386_mount_goes_through_the_supervisor(
    tmp_path: Path, abi32: Path, images: dict[str, Path], mnt: Path
) -> None:
    run = run_container(
        tmp_path, [str(abi32), "mount", str(images["erofs"]), str(mnt), "erofs"], policy=allow_policy(tmp_path)
    )
    assert run.stdout.strip() == "OK", run.stderr
    (mount,) = run.decisions("mount")
    assert mount["abi"] == "i386" and mount["result"] == "OK"


def test_x32_calls_follow_the_kernel(tmp_path: Path, mountcall: Path, images: dict[str, Path], mnt: Path) -> None:
    """Served where the kernel runs x32; where it does not, ENOSYS as the kernel answers, audited."""
    run = run_container(
        tmp_path, [str(mountcall), "rawx32", "165", f"s:{images['erofs']}", f"s:{mnt}", "s:erofs", "1"],
        policy=allow_policy(tmp_path),
    )  # fmt: skip
    (mount,) = run.decisions("mount")
    assert mount["abi"] == "x32"
    if kernel_has_x32():
        assert run.stdout.strip() == "OK 0" and mount["result"] == "OK"
    else:
        assert run.stdout.strip() == "ENOSYS" and "CONFIG_X86_X32_ABI" in mount["error"]


def test_x32_binary(tmp_path: Path, workdir: Path, images: dict[str, Path]) -> None:
    if not kernel_has_x32():
        pytest.skip("this kernel has no x32 ABI (CONFIG_X86_X32_ABI is not set): it cannot run an x32 binary")
    binary = build(workdir, "-mx32")
    image = images["ext4"]
    run = run_container(tmp_path, [str(binary), "loop", "/dev/loop0", str(image)], policy=allow_policy(tmp_path))
    assert run.stdout.splitlines() == expected_lines(image, image.stat().st_size // 512), run.stderr


# --- the layouts themselves -------------------------------------------------------------------


def test_layout_sizes_are_the_kernels() -> None:
    assert (NATIVE64.info_old.size, COMPAT32.info_old.size) == (168, 140)
    assert (NATIVE64.ulong.size, COMPAT32.ulong.size) == (8, 4)
    assert (NATIVE64.size64_request, COMPAT32.size64_request) == (BLKGETSIZE64, BLKGETSIZE64_32)


@pytest.mark.parametrize("layout", [NATIVE64, COMPAT32])
def test_old_status_round_trips(layout: Layouts) -> None:
    name, key = b"/img".ljust(64, b"\0"), bytes(32)
    info = LoopInfo(0xFE00, 12, 0x700, 4096, 0, 3, 0, 0, 5, name, b"", key)
    raw = layout.pack_old(info)
    assert layout.unpack_old(raw, 77) == info._replace(sizelimit=77)


@pytest.mark.parametrize(
    "field", [{"device": 0x10000}, {"inode": 2**32}, {"offset": 2**31}, {"rdevice": 0x1_0000}, {"init0": 2**32}]
)
def test_what_does_not_fit_32_bits_is_eoverflow(field: dict[str, int]) -> None:
    with pytest.raises(KernelError) as exc:
        COMPAT32.pack_old(LoopInfo()._replace(**field))
    assert exc.value.errno == 75  # EOVERFLOW, as loop_info64_to_compat answers
