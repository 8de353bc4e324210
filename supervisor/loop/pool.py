"""The private loop pool: a container's own /dev/loop-control and /dev/loopN, numbered from 0.

The container holds nodes only for what is its own:

* ``/dev/loop-control`` is a node of the null device (c 1:3); every loop request on it is
  intercepted and answered from here, so the real loop-control is never in reach.
* ``/dev/loopN`` of a bound device is a node of the host device that backs it (b 7:X), so
  reads, writes and blkid work at full speed. The device cgroup allows exactly those.
* ``/dev/loopN`` of a free device is a node of one placeholder host device per container, bound
  to an empty memfd: a block device the container may open (tools insist on S_ISBLK) that holds
  nothing and that nobody else can be given. When the container binds slot N, a fresh host
  device is bound to its file and the node is replaced; an fd opened before still refers to the
  placeholder and is recognised by its inode.

Every node the pool makes (these, and the ones a FUSE daemon's jail binds) is disowned, made host
root's with no access bits, the moment it stops naming a device of the container's: when it is
replaced, removed, or the slot released, and at close. Someone who kept a way to it (an O_PATH
fd, which opens nothing and holds no device; a bind; a way in through /proc/<pid>/root, which
an ordinary user has to its own container) could otherwise open it again once the host device
behind its number is someone else's. Disowning comes before the pool lets go of the device.

Lifetime: every host device is configured with autoclear, and the pool holds one fd on each
bound device. Releasing a slot closes that fd; the kernel detaches the device once the
container's own fds and mounts on it are gone. If the supervisor dies, its fds close and the
same happens.

Limits count what is held, not what is bound in a slot: a released device whose binding is
still alive (the container kept an fd on it, or a mount of it lives on in a namespace it made)
is kept as retired, with its per-uid quota ticket, and still counts against both limits until
the kernel has detached it. Retired devices are identified by their diskseq, so a device
detached and bound again by someone else is not mistaken for ours, and re-checked lazily before
every limit decision and at close. The device cgroup grant goes with the slot: device cgroups
check opens only, and the container cannot open the retired device anew.

Partition scanning (LO_FLAGS_PARTSCAN) is never set on a host device: the host's partition
parsers and udev rules (LVM, md) would run on the container's bytes. The container is answered
as a kernel without partition parsers would: the flag reads back as set, no partition appears.

Lock order: the pool is single-threaded; host allocation takes the device's
BSD lock inside `device.attach`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol

from .. import fdops
from ..cgroup import DeviceCgroup
from ..errors import KernelError
from ..policy import SourceOrigin
from . import quota
from .abi import LO_FLAGS_AUTOCLEAR, LO_FLAGS_DIRECT_IO, LO_FLAGS_PARTSCAN, LOOP_MAJOR
from .device import (
    LoopDevice,
    attach,
    clear_read_only,
    device_size,
    diskseq,
    logical_block_size,
    read_only,
    status64,
    still_bound,
)
from .sysview import LoopState, SysView

NODE_MODE: Final = 0o660
# In the container's /dev, host root's: where replacement nodes are made (here), where `run`'s
# mounts land (stager.py), and where a runtime's container finds the pool's nodes (adopted.py).
PRIVATE_DIR: Final = ".mountwarden"


class Keeper(Protocol):
    """Holds a second fd on each host device the pool shows a container that outlives the
    supervisor (nshelper.Keep), and lets it go once the device's nodes are disowned."""

    def keep(self, device_fd: int, number: int) -> None: ...
    def let_go(self, number: int) -> None: ...


