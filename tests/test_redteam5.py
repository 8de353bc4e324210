"""Fifth red-team pass: the fixes of passes 3 and 4 (the FUSE daemon's served mount(2), serve's
take-back, notified binds and moves), attacked with real containers.

The attacker is the root of the container (root of its user namespace, CAP_SYS_ADMIN there)
under the filter `run` loads (the one every FUSE daemon loads too) or under the profile
`mountwarden profile oci` prints. Each hole found is kept as the test that now fails closed,
its docstring saying what was wrong; attacks that failed stay as guards.
"""

from __future__ import annotations

from pathlib import Path

import oci
from conftest import allow_policy
from test_locked_flags import Live

from supervisor.sources import oci as oci_source

# mount(2)'s old magic number: the kernel discards bits 16-31 of the flags when they hold
# exactly 0xC0ED (path_mount, "Discard magic"). Those bits include MS_PRIVATE and MS_SLAVE.
MS_MGC_VAL = 0xC0ED0000


def test_a_new_superblock_under_the_magic_number_is_seen(tmp_path: Path, mountcall: Path, mnt: Path) -> None:
    """Hole: the filter notifies mount(2) only when no bind, move or propagation bit is set
    (seccomp/filter.py NO_NEW_SB). 0xC0ED0000 has MS_PRIVATE and MS_SLAVE set, so the call
    runs natively, and the kernel, seeing its magic number, drops bits 16-31 and makes a new
    superblock (do_new_mount): the supervisor never sees it. Here a tmpfs; the same filter is
    the jailed FUSE daemon's, whose mount(2) with these flags is therefore never served by
    `daemon_mount`: a daemon the container drives (ptrace) attaches its FUSE mount in its
    jail with the flags it likes, which f2e5f66 set out to prevent.

    Fixed: the filter notifies any mount(2) carrying the magic number, and the handler drops it
    as the kernel does before it looks at the flags."""
    live = Live(tmp_path, "rt5-magic")
    try:
        assert live.ask(f"{mountcall} mount none {mnt} tmpfs {MS_MGC_VAL:#x}") == "OK"
        made = live.mount_of(mnt)
        assert made is not None and made.fstype == "tmpfs"  # the kernel did make one
        assert live.ask(f"{mountcall} umount {mnt}") == "OK"
        seen = [d for d in live.decisions() if d.get("syscall") == "mount"]
        assert seen, "the supervisor saw no mount(2) at all"
    finally:
        live.close()


def test_a_native_bind_after_adoption_keeps_forced_flags(
    tmp_path: Path, workdir: Path, mountcall: Path, images: dict[str, Path]
) -> None:
    """Guard: a runtime's container gets the magic number answered CONTINUE as a propagation
    change (the kernel then makes a userns tmpfs, which it would have allowed anyway), and
    every bind/move/propagation combination leaves the supervisor's forced flags in place."""
    root = oci.rootfs(workdir / f"oci-root-{tmp_path.name}", mountcall)
    mc = "/bin/mountcall"
    wait = "i=0; while [ ! -e /dev/loop-control ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done"
    script = (
        f"{wait}; mount -o loop,ro /img/{images['ext4'].name} /mnt && "
        f"{mc} seq mount /mnt /tmp none bind,rec ';' mount - /tmp - private,rec ';' "
        f"mount none /tmp - {MS_MGC_VAL | 0x1000:#x} ';' mount - /tmp - {MS_MGC_VAL:#x}; "
        "grep ' /tmp \\| /mnt ' /proc/self/mountinfo"
    )
    with oci.serving(tmp_path, allow_policy(tmp_path, options=["nosuid", "nodev", "noexec"])) as serve:
        profile = oci_source.profile(None, str(serve.socket), runtime="runc", metadata="redteam5")
        run = oci.run("runc", tmp_path, "mw-rt5-bind", oci.config(root, ["/bin/sh", "-c", script], profile,
                                                                  images["ext4"].parent))  # fmt: skip
        assert run.returncode == 0, run.stdout + run.stderr
        serve.wait_for("container-released")
    lines = [line for line in run.stdout.splitlines() if "/tmp" in line.split()[4:5] or "/mnt" in line.split()[4:5]]
    assert lines, run.stdout
    for line in lines:
        if " ext4 " in line:
            assert {"nosuid", "nodev", "noexec"} <= set(line.split()[5].split(",")), line
