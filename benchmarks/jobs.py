"""Whole `normlab run` wall time, one model at a time (--jobs 1) against two at once (--jobs 2).

Each variant trains the same models for the same short schedule into a fresh temporary folder,
as a user's command would (process start, data loading, training, final clean-train evaluation);
the variants alternate, `--repeats` times, so that a drift of the machine hits both alike.

    python benchmarks/jobs.py --data-dir ../shared/cifar10                 # bn and ln, 2 epochs each
    python benchmarks/jobs.py --data-dir ../shared/cifar10 --norms bn,gn,ln,bn --epochs 1
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def one_run(args, jobs: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "normlab.cli", "run", "--data-dir", args.data_dir, "--norms", args.norms,
               "--epochs", str(args.epochs), "--no-test", "--no-report", "--out", str(Path(tmp) / "run"), "--jobs", str(jobs)]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--norms", default="bn,ln", help="models of each run (default: bn,ln)")
    p.add_argument("--epochs", type=int, default=2, help="epochs per model (default: 2)")
    p.add_argument("--repeats", type=int, default=1, help="runs of each variant, alternating (default: 1)")
    args = p.parse_args()
    times: dict[int, list[float]] = {1: [], 2: []}
    for r in range(args.repeats):
        for jobs in (1, 2):
            t = one_run(args, jobs)
            times[jobs].append(t)
            print(f"repeat {r + 1}: --jobs {jobs}: {t:.1f} s", flush=True)
    one, two = statistics.median(times[1]), statistics.median(times[2])
    images = 50_000 * args.epochs * len(args.norms.split(","))
    print(f"\n{args.norms}, {args.epochs} epoch(s) each, median of {args.repeats}:")
    print(f"  --jobs 1: {one:.1f} s ({images / one:,.0f} training images/s over the whole command)")
    print(f"  --jobs 2: {two:.1f} s ({images / two:,.0f} training images/s over the whole command)")
    print(f"  --jobs 2 is {one / two:.2f}x faster")


if __name__ == "__main__":
    main()
