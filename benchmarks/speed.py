"""Training and evaluation throughput: normlab's trainer (bn, gn, ln) against the classic recipe.

The classic recipe is what most notebooks do: a torch DataLoader over per-image PIL transforms
(RandomCrop with padding, RandomHorizontalFlip, ToTensor, Normalize), float32, NCHW, batch 512,
on the same network and data. Each measurement runs in its own fresh process, times a number of
training steps after a warm-up, and reports its peak resident memory. Needs torchvision for the
classic recipe (`pip install -e '.[bench]'`).

    python benchmarks/speed.py --data-dir ../shared/cifar10              # brief: ~1-2 minutes
    python benchmarks/speed.py --data-dir ../shared/cifar10 --full       # one whole epoch each
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

EPOCH = 50_000  # images in a training epoch of the final runs


def machine(args) -> dict:
    from normlab.device import Runtime, cpu_has_bf16, device_name, pick_device, setup

    dev = pick_device(args.device)
    return {"device": device_name(dev), "cores": os.cpu_count(), "cpu_bf16": cpu_has_bf16(),
            "precision": setup(Runtime(args.device, precision=args.precision), "bn").precision,
            "torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads()}


def worker_normlab(args) -> dict:
    """normlab's own code path: the trainer ``loop.build`` makes (Batches of uint8 images on the device, per-batch
    augmentation, the product's optimizer, Lookahead, moving average and step), timed on batches of its images."""
    from normlab import data as D
    from normlab.config import Config
    from normlab.device import Runtime
    from normlab.loop import build, infer, placement

    cfg = dataclasses.replace(Config(norm=args.norm, batch_size=args.batch_size), **json.loads(args.config)).validate()
    place = placement(cfg, Runtime(args.device, precision=args.precision, compile=args.compile))  # normlab's own choice
    if args.layout != "auto":
        place = dataclasses.replace(place, channels_last=args.layout == "cl")
    images, labels = D.load_split(args.data_dir, train=True)
    trainer = build(cfg, place, images, labels, progress=False)
    images, labels, cl = trainer.train_x, trainer.train_y, place.channels_last  # on the device
    gen = torch.Generator().manual_seed(0)
    n = len(labels) if args.full else args.batches * args.batch_size
    warm = D.Batches(images[: args.warmup * args.batch_size], labels[: args.warmup * args.batch_size], args.batch_size, True, cfg.crop_pad, cfg.flip, cl, gen, cfg.alt_flip, fill=cfg.crop_fill)
    timed = D.Batches(images[:n], labels[:n], args.batch_size, True, cfg.crop_pad, cfg.flip, cl, gen, cfg.alt_flip, fill=cfg.crop_fill)
    place.reset_peak_memory()
    t0 = time.perf_counter()
    trainer.train_on(warm, 0, 10_000)  # compiles, if compiled; the last, partial batch of a --full epoch runs eager
    place.synchronize()
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    trainer.train_on(timed, 0, 10_000)
    place.synchronize()
    train_s = time.perf_counter() - t0
    profile_text = profile_epoch(trainer, timed) if args.profile else None
    test, _ = D.load_split(args.data_dir, train=False)
    test = test.to(place.device)
    infer(trainer.model, test[:2000], place)
    place.synchronize()
    t0 = time.perf_counter()
    infer(trainer.model, test, place)
    place.synchronize()
    eval_s = time.perf_counter() - t0
    return {"what": f"normlab {args.norm}", "precision": place.precision, "layout": place.layout,
            "images": n, "train_s": train_s, "eval_images_per_s": len(test) / eval_s,
            "compile": place.compile, "warmup_s": warm_s, "gpu_peak_mib": place.record().get("gpu_peak_mib"),
            "profile": profile_text}


class _TimedBatches:
    """``batches`` with each batch's making (crop, flip, normalization: the data pipeline) marked for the profiler."""

    def __init__(self, batches):
        self.batches, self.labels, self.batch_size = batches, batches.labels, batches.batch_size

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        it = iter(self.batches)
        while True:
            with torch.profiler.record_function("data pipeline (one batch)"):
                try:
                    batch = next(it)
                except StopIteration:
                    return
            yield batch