@dataclass
class Slot:
    """Container loop device N: free (device None) or bound to a host device."""

    number: int
    node_fd: int  # O_PATH on the inode /dev/loopN is now, to disown it when it is replaced
    node_ino: int
    device: LoopDevice | None = None
    backing_path: str = ""
    autoclear: bool = False
    partscan: bool = False  # what the container asked for; never set on the host device
    ticket: quota.Ticket | None = None
    backing_origin: SourceOrigin = "container"  # judged when bound, never re-read (supervisor/origin.py)
    jail_nodes: list[tuple[str, int]] = field(default_factory=list)  # (name, O_PATH fd) of the bound device
    backing_fd: int = -1  # the judged backing file, in a user-owned pool (see `mount_device`)
    window: tuple[int, int] = (0, 0)  # offset and size limit, as the container set them through us
    private: LoopDevice | None = None  # the device its kernel mounts are made from, in a user-owned pool
    private_ticket: quota.Ticket | None = None

    @property
    def host(self) -> LoopDevice:
        if self.device is None:
            raise KernelError(errno.ENXIO, f"/dev/loop{self.number} is not bound to a file")
        return self.device


@dataclass(frozen=True)
class Retired:
    """A host device released from its slot whose binding may still be held by the container."""

    number: int
    diskseq: int
    ticket: quota.Ticket | None

    def bound(self) -> bool:
        return still_bound(self.number, self.diskseq)


@dataclass(frozen=True)
class BindRequest:
    """What the container asked LOOP_SET_FD / LOOP_CONFIGURE for, on its own backing fd."""

    backing_fd: int
    backing_path: str
    read_only: bool
    offset: int = 0
    sizelimit: int = 0
    flags: int = 0
    block_size: int = 0
    name: str = ""
    backing_origin: SourceOrigin = "container"


