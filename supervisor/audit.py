"""structlog set-up, the audit record (one JSON line per decision) and its per-container flood control.

A container can make intercepted calls as fast as the supervisor answers them, and each one
would otherwise cost a log line: a tight loop of failing umount2 calls fills a disk. The
`AuditLimiter` writes the first records of each kind in every window in full and counts the
rest into one `audit-suppressed` record per kind and window, so nothing is lost silently and
the volume per window is bounded. Answers to the kernel never wait for any of this.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, TextIO, TypeVar

import structlog

AUDIT_EVENT: Final = "mount-decision"
SUPPRESSED_EVENT: Final = "audit-suppressed"
GRANTS: Final = frozenset({"kernel", "fuse", "remount", "unmount"})  # actions that made or undid a mount
RECORD_OVERHEAD: Final = 160  # bytes structlog adds to a record: timestamp, level, event, container
MAX_PIDS: Final = 8  # pids named per summary: enough to find the culprit, bounded whatever the flood

Kind = tuple[str, str, str]  # (syscall, result, action)
OTHER_KIND: Final[Kind] = ("other", "other", "other")


def configure(stream: TextIO | None = None, level: int = logging.INFO) -> None:
    """Send JSON lines to `stream` (stderr by default): audit records and the few operational events.

    Mount data can carry credentials, so it is logged only at debug level (``--verbose``).
    """
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(level),
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.format_exc_info,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.JSONRenderer(sort_keys=False),
        ],
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stderr),
        cache_logger_on_first_use=False,
    )


def logger(**bound: Any) -> Any:
    return structlog.get_logger("mountwarden").bind(**bound)


@dataclass(frozen=True)
class Limits:
    """How much one container may write to the audit log per window.

    The defaults let a workload mount dozens of images a second with every record in full
    (a `mount -o loop` is about ten records of different kinds), while a flood costs at most
    `max_bytes` of full records plus `max_kinds` short summaries per window.
    """

    interval: float = 10.0  # seconds per window
    per_kind: int = 50  # full records of one (syscall, result, action) per window
    max_bytes: int = 64 * 1024  # full records of all kinds together per window
    grant_reserve: int = 16 * 1024  # of max_bytes, only for grants
    max_kinds: int = 64  # summaries per window, the last one counting all further kinds as "other"


@dataclass
class _Suppressed:
    """What was counted instead of written, for one kind in one window."""

    count: int = 0
    first: float = 0.0  # wall-clock times of the first and last record counted
    last: float = 0.0
    pids: set[int] = field(default_factory=set)


_F = TypeVar("_F", bound=Callable[..., Any])


def _locked(method: _F) -> _F:
    """The loop asks for the window's time left while the session's worker records decisions."""

    @functools.wraps(method)
    def wrapper(self: AuditLimiter, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


@dataclass
class AuditLimiter:
    """Per-container flood control for decision records (see the module docstring).

    `record` writes or counts one decision; `tick` writes the summaries of an ended window and
    returns how long the current one has left (an epoll timeout, -1 when nothing is pending);
    `flush` writes whatever is pending, at the end of the session.
    """

    log: Any
    limits: Limits = field(default_factory=Limits)
    clock: Callable[[], float] = time.monotonic
    _start: float = field(default=-1.0, init=False)
    _written: dict[Kind, int] = field(default_factory=dict, init=False)
    _bytes: int = field(default=0, init=False)
    _suppressed: dict[Kind, _Suppressed] = field(default_factory=dict, init=False)
    _lock: threading.RLock = field(default_factory=threading.RLock, init=False)

    @_locked
    def record(self, fields: dict[str, Any], secret: dict[str, Any] | None = None) -> bool:
        """Write the decision in `fields` in full if the window allows, else count it; True if written.

        `secret` (mount data) goes to a debug record beside a written decision, never alone.
        """
        self.tick()
        kind: Kind = (str(fields.get("syscall")), str(fields.get("result")), str(fields.get("action")))
        size = RECORD_OVERHEAD + len(json.dumps(fields, default=str))
        # Part of the window's bytes is kept for grants (a mount made, an unmount done): a flood
        # of cheap failures must not use up the room a granted decision's record needs.
        grant = fields.get("result") == "OK" and fields.get("action") in GRANTS
        room = self.limits.max_bytes - (0 if grant else self.limits.grant_reserve)
        if self._written.get(kind, 0) < self.limits.per_kind and self._bytes + size <= room:
            self._written[kind] = self._written.get(kind, 0) + 1
            self._bytes += size
            self.log.info(AUDIT_EVENT, **fields)
            if secret:
                self.log.debug("mount-decision-data", pid=fields.get("pid"), **secret)
            return True
        if kind not in self._suppressed and len(self._suppressed) >= self.limits.max_kinds - 1:
            kind = OTHER_KIND
        entry = self._suppressed.setdefault(kind, _Suppressed())
        now = time.time()
        entry.first = entry.first or now
        entry.last = now
        entry.count += 1
        pid = fields.get("pid")
        if isinstance(pid, int) and len(entry.pids) < MAX_PIDS:
            entry.pids.add(pid)
        return False

    @_locked
    def tick(self) -> float:
        """End the window if its time is up; the seconds it has left while summaries are pending, else -1."""
        now = self.clock()
        if self._start < 0:
            self._start = now
        elif now - self._start >= self.limits.interval:
            self.flush()
            self._start = now
        if not self._suppressed:
            return -1
        return max(0.0, self._start + self.limits.interval - now)

    @_locked
    def flush(self) -> None:
        """Write one summary per kind counted in this window, and start counting afresh."""
        for (syscall, result, action), entry in self._suppressed.items():
            self.log.warning(
                SUPPRESSED_EVENT,
                syscall=syscall,
                result=result,
                action=action,
                count=entry.count,
                first=_iso(entry.first),
                last=_iso(entry.last),
                pids=sorted(entry.pids),
                window_s=self.limits.interval,
                reason=f"more than {self.limits.per_kind} records of this kind or "
                f"{self.limits.max_bytes} bytes of records in {self.limits.interval:g} s",
            )
        self._suppressed.clear()
        self._written.clear()
        self._bytes = 0


def _iso(when: float) -> str:
    return datetime.fromtimestamp(when, UTC).isoformat().replace("+00:00", "Z")
