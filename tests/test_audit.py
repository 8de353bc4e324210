"""Audit flood control: a container's flood is summarised with exact counts, the log stays bounded,
and ordinary decisions are still written in full."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from conftest import allow_policy, calls, run_container

from supervisor.audit import AUDIT_EVENT, OTHER_KIND, SUPPRESSED_EVENT, AuditLimiter, Limits

FLOOD = 3000


class FakeLog:
    """Collects what the limiter writes, as (level, event, fields)."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def info(self, event: str, **fields: Any) -> None:
        self.lines.append(("info", event, fields))

    def warning(self, event: str, **fields: Any) -> None:
        self.lines.append(("warning", event, fields))

    def debug(self, event: str, **fields: Any) -> None:
        self.lines.append(("debug", event, fields))

    def events(self, name: str) -> list[dict[str, Any]]:
        return [fields for _, event, fields in self.lines if event == name]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def decision(syscall: str = "umount2", result: str = "CONTINUE", action: str = "kernel-native", **extra: Any) -> dict:
    return {"container": "c", "pid": 7, "syscall": syscall, "result": result, "action": action, **extra}


def limiter(**limits: Any) -> tuple[AuditLimiter, FakeLog, FakeClock]:
    log, clock = FakeLog(), FakeClock()
    return AuditLimiter(log, Limits(**limits), clock), log, clock


def test_first_records_of_a_kind_are_written_then_counted_into_one_summary() -> None:
    audit, log, _ = limiter(per_kind=5)
    written = [audit.record(decision(pid=100 + i % 3)) for i in range(40)]
    assert written == [True] * 5 + [False] * 35
    assert len(log.events(AUDIT_EVENT)) == 5 and not log.events(SUPPRESSED_EVENT)
    audit.flush()
    (summary,) = log.events(SUPPRESSED_EVENT)
    assert summary["count"] == 35 and summary["pids"] == [100, 101, 102]
    assert (summary["syscall"], summary["result"], summary["action"]) == ("umount2", "CONTINUE", "kernel-native")
    assert summary["first"] <= summary["last"] and summary["first"].endswith("Z")


def test_a_flood_of_one_kind_does_not_hide_other_kinds() -> None:
    audit, log, _ = limiter(per_kind=3)
    for _ in range(100):
        audit.record(decision())
    assert audit.record(decision("mount", "OK", "kernel", target="/mnt"))
    assert log.events(AUDIT_EVENT)[-1]["syscall"] == "mount"


def test_each_window_ends_with_its_summary_and_starts_afresh() -> None:
    audit, log, clock = limiter(per_kind=2, interval=10)
    for _ in range(5):
        audit.record(decision())
    assert audit.tick() == 10  # summaries pending: wake up when the window ends
    clock.now += 4
    assert audit.tick() == 6
    clock.now += 6
    assert audit.tick() == -1  # the window ended: its summary is out, nothing pending
    assert [s["count"] for s in log.events(SUPPRESSED_EVENT)] == [3]
    assert audit.record(decision()) and audit.record(decision()) and not audit.record(decision())
    clock.now += 10
    audit.record(decision())  # the first record of a new window ends the old one
    assert [s["count"] for s in log.events(SUPPRESSED_EVENT)] == [3, 1]
    assert len(log.events(AUDIT_EVENT)) == 2 + 2 + 1


def test_bytes_per_window_are_bounded_whatever_the_kinds() -> None:
    audit, log, _ = limiter(per_kind=1000, max_bytes=4096, max_kinds=4)
    big = "x" * 1000
    for i in range(200):
        audit.record(decision(result=f"E{i}", target=big))
    audit.flush()
    written = log.events(AUDIT_EVENT)
    summaries = log.events(SUPPRESSED_EVENT)
    assert sum(len(str(f)) + 160 for f in written) <= 4096
    assert len(summaries) == 4  # at most max_kinds summaries: the rest are counted as "other"
    assert (summaries[-1]["syscall"], summaries[-1]["result"], summaries[-1]["action"]) == OTHER_KIND
    assert len(written) + sum(s["count"] for s in summaries) == 200


def test_mount_data_goes_only_beside_a_written_record() -> None:
    audit, log, _ = limiter(per_kind=1)
    audit.record(decision(), {"data": "password=1"})
    audit.record(decision(), {"data": "password=2"})
    assert [f["data"] for f in log.events("mount-decision-data")] == ["password=1"]


def test_flush_with_nothing_pending_writes_nothing() -> None:
    audit, log, _ = limiter()
    audit.record(decision())
    audit.flush()
    assert audit.tick() == -1
    assert not log.events(SUPPRESSED_EVENT)


def _outcomes(stdout: str) -> dict[str, int]:
    return {name: int(count) for name, count in (line.split() for line in stdout.splitlines())}


def test_container_flood_is_summarised_with_counts_that_add_up(tmp_path: Path, mountcall: Path) -> None:
    started = time.monotonic()
    run = run_container(tmp_path, [str(mountcall), "repeat", str(FLOOD), "umount", "/no/such/dir"], timeout=120)
    elapsed = time.monotonic() - started
    assert _outcomes(run.stdout) == {"ENOENT": FLOOD}, run.stderr
    written = run.decisions("umount2")
    summaries = [a for a in run.audit if a.get("event") == SUPPRESSED_EVENT]
    assert summaries and all(s["syscall"] == "umount2" and s["action"] == "kernel-native" for s in summaries)
    assert len(written) + sum(s["count"] for s in summaries) == FLOOD  # every call accounted for
    limits = Limits()
    windows = math.ceil(elapsed / limits.interval) + 1
    assert len(written) <= limits.per_kind * windows
    log = next(tmp_path.glob("audit-*.log"))
    assert log.stat().st_size <= windows * (limits.max_bytes + 1024)


def test_normal_decisions_after_a_flood_are_written_in_full(
    tmp_path: Path, images: dict[str, Path], mountcall: Path, mnt: Path
) -> None:
    command = calls(
        mountcall, "repeat 500 umount /no/such/dir", f"mount {images['ext4']} {mnt} ext4 ro", f"umount {mnt}"
    )
    run = run_container(tmp_path, command, policy=allow_policy(tmp_path))
    assert run.stdout.split() == ["ENOENT", "500", "OK", "OK"], run.stderr
    (mounted,) = run.decisions("mount")
    assert mounted["result"] == "OK" and mounted["action"] == "kernel" and mounted["target"] == str(mnt)
    unmounts = [a for a in run.decisions("umount2") if a["action"] == "unmount"]
    assert len(unmounts) == 1 and unmounts[0]["result"] == "OK"
    (summary,) = [a for a in run.audit if a.get("event") == SUPPRESSED_EVENT]
    assert summary["count"] == 500 - Limits().per_kind
