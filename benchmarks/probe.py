"""A quick tuning probe: train a few hundred steps on the training split (5,000 images held out)
and print the validation accuracy and the training loss every 50 steps.

Settings are any Config fields as JSON, plus "steps" (default 400), for example:

    python benchmarks/probe.py --data-dir ../shared/cifar10 '{"norm": "ln", "weight_std": false}'

The schedule is the full one-cycle squeezed into the given steps, so a probe ranks settings in
about a minute on one core; full 20-epoch runs with --val-size 5000 decide.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

from normlab import data as D
from normlab.config import Config
from normlab.models import Net
from normlab.device import Runtime, setup
from normlab.loop import evaluate, lr_at, make_optimizer, train_step


def main() -> None:
    p = argparse.ArgumentParser(description="quick tuning probe on the validation split")
    p.add_argument("settings", nargs="?", default="{}", help='Config fields as JSON, plus "steps" (default: {})')
    p.add_argument("--data-dir", default="./data", help="folder with cifar-10-batches-py/ (default: ./data)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default: 1)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    kw = json.loads(args.settings)
    steps = kw.pop("steps", 400)
    cfg = dataclasses.replace(Config(), **kw).validate()
    place = setup(Runtime(), cfg.norm)
    dev, cl = place.device, place.channels_last
    scaler = place.grad_scaler()
    images, labels = D.load_split(args.data_dir, train=True)
    tr, va = D.stratified_split(labels, 5000, cfg.seed)
    torch.manual_seed(cfg.seed)
    model = place.place(Net.from_config(cfg))
    opt = make_optimizer(model, cfg, place.precision)
    gen = torch.Generator().manual_seed(cfg.seed)
    batches = D.Batches(images[tr].to(dev), labels[tr].to(dev), cfg.batch_size, True, cfg.crop_pad, cfg.flip, cl, gen, cfg.alt_flip, fill=cfg.crop_fill)
    losses, step, t0 = [], 0, time.perf_counter()
    model.train()
    while step < steps:
        for x, y in batches:
            loss, _ = train_step(model, opt, x, y, lr_at(step, steps, cfg.lr, cfg.warmup), cfg.label_smoothing, place, scaler)
            losses.append(loss.item())
            step += 1
            if step >= steps:
                break
    acc, _ = evaluate(model, images[va].to(dev), labels[va].to(dev), place)
    curve = " ".join(f"{sum(losses[i:i + 50]) / len(losses[i:i + 50]):.3f}" for i in range(0, len(losses), 50))
    print(f"{args.settings} val {acc:.4f} loss {curve} {time.perf_counter() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
