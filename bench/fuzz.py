"""The long fuzzing run: the targets of tests/test_fuzz.py on a million inputs or more in total.

    .venv/bin/python bench/fuzz.py [--total N] [--chunk N] [--jobs N] [--only NAME]...

Each target gets a share of --total (a smaller one for the slow policy loader), run in chunks
of --chunk inputs with a fresh seed each (hypothesis' memory of what it tried grows with a
run), all targets in parallel.
Prints inputs and failures per target and the time taken; exits 1 if anything failed.
Needs root for the fsconfig target (fsopen); touches no loop device and mounts nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from test_fuzz import fuzz_targets, run_target  # noqa: E402

MAX_FAILURES = 3  # per target: the first few are enough to fix, the rest would repeat them
WEIGHTS = {"load_policy": 0.25}  # share of the total against 1 for the others: it is ten times slower


@dataclass
class Result:
    name: str
    inputs: int = 0
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)


def fuzz(name: str, budget: int, chunk: int, first_seed: int) -> Result:
    """Run one target until `budget` inputs have been tried or it failed MAX_FAILURES times."""
    result = Result(name)
    started = time.monotonic()
    with fuzz_targets() as targets:
        target = next(t for t in targets if t.name == name)
        seed = first_seed
        while result.inputs < budget and len(result.failures) < MAX_FAILURES:
            try:
                ran = run_target(target, min(chunk, budget - result.inputs), seed)
            except Exception as exc:  # a failure found and shrunk: keep it, go on with a new seed
                result.failures.append(f"seed {seed}: {exc!r}"[:4000])
                ran = 1
            result.inputs += max(ran, 1)
            seed += 1
    result.seconds = time.monotonic() - started
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--total", type=int, default=1_000_000, help="inputs over all targets")
    parser.add_argument("--chunk", type=int, default=5000, help="inputs per hypothesis run")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="targets fuzzed at once")
    parser.add_argument("--seed", type=int, default=int(time.time()), help="first seed (printed, to replay)")
    parser.add_argument("--only", action="append", help="fuzz only this target (repeatable)")
    args = parser.parse_args()
    with fuzz_targets() as targets:
        names = [t.name for t in targets if not args.only or t.name in args.only]
    shares = sum(WEIGHTS.get(name, 1) for name in names)
    budgets = {name: int(args.total * WEIGHTS.get(name, 1) / shares) + 1 for name in names}
    print(f"fuzzing {len(names)} targets, {sum(budgets.values())} inputs, first seed {args.seed}", flush=True)
    started = time.monotonic()
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = [
            pool.submit(fuzz, name, budgets[name], args.chunk, args.seed + i * 100_000) for i, name in enumerate(names)
        ]
        results = [f.result() for f in futures]
    elapsed = time.monotonic() - started
    print(f"\n{'target':32} {'inputs':>10} {'seconds':>9} {'inputs/s':>9} failures")
    for r in results:
        print(f"{r.name:32} {r.inputs:>10} {r.seconds:>9.1f} {r.inputs / r.seconds:>9.0f} {len(r.failures)}")
    total = sum(r.inputs for r in results)
    print(f"{'total':32} {total:>10} {elapsed:>9.1f} (wall clock, {args.jobs} jobs)")
    for r in results:
        for failure in r.failures:
            print(f"\nFAILURE in {r.name}:\n{failure}")
    return 1 if any(r.failures for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
