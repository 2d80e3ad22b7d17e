"""Validation (or test) accuracy of the weights in a tuning run's last checkpoint: the raw weights and, for
a run with ``--ema``, their moving average. A run with ``--ema`` trains exactly as one without
(the average only watches), so one run gives both figures (docs/experiments.md §12). With ``--precise-bn N``
also the figure of batch norm's running statistics re-estimated at the final weights from N training images
(``loop.recalibrate_bn``, what ``--precise-bn`` does after the last epoch; it changes no weight, so a run trained
without it gives both figures, docs/experiments.md §29).

    python benchmarks/checkpoint_val.py runs/tune4/bn_alt_ema --data-dir ../shared/cifar10
    python benchmarks/checkpoint_val.py runs/v25/bn_base_s0 --data-dir ../shared/cifar10 --precise-bn 10000

``--split test`` reads the test set instead (of a run trained with ``--val-size 0`` too): only for the test figures
of a setting already chosen on validation, as section 29 reads ``runs/final15``'s bn models with precise BN.
"""
from __future__ import annotations

import argparse
import dataclasses

import torch

from normlab import data as D
from normlab.config import Config
from normlab.models import Net
from normlab.device import Runtime, setup
from normlab.rundir import RunDir
from normlab.loop import evaluate, make_ema, recalibrate_bn


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="a normlab train folder with --val-size > 0")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--split", choices=("val", "test"), default="val",
                   help="val: the run's validation split (default); test: the test set, for a setting already chosen")
    p.add_argument("--precise-bn", type=int, default=0, metavar="N",
                   help="also re-estimate batch norm's statistics from N training images (as --precise-bn N would)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ck = RunDir(args.run).load_checkpoint()
    cfg = Config.from_dict(ck["config"])
    if args.split == "val" and not cfg.val_size:
        raise SystemExit(f"{args.run} holds no validation split (--val-size 0)")
    place = setup(Runtime(device="cpu"), cfg.norm)
    images, labels = D.load_split(args.data_dir, train=True)
    train, val = D.stratified_split(labels, cfg.val_size, cfg.seed)
    x, y = D.load_split(args.data_dir, train=False) if args.split == "test" else (images[val], labels[val])
    split = "validation" if args.split == "val" else "test"
    model = place.place(Net.from_config(cfg))
    model.load_state_dict(ck["model"])
    models = {"raw weights": model}
    if "ema" in ck:  # restored as fit() resumes it
        ema = make_ema(model, cfg.ema)
        ema.load_state_dict(ck["ema"])
        models["moving average"] = ema.module
    for name, m in models.items():
        acc = evaluate(m, x, y, place)[0]
        print(f"{args.run}: {name} after epoch {ck['epoch']}: {split} {acc:.2%}", flush=True)
        if args.precise_bn:
            recalibrate_bn(m, images[train], labels[train], dataclasses.replace(cfg, precise_bn=args.precise_bn), place)
            acc = evaluate(m, x, y, place)[0]
            print(f"{args.run}: {name} after epoch {ck['epoch']}, precise BN from {args.precise_bn:,} images: "
                  f"{split} {acc:.2%}", flush=True)


if __name__ == "__main__":
    main()
