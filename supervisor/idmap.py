"""The host id range a container's user namespace maps onto (/etc/subuid, /etc/subgid)."""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from typing import Final

OWNER: Final = "mountwarden"
DEFAULT_START: Final = 100000
DEFAULT_COUNT: Final = 65536


@dataclass(frozen=True)
class IdRange:
    """Container ids 0..count-1 are host ids start..start+count-1."""

    start: int
    count: int

    def map_line(self) -> str:
        return f"0 {self.start} {self.count}\n"

    def host(self, container_id: int) -> int:
        return self.start + container_id

    def contains(self, host_id: int) -> bool:
        return self.start <= host_id < self.start + self.count


def _entries(path: str) -> list[tuple[str, int, int]]:
    out = []
    try:
        with open(path) as f:
            for line in f:
                parts = line.strip().split(":")
                if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
                    out.append((parts[0], int(parts[1]), int(parts[2])))
    except FileNotFoundError:
        pass
    return out


def reserve(path: str, owner: str = OWNER) -> IdRange:
    """The owner's range in `path`; if there is none, append one that overlaps no other entry."""
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        entries = _entries(path)
        for name, start, count in entries:
            if name == owner:
                return IdRange(start, count)
        start = DEFAULT_START
        for _, s, c in sorted(entries, key=lambda e: e[1]):
            if s < start + DEFAULT_COUNT and start < s + c:
                start = s + c
        f.seek(0, os.SEEK_END)
        f.write(f"{owner}:{start}:{DEFAULT_COUNT}\n")
        return IdRange(start, DEFAULT_COUNT)


def subordinate(path: str, name: str, number: int) -> IdRange | None:
    """The first range `path` (/etc/subuid or /etc/subgid) gives the user `name` (or its number)."""
    for owner, start, count in _entries(path):
        if owner in (name, str(number)) and count > 0:
            return IdRange(start, count)
    return None


def root_of(pid: int) -> tuple[int, int]:
    """The host uid and gid of root in the user namespace of process `pid` (0, 0 if it is the host's)."""
    return _host_id(f"/proc/{pid}/uid_map"), _host_id(f"/proc/{pid}/gid_map")


def _host_id(path: str) -> int:
    with open(path) as f:
        for line in f:
            inside, outside, count = (int(x) for x in line.split())
            if inside == 0 and count > 0:
                return outside
    raise ValueError(f"{path} maps no root: the container has no root to act as")