def profile_epoch(trainer, batches) -> str:
    """The timed batches once more under torch.profiler (after the timing, which it would slow): where the
    host's time goes per step, the data pipeline apart, and on a GPU the kernels a step launches and their time."""
    from torch.profiler import ProfilerActivity, profile

    place = trainer.place
    cuda = place.device.type == "cuda"
    steps = len(batches)
    place.synchronize()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        trainer.train_on(_TimedBatches(batches), 0, 10_000)
        place.synchronize()
    wall = (time.perf_counter() - t0) / steps * 1000
    table = prof.key_averages()
    data = next((e for e in table if e.key == "data pipeline (one batch)"), None)
    lines = [table.table(sort_by="self_cpu_time_total", row_limit=12)]
    if cuda:
        lines.append(table.table(sort_by="self_device_time_total", row_limit=12))
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        lines.append(f"GPU: {len(kernels) / steps:.0f} kernels per step, {sum(e.device_time for e in kernels) / steps / 1000:.2f} ms "
                     "of kernel time per step")
    lines.append(f"per step, under the profiler: {wall:.2f} ms of wall time, of which the host made the batch in "
                 f"{data.cpu_time_total / steps / 1000:.2f} ms" if data else f"per step, under the profiler: {wall:.2f} ms")
    return "\n".join(lines)


