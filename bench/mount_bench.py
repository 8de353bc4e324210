#!/usr/bin/env python3
"""Supervised mount + umount of a small ext4 image vs the same done natively by root, in one run.

Run by hand as root from the repository (after contrib/setup.sh):
    .venv/bin/python bench/mount_bench.py [--iterations N]
Native: root attaches a loop device (LOOP_CTL_GET_FREE + LOOP_CONFIGURE with autoclear),
mount(2)s it read-only and umount2(2)s it, all in-process. Supervised: an unprivileged
container started by `mountwarden run` calls mount(2) on the image file and umount2(2), and
the supervisor does the rest. Both loops time each iteration with the same clock in Python.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from supervisor.loop import attach, wait_detached  # noqa: E402

MS_RDONLY = 1
# Runs inside the container: time each mount+umount pair and print the list as JSON.
CONTAINER_LOOP = r"""
import ctypes, json, sys, time
libc = ctypes.CDLL(None, use_errno=True)
image, target, n = sys.argv[1].encode(), sys.argv[2].encode(), int(sys.argv[3])
times = []
for _ in range(n):
    t0 = time.perf_counter_ns()
    if libc.mount(image, target, b"ext4", 1, None) != 0 or libc.umount2(target, 0) != 0:
        sys.exit("mount failed: errno %d" % ctypes.get_errno())
    times.append(time.perf_counter_ns() - t0)
print(json.dumps(times))
"""


def native(image: Path, target: Path, n: int) -> list[int]:
    libc = ctypes.CDLL(None, use_errno=True)
    times, loops = [], []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
        dev = attach(fd, read_only=True)
        os.close(fd)
        if libc.mount(dev.path.encode(), str(target).encode(), b"ext4", MS_RDONLY, None) != 0:
            sys.exit(f"native mount failed: {os.strerror(ctypes.get_errno())}")
        dev.close()
        if libc.umount2(str(target).encode(), 0) != 0:
            sys.exit(f"native umount failed: {os.strerror(ctypes.get_errno())}")
        times.append(time.perf_counter_ns() - t0)
        loops.append(dev.number)
    wait_detached(loops)
    return times


def supervised(image: Path, target: Path, n: int, policy: Path) -> list[int]:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mountwarden",
            "run",
            "--policy",
            str(policy),
            "--audit-log",
            os.devnull,
            "--",
            "/usr/bin/python3",
            "-c",
            CONTAINER_LOOP,
            str(image),
            str(target),
            str(n),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    return list(json.loads(out.stdout))


def summary(label: str, ns: list[int]) -> float:
    ms = [t / 1e6 for t in ns]
    med = statistics.median(ms)
    print(f"{label:<34} min {min(ms):7.3f}  median {med:7.3f}  max {max(ms):7.3f}  ms")
    return med


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mountwarden-bench.") as tmp:
        work = Path(tmp)
        work.chmod(0o755)
        (work / "src").mkdir()
        (work / "src" / "file").write_text("bench\n")
        image, target = work / "bench.ext4", work / "mnt"
        subprocess.run(
            ["mkfs.ext4", "-q", "-F", "-d", str(work / "src"), str(image), "8M"], check=True, stdout=subprocess.DEVNULL
        )
        image.chmod(0o644)
        target.mkdir()
        policy = work / "policy.yaml"
        policy.write_text(
            "version: 1\nrules:\n  - name: bench\n"
            f"    match: {{source: '{image}', target: '{target}'}}\n    action: kernel\n    options: [ro]\n"
        )
        native(image, target, 10)  # warm caches on both paths before measuring
        nat = native(image, target, args.iterations)
        sup = supervised(image, target, args.iterations, policy)
    print(f"ext4 mount+umount, {args.iterations} iterations each")
    base = summary("native (root, in-process)", nat)
    med = summary("supervised (container, mount(2))", sup)
    print(f"ratio supervised/native (median): {med / base:.2f}x  (+{med - base:.3f} ms per mount+umount)")


if __name__ == "__main__":
    main()
