"""Forward and backward time of normlab's activations (models.ACTS) and batch norm on one large map.

    python benchmarks/activations.py                  # 128 x 48 x 32 x 32, channels_last, fp32, all cores
    python benchmarks/activations.py --shape 128,32,16,16

The elementwise share of an fp32 CPU step (docs/performance.md, sixth session): what a cheaper
activation would buy, against GELU's accuracy gain on validation (docs/experiments.md, section 8).
Also the tanh approximation of GELU, and a plain copy of the map as the memory-bandwidth yardstick.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from normlab.models import ACTS


def ms(f, n: int) -> float:
    for _ in range(3):
        f()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(n):
            f()
        best = min(best, (time.perf_counter() - t0) / n)
    return best * 1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="128,48,32,32", help="N,C,H,W of the map (default: 128,48,32,32)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--repeat", type=int, default=20, help="calls per timing, best of 3 timings (default: 20)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    shape = tuple(int(s) for s in args.shape.split(","))
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    grad = torch.randn_like(x)
    rows = {name: ACTS[name]() for name in ACTS}
    rows["relu"] = torch.nn.ReLU()  # the network's runs in place; out of place here so that every call sees the same input
    rows["gelu (tanh approximation)"] = torch.nn.GELU(approximate="tanh")
    rows["batch norm (training)"] = torch.nn.BatchNorm2d(shape[1]).to(memory_format=torch.channels_last)
    print(f"map {'x'.join(map(str, shape))} fp32 channels_last, {torch.get_num_threads()} threads; "
          f"copy {ms(lambda: x.clone(), args.repeat):.2f} ms")
    for name, module in rows.items():
        xi = x.clone().requires_grad_()
        fwd = ms(lambda: module(xi), args.repeat)
        both = ms(lambda: torch.autograd.grad(module(xi), xi, grad), args.repeat)
        print(f"{name:<28} forward {fwd:6.2f} ms   forward + backward {both:6.2f} ms")


if __name__ == "__main__":
    main()
