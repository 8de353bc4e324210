"""The filter is default-deny for the mount API: every mount-related call of this kernel's table,
and numbers above the tables the filter was written for, from inside a real container.

A classic-BPF interpreter runs the exported program for the ABIs this kernel cannot be asked to
run (x32 here, aarch64/arm anywhere) and for numbers whose native answer is ENOSYS anyway, so
there the filter's own answer is what is checked.
"""

from __future__ import annotations

import errno
import re
import struct
from pathlib import Path

import pytest
from conftest import allow_policy, calls, run_container, write_policy

from supervisor.seccomp import filter as seccomp_filter

SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_USER_NOTIF = 0x7FC00000
ENOSYS_RET = seccomp_filter.SECCOMP_RET_ERRNO | errno.ENOSYS
UNKNOWN = (470, 471, 500, 511, 1000, 0x3FFFFFFF)

# name -> (x86-64 nr, i386 nr, arguments, expected answer); "notify" reaches the supervisor,
# "native" runs in the kernel (any answer but ENOSYS), "ENOSYS" is the filter's refusal.
MOUNT_CALLS: dict[str, tuple[int | None, int | None, str, str]] = {
    "mount": (165, 21, "s:none s:/nonexistent s:ext4 1", "notify"),
    "umount": (166, 52, "s:/nonexistent 0", "notify"),  # the kernel's name for umount2
    "oldumount": (None, 22, "s:/nonexistent", "notify"),  # i386's umount(path)
    "pivot_root": (155, 217, "s:/nonexistent-a s:/nonexistent-b", "native"),
    "open_tree": (428, 428, "-100 s:/ 0", "native"),
    "move_mount": (429, 429, "-1 s: -1 s: 0", "native"),
    "fsopen": (430, 430, "s:tmpfs 0", "ENOSYS"),
    "fsconfig": (431, 431, "-1 0 0 0 0", "ENOSYS"),
    "fsmount": (432, 432, "-1 0 0", "ENOSYS"),
    "fspick": (433, 433, "-100 s:/ 0", "ENOSYS"),
    "mount_setattr": (442, 442, "-100 s:/ 0 0 0", "ENOSYS"),
    "statmount": (457, 457, "0 0 0 0", "native"),
    "listmount": (458, 458, "0 0 0 0", "native"),
    "open_tree_attr": (467, 467, "-100 s:/ 1 0 0", "ENOSYS"),
}
MOUNT_RELATED = re.compile(r"mount|open_tree|^fs(open|config|pick)$|pivot_root")


def kernel_mount_calls() -> set[str]:
    """The mount-related system calls this kernel was built with, from its symbol table."""
    names = set()
    with open("/proc/kallsyms") as f:
        for line in f:
            m = re.search(r" __(?:x64|ia32)_sys_(\w+)$", line.rstrip())
            if m and MOUNT_RELATED.search(m.group(1)):
                names.add(m.group(1))
    return names


def test_the_filter_was_written_for_every_mount_call_of_this_kernel() -> None:
    unknown = kernel_mount_calls() - set(MOUNT_CALLS)
    assert not unknown, f"this kernel has mount calls the filter does not know, decide their fate: {unknown}"
    assert {"mount", "umount", "open_tree_attr", "fsopen"} <= kernel_mount_calls()


