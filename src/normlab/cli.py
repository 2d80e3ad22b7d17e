"""Command line: ``normlab train | run | evaluate | summary | report``.

Every flag of a training run comes from ``Config``; expected failures (bad data, bad settings,
unwritable folders) print one line on stderr and exit with status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import statistics
import sys
from pathlib import Path

import torch

from normlab.config import MAX_EPOCHS, Config, ConfigError
from normlab.data import DataError, resolve_data_dir
from normlab.models import NORMS

DEFAULTS = Config()
EXIT_ERROR, EXIT_INTERRUPTED = 2, 130


class UsageError(RuntimeError):
    """A command was given something it cannot use; the message says what to do."""


def _widths(text: str) -> tuple[int, int, int]:
    try:
        parts = tuple(int(p) for p in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"widths must look like 16,24,32 (got {text!r})") from None
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"widths must be three numbers like 16,24,32 (got {text!r})")
    return parts  # type: ignore[return-value]


def add_config_flags(p: argparse.ArgumentParser, with_norm: bool) -> None:
    d = DEFAULTS
    p.add_argument("--data-dir", default=None, help="folder holding cifar-10-batches-py/ (default: $NORMLAB_DATA, else ./data; downloaded if absent)")
    if with_norm:
        p.add_argument("--norm", default=d.norm, help=f"normalization layer: {' | '.join(NORMS)} (default: {d.norm})")
    p.add_argument("--widths", type=_widths, default=d.widths, help=f"channels of C1-C2, C3-C5, C7-C9 (default: {','.join(map(str, d.widths))})")
    p.add_argument("--no-weight-std", dest="weight_std", action="store_false", help="plain convs instead of weight-standardized ones")
    p.add_argument("--act", default=d.act, help=f"activation after every norm: relu | gelu (default: {d.act})")
    p.add_argument("--no-pool-first", dest="pool_first", action="store_false",
                   help="c3 and c6 as conv -> norm -> activation -> pool (default: conv -> pool -> norm -> activation)")
    p.add_argument("--zero-init-res", action="store_true",
                   help="start the last norm of each residual branch (C2, C5, C9) with scale 0, so each branch starts as the identity")
    p.add_argument("--groups", type=int, default=d.groups, help=f"group count of group norm (default: {d.groups})")
    p.add_argument("--epochs", type=int, default=d.epochs, help=f"epochs; more than {MAX_EPOCHS} is flagged as outside the assignment (default: {d.epochs})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"images per step (default: {d.batch_size})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default: {d.lr})")
    p.add_argument("--warmup", type=float, default=d.warmup, help=f"fraction of steps rising to the peak lr (default: {d.warmup})")
    p.add_argument("--momentum", type=float, default=d.momentum, help=f"Nesterov momentum (default: {d.momentum})")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help=f"weight decay on conv weights (default: {d.weight_decay})")
    p.add_argument("--ema", type=float, default=d.ema,
                   help=f"per-step decay of an exponential moving average of the weights, used as the final model; 0 = off (default: {d.ema})")
    p.add_argument("--label-smoothing", type=float, default=d.label_smoothing, help=f"label smoothing (default: {d.label_smoothing})")
    p.add_argument("--crop-pad", type=int, default=d.crop_pad, help=f"random-crop padding in pixels, 0 = off (default: {d.crop_pad})")
    p.add_argument("--no-flip", dest="flip", action="store_false", help="turn off random horizontal flips")
    p.add_argument("--no-alt-flip", dest="alt_flip", action="store_false",
                   help="flip each image at random in every epoch (default: alternating flips, each image flipped in every other epoch)")
    p.add_argument("--val-size", type=int, default=d.val_size, help=f"training images held out for validation; use 5000 to tune (default: {d.val_size})")
    p.add_argument("--no-test", dest="eval_test", action="store_false", help="do not read the test set (tuning runs)")
    p.add_argument("--device", default=d.device, choices=["auto", "cpu", "cuda"], help=f"(default: {d.device})")
    p.add_argument("--threads", type=int, default=d.threads, help="CPU threads, 0 = all cores (default: 0)")


def config_from(args: argparse.Namespace, **override) -> Config:
    names = {f.name for f in dataclasses.fields(Config)}
    values = {k: v for k, v in vars(args).items() if k in names}
    values.update(override)
    return Config(**values).validate()


def set_threads(n: int) -> None:
    # Before any work: the thread pool is fixed at the first parallel op.
    torch.set_num_threads(n or os.cpu_count() or 1)


def resume_command(args: argparse.Namespace) -> str:
    """The command line that was run, with ``--resume`` added: same data, threads and settings."""
    argv = list(args._argv)
    if args.resume in (None, False):  # train: None or a folder ("" = --out); run: a flag
        argv.append("--resume")
    return "normlab " + shlex.join(argv)


def cmd_train(args: argparse.Namespace) -> int:
    from normlab.train import fit

    cfg = config_from(args, seed=args.seed)
    set_threads(cfg.threads)
    out = Path(args.resume or args.out or f"runs/{cfg.norm}")
    if args.resume is not None and (out / "results.json").is_file():
        print(f"{out}: finished earlier, nothing to resume")  # and nothing is rewritten
        return 0
    args._resume_hint = resume_command(args)
    fit(cfg, resolve_data_dir(args.data_dir), out, resume=args.resume is not None)
    return 0


def check_same_settings(out: Path, cfg: Config) -> None:
    """A finished model that ``run --resume`` skips must have been trained with the settings asked for now."""
    try:
        saved = Config.load(out / "config.json")
    except (OSError, ValueError, TypeError) as e:
        raise UsageError(f"{out / 'config.json'} cannot be read ({type(e).__name__}); move {out} away or choose another --out") from None
    ignore = {"threads", "device"}  # how it ran, not what it learned
    diff = [f"{k} {v!r} (asked: {getattr(cfg, k)!r})" for k, v in saved.to_dict().items() if k not in ignore and v != getattr(cfg, k)]
    if diff:
        raise UsageError(f"{out} was trained with other settings: {'; '.join(diff)}; choose another --out, or give the same settings")


def cmd_run(args: argparse.Namespace) -> int:
    from normlab.train import fit

    parent = Path(args.out)
    norms = args.norms.split(",")
    for n in norms:
        if n not in NORMS:
            raise ConfigError(f"unknown norm {n!r} in --norms; choose from: {', '.join(NORMS)}")
    if args.seeds < 1:
        raise ConfigError(f"--seeds must be at least 1 (got {args.seeds})")
    if args.jobs < 1:
        raise ConfigError(f"--jobs must be at least 1 (got {args.jobs})")
    base = config_from(args, norm=norms[0])
    set_threads(base.threads)
    args._resume_hint = resume_command(args)
    plan = []  # (config, run folder, resume?) of every model; all are checked before any trains
    # Seed by seed, all norms each time: a run cut short still holds whole seeds to compare.
    for s in range(args.seeds):
        seed = args.seed + s
        for norm in norms:
            cfg = dataclasses.replace(base, norm=norm, seed=seed).validate()
            out = parent / norm if args.seeds == 1 else parent / norm / f"seed{seed}"
            if (out / "results.json").is_file():
                if args.resume:
                    check_same_settings(out, cfg)
                    plan.append((cfg, out, None))
                    continue
                raise UsageError(f"{out} already holds a finished run; use --resume to skip finished models, or choose another --out")
            resume = args.resume and (out / "checkpoint.pt").is_file()
            if not resume and (out / "checkpoint.pt").is_file():
                raise UsageError(f"{out} holds an unfinished run; continue it with: {resume_command(args)}")
            plan.append((cfg, out, resume))
    todo = []
    for cfg, out, resume in plan:
        if resume is None:
            print(f"{out}: finished earlier, skipped")
        else:
            todo.append((cfg, out, resume))
    data_dir = resolve_data_dir(args.data_dir) if todo else None
    if args.jobs == 1 or len(todo) <= 1:  # one model left: it gets all the cores
        for cfg, out, resume in todo:
            fit(cfg, data_dir, out, resume=resume)
    else:
        run_parallel(todo, data_dir, args.jobs, base.threads)
    from normlab.report import summary_table, write_report

    print(summary_table(parent))
    if not args.no_report:
        path = write_report(parent)
        print(f"report: {path}")
    return 0


def _fit_job(cfg: Config, data_dir: Path, out: Path, resume: bool, threads: int) -> str:
    """One model of ``run --jobs N``, in its own process: its log lines carry its folder's name."""
    from normlab import train

    set_threads(threads)
    train.PROGRESS = False  # several progress bars on one terminal would garble each other
    train.fit(cfg, data_dir, out, resume=resume, log=lambda m: print(f"[{out}] {m}", flush=True))
    return str(out)


