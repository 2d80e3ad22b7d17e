"""The CPU's practical matrix-multiply peak, fp32 and bf16, with 1 and all threads.

A yardstick for the convolutions of a training step (benchmarks/profile_step.py): oneDNN's
convolutions cannot beat a large square matmul of the same precision.

    python benchmarks/matmul_peak.py
"""
from __future__ import annotations

import os
import time

import torch

N = 1024  # square matrices, large enough to run at the kernel's peak


def gflops(dtype: torch.dtype, repeats: int = 20) -> float:
    a, b = torch.randn(N, N, dtype=dtype), torch.randn(N, N, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = min(best, (time.perf_counter() - t0) / repeats)
    return 2 * N**3 / best / 1e9


def main() -> None:
    for threads in sorted({1, os.cpu_count() or 1}):
        torch.set_num_threads(threads)
        for dtype in (torch.float32, torch.bfloat16):
            print(f"{threads} threads {str(dtype).removeprefix('torch.'):>8} {N}x{N} matmul: {gflops(dtype):6.0f} GFLOP/s", flush=True)


if __name__ == "__main__":
    main()
