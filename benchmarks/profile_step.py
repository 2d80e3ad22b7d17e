"""Count and time one training step of the network on random data and show where the time goes.

Settings are any Config fields as JSON; the step is normlab's (the optimizer make_optimizer builds: Muon,
then Lookahead after each step as train_epoch does; bf16 autocast where the CPU has it, the memory layout
normlab picks per norm), batch 128 by default:

    python benchmarks/profile_step.py '{"norm": "bn"}'                       # counts, step time, profile
    python benchmarks/profile_step.py '{"norm": "bn"}' --precision fp32 --threads 1 --no-profile

First line: ``ops_per_step=N optimizer_ops=K``, the ATen ops of one step (mean of 10 steps after 5 of
warm-up, traced with torch.profiler) and those of its optimizer part (the optimizer's step and Lookahead).
An op is counted where it does work itself (views and allocations left out; an op whose ops below do the
work counts as those), and a foreach or fused op counts once, as on a GPU, where it is one multi-tensor
kernel (on a CPU it runs a loop of per-tensor ops): about one kernel launch each in an eager GPU step.
Deterministic for given settings. Then the median of --repeats timings of --steps steps (warm-up excluded),
then, unless --no-profile, the ops that took the most self CPU time in that trace. Random data: this times
the network and optimizer alone, without the data pipeline (benchmarks/speed.py times whole epochs).
Needs only ``loop.build``, ``loop.placement`` and ``Trainer.step_on``: it measures any version that has them the
same way (PYTHONPATH=its src).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from normlab.config import Config
from normlab.device import PRECISIONS, Runtime
from normlab.loop import build, placement


# ATen ops that only describe or allocate a tensor (no kernel runs); the others are counted as launches.
SHAPE_ONLY = {"aten::" + n for n in ("empty", "empty_strided", "view", "as_strided", "reshape", "_reshape_alias", "t",
                                      "transpose", "expand", "detach", "resize_", "set_", "alias", "unsqueeze", "squeeze",
                                      "permute", "_unsafe_view", "lift_fresh", "result_type", "slice", "select",
                                      "empty_like", "split", "split_with_sizes", "unbind", "narrow", "chunk", "contiguous",
                                      "view_as", "numpy_T", "mT")}
OPTIMIZER = ("Optimizer.step#", "lookahead")  # the record_function ranges of the optimizer part


def does_work(event) -> bool:
    return event.name.startswith("aten::") and event.name not in SHAPE_ONLY


def innermost_work(event) -> bool:
    """An op that does work itself: none of the ops below it does (a convolution that only allocates counts)."""
    def below(e) -> bool:
        return any(does_work(c) or below(c) for c in e.cpu_children)

    return does_work(event) and not below(event)


def multi_tensor(event) -> bool:
    return event.name.startswith(("aten::_foreach_", "aten::_fused_"))


def ancestors(event):
    while event.cpu_parent is not None:
        event = event.cpu_parent
        yield event


def launches(events) -> tuple[int, int]:
    """(ops, of which in the optimizer part) among profiler ``events``, counted as the module docstring says."""
    ops = optimizer = 0
    for e in events:
        up = list(ancestors(e))
        if any(multi_tensor(a) for a in up) or not (multi_tensor(e) or innermost_work(e)):
            continue
        ops += 1
        optimizer += any(a.name.startswith(OPTIMIZER) for a in up)
    return ops, optimizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("settings", nargs="?", default="{}", help="Config fields as JSON (default: {})")
    p.add_argument("--steps", type=int, default=15, help="timed steps per repeat (default: 15)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats; the median is printed (default: 3)")
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
    place = placement(cfg, Runtime(args.device, precision=args.precision, compile="off"))  # eager unless asked below
    place = place[0] if isinstance(place, tuple) else place  # versions whose placement also returned a note
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
        place = dataclasses.replace(place, capture=dev.type == "cuda")
    # The product's trainer (network, optimizer, Lookahead, moving average, step); its own batches are never used.
    blank = torch.zeros(cfg.batch_size, 3, 32, 32, dtype=torch.uint8), torch.zeros(cfg.batch_size, dtype=torch.long)
    trainer = build(cfg, place, *blank, progress=False)
    if compile_other is not None:
        trainer.net = compile_other(trainer.model)
    x = torch.randn(cfg.batch_size, 3, 32, 32, device=dev)
    x = x.contiguous(memory_format=torch.channels_last) if cl else x
    y = torch.randint(0, 10, (cfg.batch_size,), device=dev)

    done = [0]

    def step() -> None:
        trainer.step_on(x, y, cfg.lr)  # the product's own step: captured, compiled or eager
        done[0] += 1
        if trainer.lookahead is not None:  # as train_epoch: after each step, a pull every 5th (2 of the 10 traced steps)
            with record_function("lookahead"):
                trainer.lookahead.step(done[0], 10**6)

    place.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        step()
    place.synchronize()
    warmup = time.perf_counter() - t0  # compilation (and CUDA graph recording) included
    traced = 10
    cuda = dev.type == "cuda"  # on a GPU: the kernels' own time too, and how many launches a step makes
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(traced):
            step()
        place.synchronize()
    ops, optimizer = launches(prof.events())
    print(f"ops_per_step={ops / traced:.0f} optimizer_ops={optimizer / traced:.0f}", flush=True)
    times = []
    for _ in range(args.repeats):
        place.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        place.synchronize()
        times.append((time.perf_counter() - t0) / args.steps)
    mid = statistics.median(times)
    ips = cfg.batch_size / mid
    how = f" compiled {args.backend or args.mode or 'default'}" if args.compile else " captured" if trainer.graphed is not None else ""
    print(f"{args.settings}{how} {place.precision} {place.layout} {torch.get_num_threads()} threads: "
          f"{mid * 1000:.1f} ms/step (median of {args.repeats} x {args.steps} steps; best {min(times) * 1000:.1f}), {ips:.0f} img/s, "
          f"{50_000 / ips:.1f} s per 50,000 images; first 5 steps {warmup:.1f} s", flush=True)
    if not args.no_profile:
        show_profile(prof, args.rows, traced, mid, cuda)


def show_profile(prof, rows: int, traced: int, mid: float, cuda: bool) -> None:
    """The ops that took the most self CPU time in the trace of ``traced`` steps (and on a GPU, kernel time and launches)."""
    table = prof.key_averages()
    print(table.table(sort_by="self_cpu_time_total", row_limit=rows))
    print(f"{sum(map(innermost_work, prof.events())) / traced:.0f} ATen ops per step that do work, a foreach op's "
          "per-tensor ops counted one by one (innermost: none of the ops they call does work)", flush=True)
    if cuda:
        print(table.table(sort_by="self_device_time_total", row_limit=rows))
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        busy = sum(e.device_time for e in kernels) / traced / 1000
        print(f"GPU: {len(kernels) / traced:.0f} kernels per step, {busy:.2f} ms of kernel time per step "
              f"against {mid * 1000:.2f} ms per step of wall time", flush=True)


if __name__ == "__main__":
    main()
