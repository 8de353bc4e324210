#!/usr/bin/env python3
"""Kernel path vs FUSE path inside one container: sequential read throughput and a walk over
many small files, side by side in one run, printed as ratios.

Run by hand as root from the repository (after contrib/setup.sh):
    .venv/bin/python bench/fuse_bench.py [--files 5000] [--megabytes 64] [--rounds 5]
Each path mounts the same image (ext4 through fuse2fs, squashfs through squashfuse) in an
unprivileged container started by `mountwarden run`; the page cache is warm for both (the
first round is discarded), so what differs is the file system path itself.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Runs inside the container: mount, time `rounds` full reads of big.bin and walks+reads of the
# small files, unmount; print the timings as JSON.
CONTAINER_SIDE = r"""
import json, os, subprocess, sys, time
image, target, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
subprocess.run(["mount", "-o", "loop,ro", image, target], check=True)
reads, walks = [], []
for _ in range(rounds):
    t0 = time.perf_counter()
    with open(os.path.join(target, "big.bin"), "rb", buffering=0) as f:
        while f.read(1 << 20):
            pass
    reads.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    for root, _dirs, files in os.walk(os.path.join(target, "small")):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                f.read()
    walks.append(time.perf_counter() - t0)
subprocess.run(["umount", target], check=True)
print(json.dumps({"read": reads[1:], "walk": walks[1:]}))
"""


def measure(image: Path, target: Path, action: str, rounds: int, work: Path) -> dict[str, list[float]]:
    policy = work / f"{action}.yaml"
    policy.write_text(f"version: 1\nrules:\n  - name: bench\n    match: {{source: '{image}'}}\n    action: {action}\n")
    out = subprocess.run(
        [sys.executable, "-m", "mountwarden", "run", "--policy", str(policy), "--audit-log", os.devnull, "--",
         "/usr/bin/python3", "-c", CONTAINER_SIDE, str(image), str(target), str(rounds)],
        cwd=REPO, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return dict(json.loads(out.stdout))


def build(work: Path, files: int, megabytes: int) -> dict[str, Path]:
    src = work / "src"
    for i in range(files):
        d = src / "small" / f"d{i % 50}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}").write_bytes(os.urandom(512))
    with open(src / "big.bin", "wb") as f:
        for _ in range(megabytes):
            f.write(os.urandom(1 << 20))
    images = {"ext4": work / "bench.ext4", "squashfs": work / "bench.squashfs"}
    size = f"{megabytes + files // 100 + 64}M"
    quiet = {"check": True, "stdout": subprocess.DEVNULL}
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(src), str(images["ext4"]), size], **quiet)  # type: ignore[call-overload]
    subprocess.run(["mksquashfs", str(src), str(images["squashfs"]), "-quiet", "-noappend"], **quiet)  # type: ignore[call-overload]
    for image in images.values():
        image.chmod(0o644)
    return images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=5000)
    parser.add_argument("--megabytes", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mountwarden-fuse-bench.") as tmp:
        work = Path(tmp)
        work.chmod(0o755)
        target = work / "mnt"
        target.mkdir()
        images = build(work, args.files, args.megabytes)
        what = f"{args.megabytes} MiB sequential read and a walk reading {args.files} files of 512 B"
        print(f"{what}; median of {args.rounds - 1} warm rounds")
        print(f"{'image':<10}{'path':<8}{'read MiB/s':>12}{'walk ms':>10}")
        for fstype, image in images.items():
            results = {action: measure(image, target, action, args.rounds, work) for action in ("kernel", "fuse")}
            med = {a: (statistics.median(r["read"]), statistics.median(r["walk"])) for a, r in results.items()}
            for action, (read, walk) in med.items():
                print(f"{fstype:<10}{action:<8}{args.megabytes / read:>12.0f}{walk * 1000:>10.1f}")
            print(
                f"{fstype:<10}{'ratio':<8}{'fuse ' + format(med['fuse'][0] / med['kernel'][0], '.2f') + 'x slower':>12}"
                f"{format(med['fuse'][1] / med['kernel'][1], '.2f') + 'x':>10}"
            )


if __name__ == "__main__":
    main()