def test_every_mount_call_and_unknown_numbers_from_a_container(tmp_path: Path, mountcall: Path) -> None:
    steps: list[tuple[str, str, str]] = []  # (what, abi, expected)
    commands = []
    for name, (nr64, nr32, args, expected) in MOUNT_CALLS.items():
        for abi, nr in (("x86_64", nr64), ("i386", nr32)):
            if nr is not None:
                steps.append((name, abi, expected))
                commands.append(f"{'raw' if abi == 'x86_64' else 'raw32'} {nr} {args}")
    for nr in UNKNOWN:
        for abi, cmd in (("x86_64", "raw"), ("i386", "raw32")):
            steps.append((f"nr {nr}", abi, "ENOSYS"))
            commands.append(f"{cmd} {nr} 0 0 0 0 0")
    run = run_container(tmp_path, calls(mountcall, *commands), policy=write_policy(tmp_path / "none.yaml", []))
    answers = run.stdout.split("\n")
    notified = [(d["syscall"], d.get("abi", "x86_64")) for d in run.decisions()]
    for (what, abi, expected), answer in zip(steps, answers, strict=False):
        if expected == "ENOSYS":
            assert answer == "ENOSYS", f"{what} on {abi}: {answer}"
        elif expected == "native":
            assert answer != "ENOSYS", f"{what} on {abi} should run natively"
    assert len(answers) >= len(steps), run.stderr
    want = [("mount", "x86_64"), ("mount", "i386"), ("umount2", "x86_64"), ("umount2", "i386"), ("umount", "i386")]
    assert notified == want, notified


def test_open_tree_attr_cannot_clear_forced_flags(
    tmp_path: Path, images: dict[str, Path], mountcall: Path, mnt: Path
) -> None:
    """The attack of issue 9 item 2: clone a supervisor mount with nosuid,nodev cleared, move it back."""
    mc, image = mountcall, images["ext4"]
    script = f"{mc} seq mount {image} {mnt} ext4 ro ';' open-tree-attr-clear {mnt}; grep ' {mnt} ' /proc/self/mountinfo"
    run = run_container(tmp_path, ["/bin/sh", "-c", f"{script}; {mc} umount {mnt}"], policy=allow_policy(tmp_path))
    lines = run.stdout.splitlines()
    assert lines[:2] == ["OK", "ENOSYS"], run.stderr
    assert all("nosuid" in line and "nodev" in line for line in lines[2:-1]) and len(lines) == 4, lines


# --- the program itself, instruction by instruction -------------------------------------------


def run_bpf(program: bytes, nr: int, arch: int, args: tuple[int, ...] = (0,) * 6) -> int:
    """Classic BPF as seccomp runs it, over struct seccomp_data (only what filters use)."""
    data = struct.pack("<IIQ6Q", nr, arch, 0, *args)
    insns = [struct.unpack_from("<HBBI", program, i) for i in range(0, len(program), 8)]
    pc, a, x, mem = 0, 0, 0, [0] * 16
    while True:
        code, jt, jf, k = insns[pc]
        pc += 1
        cls, op, src = code & 0x07, code & 0xF0, code & 0x08
        if code == 0x20:  # ld [k]
            a = struct.unpack_from("<I", data, k)[0]
        elif code == 0x00:  # ld #k
            a = k
        elif code == 0x02:  # st M[k]
            mem[k] = a
        elif code == 0x60:  # ld M[k]
            a = mem[k]
        elif code == 0x01:  # ldx #k
            x = k
        elif code == 0x61:  # ldx M[k]
            x = mem[k]
        elif code == 0x03:  # stx M[k]
            mem[k] = x
        elif cls == 0x04:  # alu
            v = x if src else k
            a = {0x00: a + v, 0x10: a - v, 0x50: a & v, 0x40: a | v, 0x60: a << v, 0x70: a >> v}[op] & 0xFFFFFFFF
        elif code == 0x05:  # ja
            pc += k
        elif cls == 0x05:
            v = x if src else k
            taken = {0x10: a == v, 0x20: a > v, 0x30: a >= v, 0x40: bool(a & v)}[op]
            pc += jt if taken else jf
        elif code == 0x06:  # ret #k
            return k
        elif code == 0x16:  # ret a
            return a
        else:
            raise AssertionError(f"instruction {code:#x} not modelled")


def _action(ret: int) -> int:
    return ret & 0xFFFF0000 if ret & 0xFFFF0000 != seccomp_filter.SECCOMP_RET_ERRNO else ret


@pytest.fixture(scope="module")
def program() -> bytes:
    return seccomp_filter.program()


