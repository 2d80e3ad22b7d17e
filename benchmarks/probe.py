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
import torch.nn.functional as F

from normlab import data as D
from normlab.config import Config
from normlab.models import Net
from normlab.train import autocast, evaluate, lr_at, make_optimizer, pick_device, place, use_bf16, use_channels_last


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
    dev = pick_device(cfg.device)
    cl, amp = use_channels_last(cfg.norm, dev), autocast(dev, use_bf16(dev))
    images, labels = D.load_split(args.data_dir, train=True)
    tr, va = D.stratified_split(labels, 5000, cfg.seed)
    torch.manual_seed(cfg.seed)
    model = place(Net.from_config(cfg), dev, cl)
    opt = make_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    batches = D.Batches(images[tr].to(dev), labels[tr].to(dev), cfg.batch_size, True, cfg.crop_pad, cfg.flip, cl, gen, cfg.alt_flip)
    losses, step, t0 = [], 0, time.perf_counter()
    model.train()
    while step < steps:
        for x, y in batches:
            for g in opt.param_groups:
                g["lr"] = lr_at(step, steps, cfg.lr, cfg.warmup)
            with amp:
                loss = F.cross_entropy(model(x).float(), y, label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            step += 1
            if step >= steps:
                break
    acc, _ = evaluate(model, images[va].to(dev), labels[va].to(dev), amp, cl)
    curve = " ".join(f"{sum(losses[i:i + 50]) / len(losses[i:i + 50]):.3f}" for i in range(0, len(losses), 50))
    print(f"{args.settings} val {acc:.4f} loss {curve} {time.perf_counter() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