def run_parallel(todo: list, data_dir: Path, jobs: int, threads: int) -> None:
    """Train the models of ``todo`` ``jobs`` at a time, each process on its share of the cores.

    On a first failure the models not yet started are cancelled and those training finish;
    then the failure is raised. Every finished model keeps its folder either way.
    """
    import multiprocessing
    from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait

    per_job = threads or max(1, (os.cpu_count() or 1) // jobs)
    print(f"training {len(todo)} models, {jobs} at a time, {per_job} thread(s) each", flush=True)
    # A fresh process per model (spawned: no forked thread pools): clean threads and its own peak-memory figure.
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), max_tasks_per_child=1) as pool:
        futures = [pool.submit(_fit_job, cfg, data_dir, out, resume, per_job) for cfg, out, resume in todo]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        failed = next((f.exception() for f in done if f.exception()), None)
        if failed:
            pool.shutdown(cancel_futures=True)  # drops the models not yet started, waits for the running ones
            raise failed


def cmd_evaluate(args: argparse.Namespace) -> int:
    from normlab.evaluate import evaluate_checkpoint

    set_threads(args.threads)
    result = evaluate_checkpoint(Path(args.checkpoint), args.data_dir, args.device)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    from normlab.report import model_summary

    print(model_summary(Config(norm=args.norm, widths=args.widths, groups=args.groups).validate()))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from normlab.report import write_report

    path = write_report(Path(args.run_dir), args.data_dir)
    print(f"report: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="normlab", description="Batch vs group vs layer norm on one small CNN for CIFAR-10.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train one model into one run folder")
    add_config_flags(t, with_norm=True)
    t.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    t.add_argument("--out", default=None, help="run folder (default: runs/NORM)")
    t.add_argument("--resume", nargs="?", const="", default=None, metavar="RUN_DIR",
                   help="continue the run in RUN_DIR (default: --out) from its last complete epoch, with its saved settings")
    t.set_defaults(func=cmd_train)

    r = sub.add_parser("run", help="train bn, gn and ln (the main job), then write the report")
    add_config_flags(r, with_norm=False)
    r.add_argument("--norms", default="bn,gn,ln", help="comma-separated norms to train (default: bn,gn,ln)")
    r.add_argument("--seeds", type=int, default=1, help="seeds per model; results give mean and std (default: 1)")
    r.add_argument("--seed", type=int, default=0, help="first seed (default: 0)")
    r.add_argument("--out", default="runs/latest", help="parent folder, one subfolder per model (default: runs/latest)")
    r.add_argument("--resume", action="store_true", help="skip finished models and continue an interrupted one")
    r.add_argument("--jobs", type=int, default=1,
                   help="models trained at once, each on its share of the cores (default: 1; 2 trains faster in total on a 2-core CPU)")
    r.add_argument("--no-report", action="store_true", help="print the table but do not write report.md")
    r.set_defaults(func=cmd_run)

    e = sub.add_parser("evaluate", help="test accuracy of a saved model.pt on a CIFAR-10 folder")
    e.add_argument("checkpoint", help="a model.pt written by normlab train")
    e.add_argument("--data-dir", default=None, help="folder holding cifar-10-batches-py/ (default: $NORMLAB_DATA, else ./data)")
    e.add_argument("--json", default=None, help="also write the result to this JSON file (default: none)")
    e.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="(default: auto)")
    e.add_argument("--threads", type=int, default=0, help="CPU threads, 0 = all cores (default: 0)")
    e.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("summary", help="layers, output shapes and parameter counts of one model")
    s.add_argument("--norm", default=DEFAULTS.norm, help=f"{' | '.join(NORMS)} (default: {DEFAULTS.norm})")
    s.add_argument("--widths", type=_widths, default=DEFAULTS.widths, help=f"(default: {','.join(map(str, DEFAULTS.widths))})")
    s.add_argument("--groups", type=int, default=DEFAULTS.groups, help=f"(default: {DEFAULTS.groups})")
    s.set_defaults(func=cmd_summary)

    rp = sub.add_parser("report", help="write report.md and figures from a run folder")
    rp.add_argument("run_dir", help="a folder written by normlab run or normlab train")
    rp.add_argument("--data-dir", default=None, help="folder holding cifar-10-batches-py/ for the image figures (default: the one the run recorded, else $NORMLAB_DATA, else ./data)")
    rp.set_defaults(func=cmd_report)
    return p


def main(argv: list[str] | None = None) -> int:
    from normlab.train import TrainingError

    args = build_parser().parse_args(argv)
    args._argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        hint = getattr(args, "_resume_hint", None)
        msg = "normlab: interrupted; the last complete epoch is kept" + (f". Resume with: {hint}" if hint else "")
        print(msg, file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:
        report = sys.modules.get("normlab.report")  # imported only by the commands that need it
        expected = (ConfigError, DataError, TrainingError, UsageError, ValueError, OSError) + ((report.ReportError,) if report else ())
        if not isinstance(e, expected):
            raise
        print("normlab: error: " + " ".join(str(e).split()), file=sys.stderr)  # one line, always
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