def worker_classic(args) -> dict:
    """The notebook recipe: Dataset of PIL images, per-image transforms, DataLoader, fp32, NCHW."""
    import numpy as np
    from PIL import Image
    from torchvision import transforms

    from normlab import data as D
    from normlab.config import Config
    from normlab.models import Net

    images, labels = D.load_split(args.data_dir, train=True)
    hwc = images.permute(0, 2, 3, 1).numpy()  # (N, 32, 32, 3) uint8, as torchvision's CIFAR10 holds it
    tf = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                             transforms.Normalize(D.MEAN, D.STD)])

    class Cifar(torch.utils.data.Dataset):
        def __len__(self):
            return len(hwc)

        def __getitem__(self, i):
            return tf(Image.fromarray(np.ascontiguousarray(hwc[i]))), int(labels[i])

    bs = args.batch_size
    loader = torch.utils.data.DataLoader(Cifar(), batch_size=bs, shuffle=True, num_workers=args.classic_workers, drop_last=True)
    torch.manual_seed(0)
    model = Net.from_config(dataclasses.replace(Config(norm="bn"), **json.loads(args.config)))  # the same network as normlab's bn
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps = len(loader) - args.warmup if args.full else args.batches  # full: the rest of one epoch
    it = iter(loader)
    t0 = None
    for i in range(args.warmup + steps):
        if i == args.warmup:
            t0 = time.perf_counter()
        x, y = next(it)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    train_s = time.perf_counter() - t0
    return {"what": "classic bn", "precision": "fp32", "layout": "NCHW", "images": steps * bs, "train_s": train_s, "eval_images_per_s": None, "compile": False, "warmup_s": None, "gpu_peak_mib": None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=os.environ.get("NORMLAB_DATA", "./data"), help="folder with cifar-10-batches-py/ (default: $NORMLAB_DATA or ./data)")
    p.add_argument("--batches", type=int, default=20, help="timed training batches per measurement (default: 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up batches (default: 3)")
    p.add_argument("--full", action="store_true", help="time one whole 50,000-image epoch per measurement")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (default: normlab's for normlab, 512 for classic)")
    p.add_argument("--norms", default="bn,gn,ln", help="normlab variants to time (default: bn,gn,ln)")
    p.add_argument("--no-classic", action="store_true", help="skip the classic recipe")
    p.add_argument("--classic-workers", type=int, default=2, help="DataLoader workers of the classic recipe (default: 2)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="(default: auto)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="normlab's precision; auto = normlab's choice for the device (default: auto)")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off", "graphs", "capture"],
                   help="as normlab's --compile: on, graphs (replayed as CUDA graphs), capture (the whole step as one CUDA graph) "
                        "or off (default: auto = graphs on CUDA, off on a CPU)")
    p.add_argument("--layout", default="auto", choices=["auto", "cl", "nchw"], help="force a memory layout (default: normlab's choice)")
    p.add_argument("--config", default="{}", help='Config fields as JSON for the network and normlab\'s trainer, e.g. \'{"act": "relu"}\' (default: {})')
    p.add_argument("--rounds", type=int, default=1, help="measure every variant this many times, one after another, and report the "
                   "medians and the median of each round's ratio (a shared or noisy machine; default: 1)")
    p.add_argument("--profile", action="store_true", help="after timing, run normlab's timed batches once more under "
                   "torch.profiler: the ops that took the most time, the data pipeline's share of a step, and on a GPU the "
                   "kernels per step")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--norm", default="bn", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    if args.worker:
        if args.batch_size is None:
            from normlab.config import Config

            args.batch_size = Config().batch_size if args.worker == "normlab" else 512
        r = worker_normlab(args) if args.worker == "normlab" else worker_classic(args)
        from normlab.device import peak_rss_mib

        r["peak_rss_mib"] = peak_rss_mib()
        print("RESULT " + json.dumps(r))
        return

    print("machine " + json.dumps(machine(args)), flush=True)
    if args.config != "{}":
        print("config " + args.config, flush=True)
    jobs = [["--worker", "normlab", "--norm", n] for n in args.norms.split(",") if n]
    if not args.no_classic:
        jobs.append(["--worker", "classic"])
    passthrough = sys.argv[1:]
    rounds: list[dict[str, dict]] = []
    for k in range(args.rounds):
        if args.rounds > 1:
            print(f"round {k + 1} of {args.rounds}", flush=True)
        results = {}
        for job in jobs:
            out = subprocess.run([sys.executable, __file__, *passthrough, *job], capture_output=True, text=True)
            line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"benchmark worker {' '.join(job)} failed:\n{out.stderr[-2000:]}")
            r = json.loads(line[7:])
            ips = r["images"] / r["train_s"]
            r["train_images_per_s"], r["epoch_s"] = ips, EPOCH / ips
            results[r["what"]] = r
            ev = f"  eval {r['eval_images_per_s']:8.0f} img/s" if r["eval_images_per_s"] else ""
            extra = f"  warm-up{' + compile' if r['compile'] else ''} {r['warmup_s']:.1f} s" if r["warmup_s"] is not None else ""
            extra += f"  GPU peak {r['gpu_peak_mib']:.0f} MiB" if r["gpu_peak_mib"] is not None else ""
            print(f"{r['what']:<12} {r['precision']} {r['layout']:<13} train {ips:7.0f} img/s  {r['epoch_s']:6.1f} s/epoch{ev}  "
                  f"peak RSS {r['peak_rss_mib']:6.0f} MiB{extra}", flush=True)
            if r.get("profile"):
                print(r["profile"], flush=True)
        rounds.append(results)
    names = list(rounds[0])
    median_ips = {what: statistics.median(r[what]["train_images_per_s"] for r in rounds) for what in names}
    if args.rounds > 1:
        print(f"median of {args.rounds} rounds:")
        for what in names:
            print(f"{what:<12} train {median_ips[what]:7.0f} img/s  {EPOCH / median_ips[what]:6.1f} s/epoch")
    if "classic bn" in median_ips:  # the ratio of each round, from neighbouring measurements, then their median
        for what in names:
            if what != "classic bn":
                per_round = [r[what]["train_images_per_s"] / r["classic bn"]["train_images_per_s"] for r in rounds]
                each = f" (rounds: {', '.join(f'{x:.2f}' for x in per_round)})" if args.rounds > 1 else ""
                print(f"ratio {what} / classic bn: {statistics.median(per_round):.2f}x{each}")
    if "normlab bn" in median_ips:
        for what in ("normlab gn", "normlab ln"):
            if what in median_ips:
                print(f"ratio {what} s/epoch / normlab bn s/epoch: {median_ips['normlab bn'] / median_ips[what]:.2f}")

if __name__ == "__main__":
    main()
