"""Attacks from the second red-team pass (staging namespace, Reconfigure, require_admin) that
still get past a guarantee.

Each test is the attack as root inside a `mountwarden run` container performs it, and asserts
the guarantee; a failing test here is an open hole (see the docstrings for the hole and a
suggested fix).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import descendants, read_audit
from test_locked_flags import Live

from supervisor import mountinfo


@pytest.fixture
def live(tmp_path: Path) -> Iterator[Live]:
    box = Live(tmp_path, "redteam2")
    try:
        yield box
    finally:
        box.close()


def _staging(live: Live) -> dict[int, mountinfo.Mount]:
    """The mount table of the run's staging namespace (its waiter's)."""
    waiter = next(p for p, n in descendants(live.proc.pid) if n == "mw-waiter")
    return mountinfo.parse(Path(f"/proc/{waiter}/mountinfo").read_text())


def test_releasing_a_staging_original_unmounts_only_that_original(
    live: Live, tmp_path: Path, workdir: Path, mountcall: Path, images: dict[str, Path]
) -> None:
    """Hole: the stager releases a staging original by `fchdir(fd); umount2(".", MNT_DETACH)`,
    but umount2's lookup (LOOKUP_MOUNTPOINT) steps down into whatever is mounted on the cwd, so
    it unmounts the mount stacked on the original instead of the original. The container
    stacks two images on one target (the second plan lands on the first staged original's
    root), binds the top one elsewhere and unmounts the target twice: sweep releases A's
    original and the stager detaches B's. A's original then stays in staging for the life of
    the container, holding its host loop device with no mount of the container showing it
    (its slot retired: the container's loop limit shrinks by one for good); the container's
    bind of B silently loses its master; and the later release of B's original fails EINVAL,
    which is what the next, successful, umount2 of an unrelated mount answers.

    Fix: the kernel has no unmount by fd, so never let the path step down: before
    `umount2(".")`, look in the stager's mountinfo for a mount whose parent is the original and
    whose mount point is the original's root (one the stager attached later on that place) and
    defer the release (keep `staged` in the record, retry on the next sweep) until it is gone;
    or let `plan` refuse a place that is the root of a staged original the stager holds (the
    helper then attaches it, audited `flags_locked: false`).
    """
    mc = str(mountcall)
    target, bind, other = (workdir / f"rt2-{name}-{tmp_path.name}" for name in ("t", "b", "c"))
    for d in (target, bind, other):
        d.mkdir()
    assert live.ask(f"{mc} mount {images['ext4']} {target} ext4 ro") == "OK"
    assert live.ask(f"{mc} mount {images['squashfs']} {target} squashfs ro") == "OK"
    assert live.ask(f"{mc} mount {target} {bind} - bind") == "OK"  # keeps B
    assert live.ask(f"{mc} umount {target}") == "OK"  # B's copy at the target
    assert live.ask(f"{mc} umount {target}") == "OK"  # A's copy: sweep releases A's original
    staged = {m.fstype for m in _staging(live).values() if m.mount_point == str(target)}
    assert staged == {"squashfs"}, f"staging holds {staged} at the target: A's original was kept, B's released"
    kept = live.mount_of(bind)
    assert kept is not None and any(t.startswith("master:") for t in kept.tags), kept
    assert live.ask(f"{mc} umount {bind}") == "OK"
    assert live.ask(f"{mc} mount {images['erofs']} {other} erofs ro") == "OK"
    assert live.ask(f"{mc} umount {other}") == "OK", [
        r.get("error") for r in read_audit(live.log) if r.get("result") not in ("OK", "CONTINUE", None)
    ]