def test_gate_answers_every_abi_of_this_machine(program: bytes) -> None:
    for table in seccomp_filter.ABI_TABLES:
        for nr in table.refused():
            assert run_bpf(program, nr, table.arch) == ENOSYS_RET, (table.name, nr)
        top = max(hi for _, hi in table.ranges)
        for nr in (top + 1, top + 2, top + 1000, (table.bit | 0x3FFFFFFF) if table.bit else 0x3FFFFFFF):
            assert run_bpf(program, nr, table.arch) == ENOSYS_RET, (table.name, nr)
        for lo, hi in table.ranges:  # known numbers are left to libseccomp's rules
            assert run_bpf(program, lo, table.arch) != ENOSYS_RET or lo in table.refused()
            assert _action(run_bpf(program, hi, table.arch)) in (SECCOMP_RET_ALLOW, SECCOMP_RET_USER_NOTIF)
        assert run_bpf(program, 0xFFFFFFFF, table.arch) == SECCOMP_RET_ALLOW  # a tracer's skipped call


def test_libseccomp_rules_still_decide_known_numbers(program: bytes) -> None:
    x86_64, x32, i386 = seccomp_filter.AUDIT_ARCH_X86_64, seccomp_filter.X32_SYSCALL_BIT, seccomp_filter.AUDIT_ARCH_I386
    assert _action(run_bpf(program, 165, x86_64)) == SECCOMP_RET_USER_NOTIF  # mount
    assert _action(run_bpf(program, 165, x86_64, (0, 0, 0, 0x1000, 0, 0))) == SECCOMP_RET_ALLOW  # bind
    assert _action(run_bpf(program, x32 | 165, x86_64)) == SECCOMP_RET_USER_NOTIF  # x32 mount
    assert _action(run_bpf(program, x32 | 514, x86_64, (0, 0x4C05, 0, 0, 0, 0))) == SECCOMP_RET_USER_NOTIF
    assert _action(run_bpf(program, 21, i386)) == SECCOMP_RET_USER_NOTIF
    assert _action(run_bpf(program, 54, i386, (0, 0x80041272, 0, 0, 0, 0))) == SECCOMP_RET_USER_NOTIF
    assert run_bpf(program, 428, x86_64) == SECCOMP_RET_ALLOW  # open_tree
    assert run_bpf(program, x32 | 520, x86_64) == SECCOMP_RET_ALLOW  # x32's own execve
    assert run_bpf(program, x32 | 500, x86_64) == ENOSYS_RET  # the hole between x32's ranges


def test_gate_for_arm_machines() -> None:
    """aarch64 with its arm compat ABI: arm's private calls (set_tls) stay allowed."""
    tables = (
        seccomp_filter.AbiTable("aarch64", seccomp_filter.AUDIT_ARCH_AARCH64, seccomp_filter._BASE),
        seccomp_filter.AbiTable("arm", seccomp_filter.AUDIT_ARCH_ARM, seccomp_filter._ARM),
    )
    gate = seccomp_filter.gate(tables) + struct.pack("<HBBI", 0x06, 0, 0, SECCOMP_RET_ALLOW)
    for arch in (seccomp_filter.AUDIT_ARCH_AARCH64, seccomp_filter.AUDIT_ARCH_ARM):
        assert run_bpf(gate, 467, arch) == ENOSYS_RET
        assert run_bpf(gate, 470, arch) == ENOSYS_RET
        assert run_bpf(gate, 40, arch) == SECCOMP_RET_ALLOW
    assert run_bpf(gate, 0x0F0005, seccomp_filter.AUDIT_ARCH_ARM) == SECCOMP_RET_ALLOW
    assert run_bpf(gate, 0x0F0005, seccomp_filter.AUDIT_ARCH_AARCH64) == ENOSYS_RET
    assert run_bpf(gate, 1, 0x12345678) == SECCOMP_RET_ALLOW  # unknown arch: libseccomp's bad-arch action decides
