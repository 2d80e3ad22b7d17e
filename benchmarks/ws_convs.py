"""Time the forward and backward of the network's weight-standardized convs on tiny maps, where the
filters' standardization and its backward dominate: how much a step spends standardizing filters.

    python benchmarks/ws_convs.py     # 3 rounds of 300 steps, channels_last filters as on a CPU
"""
from __future__ import annotations

import time

import torch

from normlab.config import Config
from normlab.models import Net, WSConv2d


def main() -> None:
    torch.manual_seed(0)
    net = Net.from_config(Config()).to(memory_format=torch.channels_last)  # the default network, as a CPU places it
    convs = [m for m in net.modules() if isinstance(m, WSConv2d)]
    maps = [torch.randn(1, c.in_channels, 4, 4).contiguous(memory_format=torch.channels_last) for c in convs]
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(300):
            sum(conv(x).sum() for conv, x in zip(convs, maps)).backward()
        print(f"{(time.perf_counter() - t0) / 300 * 1000:.2f} ms per step ({len(convs)} weight-standardized convs "
              "of the default network on 1x4x4 maps, forward and backward)", flush=True)


if __name__ == "__main__":
    main()