class LoopPool:
    """One container's loop devices; `close` releases them all."""

    def __init__(
        self,
        *,
        dev_fd: int,
        sysview: SysView,
        owner: tuple[int, int],
        limit: int,
        host_uid: int,
        per_uid_limit: int,
        cgroups: Sequence[DeviceCgroup],
        keeper: Keeper | None = None,
        user_owned: bool = False,
    ) -> None:
        self.dev_fd, self.sysview, self.owner, self.keeper = dev_fd, sysview, owner, keeper
        self.limit, self.host_uid, self.per_uid_limit = limit, host_uid, per_uid_limit
        self.cgroups = list(cgroups)
        self.slots: dict[int, Slot] = {}
        self.retired: list[Retired] = []
        self.by_ino: dict[int, int] = {}  # node inode (current or replaced) -> slot number
        self.dev_st_dev = os.fstat(dev_fd).st_dev
        # dev_fd is the supervisor's own copy of the container's /dev mount (no binds of the
        # container's in it). Replacement nodes are made in a directory of host root's, mode
        # 0700, so the container cannot even look up, let alone bind over, a node being made.
        with contextlib.suppress(FileExistsError):
            os.mkdir(PRIVATE_DIR, 0o700, dir_fd=dev_fd)
        self.control_ino = -1
        # An ordinary user's own processes may hold the placeholder open past the container's
        # end (the kernel then keeps it bound): for such a container it is one of the user's
        # devices, with a ticket, so a user cannot pin one per container it starts unbounded.
        self.user_owned = user_owned
        self._placeholder_ticket: quota.Ticket | None = None
        self.placeholder: LoopDevice | None = None
        self._memfd = -1
        self._jail_serial = 0

    # --- set-up and teardown -------------------------------------------------------------

    def start(self) -> None:
        """Create the placeholder, /dev/loop-control and one free node per allowed device."""
        self._memfd = os.memfd_create("mountwarden-free-loop", os.MFD_CLOEXEC)
        self.placeholder, self._placeholder_ticket = self._counted_attach(
            self._memfd, counted=self.user_owned, keep=True, read_only=False, name="mountwarden free loop device"
        )
        self._grant(self.placeholder.rdev)
        control, self.control_ino = self._make_node("loop-control", stat.S_IFCHR, os.makedev(1, 3))
        os.close(control)
        for number in range(self.limit):
            self._add(number)

    def close(self, on_error: Callable[[str], None] | None = None) -> list[int]:
        """Release every slot and the placeholder; returns the host device numbers involved.

        A slot that fails to release is reported to `on_error` and the rest still go; its host
        device still has autoclear, so closing the pool's fds below releases it anyway. Retired
        devices keep their quota tickets until `settle` sees them detached.
        """
        numbers: list[int] = []  # of devices that failed to release: not in `retired`
        for slot in list(self.slots.values()):
            if slot.device is None:
                continue
            try:
                self._release(slot)
            except Exception:
                if on_error is None:
                    raise
                on_error(f"releasing /dev/loop{slot.number}")
                numbers.append(slot.host.number)
                slot.host.close()
        for slot in self.slots.values():  # the placeholder's nodes, now all of them
            self._disown(slot.node_fd)
            slot.node_fd = -1
        if self.placeholder is not None:
            clear_read_only(self.placeholder.fd)
            if self.keeper is not None:
                self.keeper.let_go(self.placeholder.number)
            self.placeholder.close()
            self.retired.append(Retired(self.placeholder.number, self.placeholder.diskseq, self._placeholder_ticket))
            self.placeholder, self._placeholder_ticket = None, None
        if self._placeholder_ticket is not None:  # start failed before the placeholder was made
            self._placeholder_ticket.release()
            self._placeholder_ticket = None
        if self._memfd >= 0:
            os.close(self._memfd)
            self._memfd = -1
        return sorted({*numbers, *(r.number for r in self.retired)})

    def hand_over(self) -> None:
        """After close: the tickets of devices still bound linger in the quota (quota.linger)."""
        for gone in self.retired:
            if gone.ticket is not None:
                quota.linger(gone.ticket, gone.bound)
        self.retired = []

    # --- identification ----------------------------------------------------------------------

    def is_control(self, st: os.stat_result) -> bool:
        return st.st_dev == self.dev_st_dev and st.st_ino == self.control_ino

    def slot_for(self, st: os.stat_result) -> Slot | None:
        """The slot an fd or path refers to: by its node's inode, or a bound device's number.

        A node of an earlier binding of the slot (an fd kept across LOOP_CLR_FD) is no longer
        the slot: it refers to a retired device.
        """
        if st.st_dev == self.dev_st_dev and st.st_ino in self.by_ino:
            slot = self.slots.get(self.by_ino[st.st_ino])
            if slot is not None and stat.S_ISBLK(st.st_mode) and self.is_retired(st.st_rdev):
                return None
            return slot
        if stat.S_ISBLK(st.st_mode):
            return self.slot_for_rdev(st.st_rdev)
        return None

    def is_retired(self, rdev: int) -> bool:
        """Whether `rdev` is a host device this pool released from its slot."""
        return os.major(rdev) == LOOP_MAJOR and any(r.number == os.minor(rdev) for r in self.retired)

    def slot_for_rdev(self, rdev: int) -> Slot | None:
        return next((s for s in self.slots.values() if s.device and s.device.rdev == rdev), None)

    def slot_for_host(self, number: int) -> Slot | None:
        return next((s for s in self.slots.values() if s.device and s.device.number == number), None)

    def ensure_fuse(self) -> None:
        """Give the container /dev/fuse (for the FUSE daemons run in it), once."""
        try:
            os.stat("fuse", dir_fd=self.dev_fd, follow_symlinks=False)
        except FileNotFoundError:
            os.close(self._make_node("fuse", stat.S_IFCHR, os.makedev(10, 229), mode=0o666)[0])
            for group in self.cgroups:
                group.allow(("c", 10, 229))

    def settle(self) -> list[int]:
        """Return the quota of retired devices the kernel has detached; the numbers still held."""
        for gone in [r for r in self.retired if not r.bound()]:
            self.retired.remove(gone)
            if gone.ticket is not None:
                gone.ticket.release()
        return [r.number for r in self.retired]

    def bound_count(self) -> int:
        return sum(1 for slot in self.slots.values() if slot.device is not None)

    def held_count(self) -> int:
        """Host devices this container holds: bound slots and released bindings not yet detached."""
        return self.bound_count() + len(self.settle())

    def holds(self, host_number: int) -> bool:
        """Whether host device `host_number` is still one of this container's (bound or retired)."""
        return self.slot_for_host(host_number) is not None or host_number in self.settle()

    def _check_limit(self) -> None:
        if self.held_count() >= self.limit:
            lingering = len(self.retired)
            why = f" ({lingering} of them cleared but still held open or mounted)" if lingering else ""
            raise KernelError(errno.ENOSPC, f"this container already holds its limit of {self.limit} loop devices{why}")

    # --- loop-control ------------------------------------------------------------------------

    def get_free(self) -> int:
        """LOOP_CTL_GET_FREE: the lowest free number, creating its node if it was removed."""
        self._check_limit()
        for number in range(self.limit):
            slot = self.slots.get(number)
            if slot is None:
                self._add(number)
                return number
            if slot.device is None:
                return number
        raise KernelError(errno.ENOSPC, f"this container already uses its limit of {self.limit} loop devices")

    def add(self, number: int) -> int:
        """LOOP_CTL_ADD."""
        if number in self.slots:
            raise KernelError(errno.EEXIST, f"/dev/loop{number} exists")
        if not 0 <= number < self.limit:
            raise KernelError(errno.ENOSPC, f"loop device numbers in this container end at {self.limit - 1}")
        self._add(number)
        return number

    def remove(self, number: int) -> None:
        """LOOP_CTL_REMOVE."""
        slot = self.slots.get(number)
        if slot is None:
            raise KernelError(errno.ENODEV, f"/dev/loop{number} does not exist")
        if slot.device is not None:
            raise KernelError(errno.EBUSY, f"/dev/loop{number} is bound")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"loop{number}", dir_fd=self.dev_fd)
        self._disown(slot.node_fd)
        self.sysview.remove(number)
        del self.slots[number]

    # --- binding -----------------------------------------------------------------------------

    def bind(self, slot: Slot, req: BindRequest) -> None:
        """LOOP_SET_FD / LOOP_CONFIGURE: a fresh host device on the container's own file."""
        if slot.device is not None:
            raise KernelError(errno.EBUSY, f"/dev/loop{slot.number} is already bound")
        self._check_limit()
        device, slot.ticket = self._counted_attach(
            req.backing_fd, counted=True, keep=True, read_only=req.read_only, name=req.name or req.backing_path,
            offset=req.offset, sizelimit=req.sizelimit, flags=req.flags & LO_FLAGS_DIRECT_IO,  # never PARTSCAN
            block_size=req.block_size,
        )  # fmt: skip
        slot.device = device
        slot.window = (req.offset, req.sizelimit)
        if self.user_owned:
            slot.backing_fd = os.dup(req.backing_fd)
        slot.backing_path = req.backing_path
        slot.backing_origin = req.backing_origin
        slot.autoclear = bool(req.flags & LO_FLAGS_AUTOCLEAR)
        slot.partscan = bool(req.flags & LO_FLAGS_PARTSCAN)
        self._grant(device.rdev)
        self._replace_node(slot, device.rdev)
        self.refresh(slot)

    def refresh(self, slot: Slot) -> None:
        """Bring the sysfs view of a bound slot up to date with the device.

        Called after every request that changes a device, before the container's call
        returns: each such request is the supervisor's own (every loop request and the gated
        block ones are notified), and the kernel changes none of these attributes by itself
        while the pool holds the device. Following the kernel's uevents instead would update
        the view only after the call returned, so a read right after LOOP_SET_CAPACITY could
        show the old size.
        """
        device = slot.host
        device.diskseq = diskseq(device.fd)  # our own changes (CHANGE_FD) may move it on
        info = status64(device.fd)
        state = LoopState(
            backing_file=slot.backing_path, offset=info.offset, sizelimit=info.sizelimit, autoclear=slot.autoclear,
            partscan=slot.partscan, read_only=read_only(device.fd), direct_io=bool(info.flags & LO_FLAGS_DIRECT_IO),
            size_bytes=device_size(device.fd), block_size=logical_block_size(device.fd),
        )  # fmt: skip
        self.sysview.bind(slot.number, device.rdev, state)

    def clear(self, slot: Slot, busy: Callable[[int], bool]) -> None:
        """LOOP_CLR_FD: detach now, or, like the kernel, at last use if still mounted."""
        device = slot.host
        if busy(device.number):
            slot.autoclear = True
            self.refresh(slot)
            return
        self._release(slot)

    def last_use_ended(self, host_number: int) -> None:
        """A mount of a pool device went away: an autoclear slot is released now."""
        slot = self.slot_for_host(host_number)
        if slot is not None and slot.autoclear:
            self._release(slot)

    def mount_device(self, slot: Slot) -> LoopDevice:
        """The host device a kernel mount of the slot is made from.

        Its own device, except in an ordinary user's container: the user's processes outside
        the container (no filter) can open the slot's device and LOOP_CHANGE_FD it to a file of
        their own, before or under a mount, so the host kernel would parse a file policy never
        judged. There a private device with no node anywhere is bound to the judged file, at
        the offset and size limit the container set through the supervisor (never as read back
        from the slot's device, which the user may have moved to another window of the file),
        and kept while the slot stays as it is (a change of backing file, offset or capacity is
        refused while mounted).
        """
        device = slot.host
        if not self.user_owned:
            return device
        if slot.private is None:
            offset, sizelimit = slot.window
            slot.private, slot.private_ticket = self._counted_attach(
                slot.backing_fd, counted=True, keep=False, read_only=read_only(device.fd), name=slot.backing_path,
                offset=offset, sizelimit=sizelimit, block_size=logical_block_size(device.fd),
            )  # fmt: skip
        return slot.private

    def private_claimed(self, slot: Slot) -> bool:
        """Whether a filesystem still holds the slot's private device: mounted, or unmounted
        lazily while files stay open (which no mount table shows)."""
        if slot.private is None:
            return False
        try:
            os.close(os.open(f"/proc/self/fd/{slot.private.fd}", os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC))
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                return True
            raise KernelError(exc.errno or errno.EIO, "cannot check the private mount device") from None
        return False

    def changed(self, slot: Slot, *, backing_fd: int = -1, window: tuple[int, int] | None = None) -> None:
        """A served request changed the slot's backing file, window or capacity (each refused
        while mounted): the private device of its next mount is made afresh."""
        if window is not None:
            slot.window = window
        if backing_fd >= 0 and slot.backing_fd >= 0:
            os.close(slot.backing_fd)
            slot.backing_fd = os.dup(backing_fd)
        self._drop_private(slot)

    def jail_node(self, slot: Slot, owner: tuple[int, int], mode: int) -> int:
        """A node of the slot's bound device for a FUSE daemon's jail (an O_PATH fd the caller closes).

        Made here, not in the jail, so that it is disowned with the slot's own node: the daemon
        runs as the container's root, whose host owner may reach the jail (/proc/<pid>/root).
        """
        self._jail_serial += 1
        name = f"{PRIVATE_DIR}/jail-loop{slot.number}-{self._jail_serial}"
        fd, _ = self._make_node(name, stat.S_IFBLK, slot.host.rdev, owner=owner, mode=mode)
        slot.jail_nodes.append((name, fd))
        return os.dup(fd)

    def _release(self, slot: Slot) -> None:
        device = slot.host
        assert self.placeholder is not None
        self._replace_node(slot, self.placeholder.rdev)
        for name, fd in slot.jail_nodes:
            self._disown(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=self.dev_fd)
        slot.jail_nodes = []
        self._drop_private(slot)
        if slot.backing_fd >= 0:
            os.close(slot.backing_fd)
            slot.backing_fd = -1
        self.sysview.unbind(slot.number, device.rdev, self.placeholder.rdev)
        self._revoke(device.rdev)
        clear_read_only(device.fd)
        if self.keeper is not None:
            self.keeper.let_go(device.number)
        # Autoclear: the host device goes once the container's fds and mounts on it are gone;
        # until then it still counts, with its ticket.
        self.retired.append(Retired(device.number, device.diskseq, slot.ticket))
        device.close()
        slot.device, slot.ticket, slot.backing_path, slot.autoclear, slot.partscan = None, None, "", False, False
        slot.backing_origin = "container"

    # --- nodes and cgroups -------------------------------------------------------------------

    def _add(self, number: int) -> None:
        assert self.placeholder is not None
        fd, ino = self._make_node(f"loop{number}", stat.S_IFBLK, self.placeholder.rdev)
        self.slots[number] = Slot(number, fd, ino)
        self.by_ino[ino] = number
        self.sysview.add(number, self.placeholder.rdev)

    def _replace_node(self, slot: Slot, rdev: int) -> None:
        """Swap /dev/loopN for a node of `rdev` in one rename, so the name never dangles; the
        node replaced is disowned."""
        fd, ino = self._make_node(f"{PRIVATE_DIR}/loop{slot.number}", stat.S_IFBLK, rdev)
        try:
            os.rename(
                f"{PRIVATE_DIR}/loop{slot.number}", f"loop{slot.number}", src_dir_fd=self.dev_fd,
                dst_dir_fd=self.dev_fd,
            )  # fmt: skip
        except BaseException:
            os.close(fd)
            raise
        old, slot.node_fd, slot.node_ino = slot.node_fd, fd, ino
        self.by_ino[ino] = slot.number
        self._disown(old)

    def _drop_private(self, slot: Slot) -> None:
        """Let the slot's private device go: a filesystem still on it keeps it bound (autoclear),
        and counted, as retired, until the kernel detaches it."""
        private = slot.private
        if private is not None:
            private.close()
            self.retired.append(Retired(private.number, private.diskseq, slot.private_ticket))
            slot.private, slot.private_ticket = None, None

    def _counted_attach(
        self, backing_fd: int, *, counted: bool, keep: bool, read_only: bool, name: str, offset: int = 0,
        sizelimit: int = 0, flags: int = 0, block_size: int = 0,
    ) -> tuple[LoopDevice, quota.Ticket | None]:  # fmt: skip
        """A fresh host device on `backing_fd` with, if `counted`, a ticket of the uid's quota and,
        if `keep`, the keeper's fd on it (a device with a node the container may open); undone
        whole on failure."""
        ticket = quota.acquire(self.host_uid, self.per_uid_limit) if counted else None
        device: LoopDevice | None = None
        try:
            device = attach(
                backing_fd, read_only=read_only, name=name, offset=offset, sizelimit=sizelimit, flags=flags,
                block_size=block_size,
            )  # fmt: skip
            if keep and self.keeper is not None:
                self.keeper.keep(device.fd, device.number)
        except BaseException:
            if device is not None:
                device.close()
            if ticket is not None:
                ticket.release()
            raise
        return device, ticket

    @staticmethod
    def _disown(fd: int) -> None:
        if fd >= 0:
            try:
                fdops.disown(fd)
            finally:
                os.close(fd)

    def _make_node(
        self, name: str, kind: int, rdev: int, *, owner: tuple[int, int] | None = None, mode: int = NODE_MODE
    ) -> tuple[int, int]:
        """mknod in the pool's private copy of /dev, then chown/chmod that very inode (by fd).

        Returns an O_PATH fd on the node and its inode number."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=self.dev_fd)
        os.mknod(name, kind | 0o600, rdev, dir_fd=self.dev_fd)
        fd = fdops.open_beneath(self.dev_fd, name, os.O_PATH)
        try:
            st = os.fstat(fd)
            if stat.S_IFMT(st.st_mode) != kind or st.st_rdev != rdev:
                raise KernelError(errno.EEXIST, "another file took the place of a new device node", f"/dev/{name}")
            fdops.set_owner(fd, *(owner or self.owner), mode)
        except BaseException:
            os.close(fd)
            raise
        return fd, st.st_ino

    def _grant(self, rdev: int) -> None:
        for group in self.cgroups:
            group.allow(("b", os.major(rdev), os.minor(rdev)))

    def _revoke(self, rdev: int) -> None:
        for group in self.cgroups:
            group.deny(("b", os.major(rdev), os.minor(rdev)))
