"""Acting on a kernel mount a handler decided: a superblock on a pool device, attached at the target.

The superblock is made by the minter from the host device (never a path the container
controls), then landed by way of `run`'s staging namespace, so the kernel locks its forced
flags (stager.py), or, in a container a runtime made, attached by the namespace helper.
"""

from __future__ import annotations

from ..call import Call
from ..image import ImageSource, pool_of
from ..loop.abi import LO_FLAGS_AUTOCLEAR
from ..loop.pool import BindRequest
from ..mountopts import MountOptions
from ..nshelper import Mount
from ..paths import Resolved
from ..policy import Decision
from ..probe import kernel_driver
from ..session import MountRecord


def attach(
    call: Call, src: ImageSource, where: Resolved, fstype: str, opts: MountOptions, decision: Decision
) -> MountRecord:
    """Superblock on the slot's device, landed by way of staging (flags locked) or attached directly;
    undone on failure."""
    pool = pool_of(call)
    slot = src.slot
    if slot is None:
        slot = pool.slots[pool.get_free()]
        bind = BindRequest(src.fd, src.policy_path, opts.read_only, flags=LO_FLAGS_AUTOCLEAR, backing_origin=src.origin)
        pool.bind(slot, bind)
    host_number = slot.host.number
    try:
        device = pool.mount_device(slot)
        call.target.check()  # a caller that died meanwhile gets no mount
        request = Mount(
            decision.idmap, kernel_driver(fstype), slot.number, device.rdev, opts.read_only,
            sorted(opts.attrs), list(opts.sb_flags), list(opts.fs_options),
        )  # fmt: skip
        landing = call.session.landing if locks_flags(call) else -1
        made = call.session.nshelper().mount(request, where.fd, call.session.userns_fd, landing)
        call.audit["idmapped"] = made["idmapped"]
    except BaseException:
        if src.slot is None:
            pool.last_use_ended(host_number)  # the slot bound for this mount alone
        raise
    return MountRecord(
        made["mnt_id"], made["dev"], made["root_ino"], src.policy_path, where.path, fstype, host_number,
        opts.read_only, decision.options, decision.rule, slot=slot.number,
    )  # fmt: skip


def locks_flags(call: Call) -> bool:
    """Whether the mount can come by way of staging, so the kernel locks its flags (stager.py)."""
    locked = call.session.landing >= 0
    call.audit["flags_locked"] = locked
    if not locked:
        call.audit["flags_unlocked_because"] = "the container's namespaces were not made by mountwarden run"
    return locked
