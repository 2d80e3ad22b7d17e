"""Time one training step of the network on random data and show where the time goes.

Settings are any Config fields as JSON; the step is normlab's (bf16 autocast where the CPU
has it, the memory layout normlab picks per norm, SGD Nesterov), batch 128 by default:

    python benchmarks/profile_step.py '{"norm": "bn"}'                       # step time + profile
    python benchmarks/profile_step.py '{"norm": "bn", "pool_first": false}' --no-profile

Prints the best of three timings of --steps steps (warm-up excluded), then the ops that took
the most self CPU time in a torch.profiler trace of 10 steps. Random data: this times the
network alone, without the data pipeline (benchmarks/speed.py times whole epochs).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch
from torch.profiler import ProfilerActivity, profile

from normlab.capture import settle
from normlab.config import Config
from normlab.device import PRECISIONS, Runtime
from normlab.loop import build, placement


# ATen ops that only describe or allocate a tensor (no kernel runs); the others are counted as launches.
SHAPE_ONLY = {"aten::" + n for n in ("empty", "empty_strided", "view", "as_strided", "reshape", "_reshape_alias", "t",
                                      "transpose", "expand", "detach", "resize_", "set_", "alias", "unsqueeze", "squeeze",
                                      "permute", "_unsafe_view", "lift_fresh", "result_type", "slice", "select")}


def does_work(event) -> bool:
    return event.name.startswith("aten::") and event.name not in SHAPE_ONLY


def innermost_work(event) -> bool:
    """An op that does work itself: none of the ops below it does (a convolution that only allocates counts)."""
    def below(e) -> bool:
        return any(does_work(c) or below(c) for c in e.cpu_children)

    return does_work(event) and not below(event)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("settings", nargs="?", default="{}", help="Config fields as JSON (default: {})")
    p.add_argument("--steps", type=int, default=15, help="timed steps per repeat (default: 15)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads, 0 = all cores (default: 0)")
    p.add_argument("--layout", default="auto", choices=["auto", "cl", "nchw"], help="force a memory layout (default: normlab's choice)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS, help="(default: auto, normlab's choice)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="(default: auto)")
    p.add_argument("--no-profile", action="store_true", help="print the step time only")
    p.add_argument("--compile", action="store_true", help="torch.compile the network (inductor) before timing")
    p.add_argument("--mode", default=None, help="with --compile: a torch.compile mode other than the default; "
                   "reduce-overhead is normlab's --compile graphs (CUDA graphs of the compiled forward and backward)")
    p.add_argument("--backend", default=None, help="with --compile: a torch.compile backend other than inductor, e.g. cudagraphs "
                   "(AOT autograd's graphs replayed as CUDA graphs, eager kernels, no code generation)")
    p.add_argument("--capture", action="store_true", help="the whole step captured as one CUDA graph and replayed "
                   "(normlab's --compile capture, capture.GraphedStep; the plain step on a CPU)")
    p.add_argument("--batch-size", type=int, default=0, help="images per step (default: the Config's)")
    p.add_argument("--rows", type=int, default=15, help="profile rows (default: 15)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = dataclasses.replace(Config(), **json.loads(args.settings))
    cfg = dataclasses.replace(cfg, batch_size=args.batch_size or cfg.batch_size).validate()
    place, _ = placement(cfg, Runtime(args.device, precision=args.precision, compile="off"))  # eager unless asked below
    if args.layout != "auto":
        place = dataclasses.replace(place, channels_last=args.layout == "cl")
    dev, cl = place.device, place.channels_last
    compile_other = None  # a torch.compile other than the product's, to compare
    if args.compile:  # as the product compiles (device.Placement.compiled), or in another mode to compare
        if args.backend:  # graphs: each step marked as a new iteration, as the product's CUDA graphs are
            place = dataclasses.replace(place, graphs=args.backend == "cudagraphs" and dev.type == "cuda")
            compile_other = lambda m: torch.compile(m, dynamic=False, backend=args.backend)
        elif args.mode in (None, "reduce-overhead"):  # the product's own paths: --compile on, --compile graphs
            place = dataclasses.replace(place, compile=True, graphs=args.mode == "reduce-overhead" and dev.type == "cuda")
        else:
            compile_other = lambda m: torch.compile(m, dynamic=False, mode=args.mode)
    if args.capture:  # the product's --compile capture: its placement and its GraphedStep
        place, note = settle(dataclasses.replace(place, capture=dev.type == "cuda"))
        if note:
            print(note)
    # The product's trainer (network, optimizer, Lookahead, moving average, step); its own batches are never used.
    blank = torch.zeros(cfg.batch_size, 3, 32, 32, dtype=torch.uint8), torch.zeros(cfg.batch_size, dtype=torch.long)
    trainer = build(cfg, place, *blank, progress=False)
    if compile_other is not None:
        trainer.net = compile_other(trainer.model)
    x = torch.randn(cfg.batch_size, 3, 32, 32, device=dev)
    x = x.contiguous(memory_format=torch.channels_last) if cl else x
    y = torch.randint(0, 10, (cfg.batch_size,), device=dev)

    def step() -> None:
        trainer.step_on(x, y, cfg.lr)  # the product's own step: captured, compiled or eager

    place.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        step()
    place.synchronize()
    warmup = time.perf_counter() - t0  # compilation (and CUDA graph recording) included
    best = float("inf")
    for _ in range(3):
        place.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        place.synchronize()
        best = min(best, (time.perf_counter() - t0) / args.steps)
    ips = cfg.batch_size / best
    how = f" compiled {args.backend or args.mode or 'default'}" if args.compile else " captured" if trainer.graphed is not None else ""
    print(f"{args.settings}{how} {place.precision} {place.layout} {torch.get_num_threads()} threads: "
          f"{best * 1000:.1f} ms/step, {ips:.0f} img/s, {50_000 / ips:.1f} s per 50,000 images; first 5 steps {warmup:.1f} s", flush=True)
    if not args.no_profile:
        cuda = dev.type == "cuda"  # on a GPU: the kernels' own time too, and how many launches a step makes
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            for _ in range(10):
                step()
            place.synchronize()
        table = prof.key_averages()
        print(table.table(sort_by="self_cpu_time_total", row_limit=args.rows))
        print(f"{sum(map(innermost_work, prof.events())) / 10:.0f} ATen ops per step that do work (innermost: none of "
              "the ops they call does work; views and allocations left out): about one kernel launch each in an eager "
              "step on a GPU", flush=True)
        if cuda:
            print(table.table(sort_by="self_device_time_total", row_limit=args.rows))
            kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            busy = sum(e.device_time for e in kernels) / 10 / 1000
            print(f"GPU: {len(kernels) / 10:.0f} kernels per step, {busy:.2f} ms of kernel time per step "
                  f"against {best * 1000:.2f} ms per step of wall time", flush=True)


if __name__ == "__main__":
    main()
