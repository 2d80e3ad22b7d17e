"""Command line: ``normlab train | run | sweep | study | merge | evaluate | predict | summary | report``, a thin layer over ``api``.

Every flag of what a model learns comes from ``Config``'s fields (their flags and help live
there), every flag of how it runs from ``device.Runtime``; expected failures (bad data, bad
settings, unwritable folders) print one line on stderr and exit with status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from normlab import api
from normlab.api import COMPILE, DEFAULT_NORMS, NORMS, PRECISIONS, Runtime, set_threads
from normlab.config import Config, flag_of, format_value, parse_widths, setting_fields
from normlab.errors import NormlabError, no_space
from normlab.version import __version__

DEFAULTS = Config()
EXIT_ERROR = 2


def _widths(text: str) -> tuple[int, int, int]:
    try:
        return parse_widths(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_data_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=None, help="folder holding cifar-10-batches-py/ (default: $NORMLAB_DATA, else ./data; downloaded if absent)")


def add_config_flags(p: argparse.ArgumentParser, skip: tuple[str, ...] = ("norm", "seed")) -> None:
    """One flag per ``Config`` setting (those in ``skip`` are the command's own)."""
    for f in setting_fields():
        if f.name in skip:
            continue
        help, default = f.metadata["help"], f.default
        if isinstance(default, bool):
            p.add_argument(flag_of(f), dest=f.name, action="store_false" if default else "store_true", help=help)
        else:
            kind = _widths if isinstance(default, tuple) else type(default)
            p.add_argument(flag_of(f), dest=f.name, type=kind, default=default, help=f"{help} (default: {format_value(default)})")


def add_ray_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ray", default=None, metavar="ADDRESS",
                   help="train each model as a Ray task: auto | HOST:PORT | local; needs normlab[ray] (default: off)")
    p.add_argument("--ray-cpus", type=float, default=1.0, help="CPUs each model asks of a Ray node, also its threads (default: 1)")
    p.add_argument("--ray-gpus", type=float, default=0.0,
                   help="GPUs each model asks of a Ray node; 0.25 lets four models share one GPU (default: 0)")
    p.add_argument("--ray-retries", type=int, default=3,
                   help="times a model whose Ray worker died is run again, from its last epoch (default: 3)")
    p.add_argument("--ray-scratch", default=None, metavar="DIR",
                   help="folder on each Ray node where its models train (default: the node's temporary folder)")


def add_runtime_flags(p: argparse.ArgumentParser) -> None:
    d = Runtime()
    p.add_argument("--device", default=d.device, help=f"auto | cpu | cuda | cuda:N (default: {d.device})")
    p.add_argument("--threads", type=int, default=d.threads, help="CPU threads, 0 = all cores (default: 0)")
    p.add_argument("--precision", default=d.precision, choices=PRECISIONS,
                   help="auto = bf16 where the hardware has it, fp16 on GPUs of capability 7.x, else fp32 (default: auto)")
    p.add_argument("--compile", default=d.compile, choices=COMPILE,
                   help="on = torch.compile, graphs = plus CUDA graphs, capture = the step as one CUDA graph "
                        "(default: auto: graphs on CUDA where torch.compile runs, else off)")
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic kernels on a GPU (slower); CPU runs repeat bit for bit without it")


def config_from(args: argparse.Namespace, **override) -> Config:
    names = {f.name for f in setting_fields()}
    values = {k: v for k, v in vars(args).items() if k in names}
    values.update(override)
    return Config(**values).validate()


def note_replaced_defaults(argv: list[str], args: argparse.Namespace) -> None:
    """Say it where a flag typed at Config's default is replaced by a norm's own default (``--norm none --lr 0.2``
    trains at none's 0.1): a Config cannot tell a typed default from an untouched one, but the command line can.
    The norms are those of ``--norms`` (run, sweep) or ``--norm`` (train)."""
    typed = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    fields = {f.name: f for f in setting_fields()}
    # the norms of --norms (run, sweep), --norm (train), else (study) every norm: the study trains them all
    norms = args.norms.split(",") if hasattr(args, "norms") else [args.norm] if hasattr(args, "norm") else list(NORMS)
    for norm in norms:
        for name, value in (NORMS[norm].defaults.items() if norm in NORMS else ()):
            f = fields[name]
            if flag_of(f) in typed and getattr(args, name, None) == f.default:
                print(f"note: {flag_of(f)} {format_value(f.default)} is the general default, which {NORMS[norm].label} ({norm}) "
                      f"replaces with its own: {norm} trains at {name} {format_value(value)}")


def runtime_from(args: argparse.Namespace) -> Runtime:
    return Runtime(device=args.device, threads=args.threads, precision=args.precision, compile=args.compile,
                   deterministic=args.deterministic).validate()


def training_runtime(args: argparse.Namespace, argv: list[str]) -> Runtime:
    """What train, run and sweep do first: the runtime, its threads set, and a note on any replaced typed default."""
    runtime = runtime_from(args)
    set_threads(runtime.threads)
    note_replaced_defaults(argv, args)
    return runtime


def resume_command(args: argparse.Namespace) -> str:
    """The command line that continues what ``args`` started (train, run, sweep, study): the same data, settings and runtime."""
    cfg, runtime = config_from(args), runtime_from(args)
    if args.command == "train":
        return api.command("train", _train_out(args, cfg), cfg, data_dir=args.data_dir, runtime=runtime, resume=True)
    if args.command == "study":
        return api.command("study", args.out, cfg, seeds=args.seeds, first_seed=args.seed, data_dir=args.data_dir, runtime=runtime,
                           resume=True, default_seeds=api.STUDY_SEEDS)
    grid = api.parse_grid(args.grid) if args.command == "sweep" else None
    return api.command(args.command, args.out, cfg, args.norms.split(","), grid, args.seeds, args.seed, args.data_dir, runtime,
                       resume=True)


def _train_out(args: argparse.Namespace, cfg: Config) -> Path:
    return Path(args.resume or args.out or f"runs/{cfg.norm}")


def cmd_train(args: argparse.Namespace, argv: list[str]) -> int:
    cfg, runtime = config_from(args), training_runtime(args, argv)
    api.train(cfg, args.data_dir, _train_out(args, cfg), resume=args.resume is not None, runtime=runtime)
    return 0


def cmd_run(args: argparse.Namespace, argv: list[str]) -> int:
    runtime = training_runtime(args, argv)
    result = api.run(config_from(args), args.data_dir, args.out, norms=args.norms.split(","), seeds=args.seeds, first_seed=args.seed,
                     resume=args.resume, jobs=args.jobs, runtime=runtime, report=not args.no_report)
    print(result.table())
    if result.report is not None:
        print(f"report: {result.report}")
    return 0


def cmd_sweep(args: argparse.Namespace, argv: list[str]) -> int:
    runtime = training_runtime(args, argv)
    result = api.sweep(config_from(args), args.data_dir, args.out, norms=args.norms.split(","), grid=args.grid, seeds=args.seeds,
                       first_seed=args.seed, resume=args.resume, jobs=args.jobs, runtime=runtime, ray=args.ray, ray_cpus=args.ray_cpus,
                       ray_gpus=args.ray_gpus, ray_retries=args.ray_retries, ray_scratch=args.ray_scratch,
                       report=not args.no_report)  # SweepError (exit 2) names the models that failed
    print(result.table())
    print(f"table: {result.csv}" + (f"\nreport: {result.report}" if result.report else ""))
    return 0


def cmd_study(args: argparse.Namespace, argv: list[str]) -> int:
    runtime = training_runtime(args, argv)
    result = api.study(config_from(args), args.data_dir, args.out, seeds=args.seeds, first_seed=args.seed, resume=args.resume,
                       jobs=args.jobs, runtime=runtime, ray=args.ray, ray_cpus=args.ray_cpus, ray_gpus=args.ray_gpus,
                       ray_retries=args.ray_retries, ray_scratch=args.ray_scratch, report=not args.no_report)
    print(result.table())
    print(f"table: {result.csv}" + (f"\nreport: {result.report}" if result.report else ""))
    return 0


def cmd_merge(args: argparse.Namespace, argv: list[str]) -> int:
    result = api.merge(args.sweeps, args.out)
    print(result.table())
    print(f"table: {result.csv}\nreport: {result.report}")
    return 0


def cmd_evaluate(args: argparse.Namespace, argv: list[str]) -> int:
    runtime = runtime_from(args)
    set_threads(runtime.threads)
    text = json.dumps(api.evaluate(Path(args.checkpoint), args.data_dir, runtime), indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


def cmd_predict(args: argparse.Namespace, argv: list[str]) -> int:
    runtime = runtime_from(args)
    set_threads(runtime.threads)
    predictions = api.predict(Path(args.model), args.images, top=args.top, runtime=runtime)  # UsageError (exit 2) if none
    print(api.predictions_table(predictions))
    if args.json:
        Path(args.json).write_text(json.dumps([p.to_dict() for p in predictions], indent=2) + "\n")
    return 0


def cmd_summary(args: argparse.Namespace, argv: list[str]) -> int:
    print(api.summary(args.norm, args.widths, args.groups))
    return 0


def cmd_report(args: argparse.Namespace, argv: list[str]) -> int:
    print(f"report: {api.write_report(Path(args.run_dir), args.data_dir)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="normlab", description="Batch vs group vs layer norm on one small CNN for CIFAR-10.")
    p.add_argument("--version", action="version", version=f"normlab {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for add in (_train_parser, _run_parser, _sweep_parser, _study_parser, _merge_parser, _evaluate_parser, _predict_parser,
                _summary_parser, _report_parser):  # one function per command
        add(sub)
    return p


def _train_parser(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train", help="train one model into one run folder",
                       usage="%(prog)s [--data-dir DIR] [--norm NORM] [options] [--out RUN] [--resume [RUN]]")
    add_data_flag(t)
    t.add_argument("--norm", default=DEFAULTS.norm, help=f"normalization layer: {' | '.join(NORMS)} (default: {DEFAULTS.norm})")
    add_config_flags(t)
    add_runtime_flags(t)
    t.add_argument("--seed", type=int, default=DEFAULTS.seed, help=f"random seed (default: {DEFAULTS.seed})")
    t.add_argument("--out", default=None, help="run folder (default: runs/NORM)")
    t.add_argument("--resume", nargs="?", const="", default=None, metavar="RUN_DIR",
                   help="continue RUN_DIR (default: --out) from its last complete epoch, with its saved settings")
    t.set_defaults(func=cmd_train)


def _run_parser(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("run", help="train bn, gn and ln (the main job), then write the report",
                       usage="%(prog)s [--data-dir DIR] [--seeds N] [--jobs J] [options] [--out DIR] [--resume]")
    add_data_flag(r)
    add_config_flags(r)
    add_runtime_flags(r)
    r.add_argument("--norms", default=",".join(DEFAULT_NORMS), help=f"comma-separated norms to train, of {', '.join(NORMS)} (default: {','.join(DEFAULT_NORMS)})")
    r.add_argument("--seeds", type=int, default=1, help="seeds per model; results give mean and std (default: 1)")
    r.add_argument("--seed", type=int, default=DEFAULTS.seed, help=f"first seed (default: {DEFAULTS.seed})")
    r.add_argument("--out", default="runs/latest", help="parent folder, one subfolder per model (default: runs/latest)")
    r.add_argument("--resume", action="store_true", help="skip finished models and continue an interrupted one")
    r.add_argument("--jobs", type=int, default=1,
                   help="models trained at once, each on a share of the cores; 2 is faster on 2 cores (default: 1)")
    r.add_argument("--no-report", action="store_true", help="print the table but do not write report.md")
    r.set_defaults(func=cmd_run)


def _sweep_parser(sub: argparse._SubParsersAction) -> None:
    w = sub.add_parser("sweep", help="train norms x a grid of settings x seeds (locally or on Ray), then write sweep.md",
                       usage="%(prog)s [--data-dir DIR] [--norms N,N] [--grid SETTING=V,V] [--seeds N] [options]",
                       description="One model per norm, combination of the --grid values and seed, each in its own folder "
                                   "(OUT/bn/norm_batch=8/seed0); a setting that only other norms read (groups for bn) gives a norm "
                                   "one model at the base value. A model that fails is reported and the others finish (exit 2).")
    add_data_flag(w)
    add_config_flags(w)
    add_runtime_flags(w)
    w.add_argument("--norms", default=",".join(DEFAULT_NORMS), help=f"comma-separated norms, of {', '.join(NORMS)} (default: {','.join(DEFAULT_NORMS)})")
    w.add_argument("--grid", action="append", default=[], metavar="SETTING=V1,V2,...",
                   help="a training setting and its values, e.g. norm_batch=2,8,32; repeat it for a grid (default: none)")
    w.add_argument("--seeds", type=int, default=1, help="seeds per cell; the table and figure give mean and std (default: 1)")
    _add_sweep_flags(w, "runs/sweep", "the sweep's folder")
    w.set_defaults(func=cmd_sweep)


def _add_sweep_flags(p: argparse.ArgumentParser, out: str, what: str) -> None:
    """The flags that sweep and study share after --seeds: where, resume, how many at once, Ray, the report."""
    p.add_argument("--seed", type=int, default=DEFAULTS.seed, help=f"first seed (default: {DEFAULTS.seed})")
    p.add_argument("--out", default=out, help=f"{what} (default: {out})")
    p.add_argument("--resume", action="store_true", help="skip finished models and continue interrupted ones")
    p.add_argument("--jobs", type=int, default=1, help="models trained at once on this machine, each on its share of the cores (default: 1)")
    add_ray_flags(p)
    p.add_argument("--no-report", action="store_true", help="write sweep.csv but not sweep.md")


def _study_parser(sub: argparse._SubParsersAction) -> None:
    st = sub.add_parser("study", help="train the normalization study (17 cells x 3 seeds) into one sweep folder, then write sweep.md",
                        usage="%(prog)s [--data-dir DIR] [--seeds N] [--jobs J] [options] [--out DIR] [--resume]",
                        description="bn at 2, 4, 8, 16, 32 and 128 (the whole batch) images per normalization statistic, brn at 2, "
                                    "4, 8 and 32, gn, ln, in, none and frn once each, bn at 2 and 4 with --precise-bn 0; seed 0 of "
                                    "every cell first, then seed 1... Resume it over as many sittings and machines as it takes.")
    add_data_flag(st)
    add_config_flags(st, skip=("norm", "seed", "norm_batch"))  # the study sets norm_batch per cell
    add_runtime_flags(st)
    st.add_argument("--seeds", type=int, default=api.STUDY_SEEDS, help=f"seeds per cell (default: {api.STUDY_SEEDS})")
    _add_sweep_flags(st, "runs/study", "the study's sweep folder")
    st.set_defaults(func=cmd_study)


def _merge_parser(sub: argparse._SubParsersAction) -> None:
    m = sub.add_parser("merge", help="merge sweep folders of the same settings into one, then write its sweep.md",
                       description="Copies the model folders of each SWEEP_DIR into --out (which may be one of them) where it has no "
                                   "finished model of that cell and seed; their base settings and training data must be the same.")
    m.add_argument("sweeps", nargs="+", metavar="SWEEP_DIR", help="folders written by normlab sweep or normlab study")
    m.add_argument("--out", required=True, help="the merged sweep folder; an existing sweep there is merged too")
    m.set_defaults(func=cmd_merge)


def _evaluate_parser(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("evaluate", help="test accuracy of a saved model.pt on a CIFAR-10 folder")
    e.add_argument("checkpoint", help="a model.pt written by normlab train")
    e.add_argument("--data-dir", default=None, help="folder holding cifar-10-batches-py/ (default: $NORMLAB_DATA, else ./data)")
    e.add_argument("--json", default=None, help="also write the result to this JSON file (default: none)")
    add_runtime_flags(e)
    e.set_defaults(func=cmd_evaluate)


def _predict_parser(sub: argparse._SubParsersAction) -> None:
    pr = sub.add_parser("predict", help="top classes of your own images (PNG, JPEG... of any size) by a saved model.pt",
                        description="Each image is cut to its centred square and resized to 32x32 (Pillow, bilinear). Files that are "
                                    "not readable images get one warning line each and the others are still predicted; the exit "
                                    "status is 0 if at least one image was predicted, 2 if none.")
    pr.add_argument("model", help="a model.pt written by normlab train")
    pr.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files, or folders (their image files, not recursive)")
    pr.add_argument("--top", type=int, default=3, help="classes shown per image (default: 3)")
    pr.add_argument("--json", default=None, help="also write the predictions to this JSON file (default: none)")
    add_runtime_flags(pr)
    pr.set_defaults(func=cmd_predict)


def _summary_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("summary", help="layers, output shapes and parameter counts of one model")
    s.add_argument("--norm", default=DEFAULTS.norm, help=f"{' | '.join(NORMS)} (default: {DEFAULTS.norm})")
    s.add_argument("--widths", type=_widths, default=DEFAULTS.widths,
                   help=f"channels of C1-C2, c3-C5, c6-C9 (default: {format_value(DEFAULTS.widths)})")
    s.add_argument("--groups", type=int, default=DEFAULTS.groups, help=f"group norm's group count (default: {DEFAULTS.groups})")
    s.set_defaults(func=cmd_summary)


def _report_parser(sub: argparse._SubParsersAction) -> None:
    rp = sub.add_parser("report", help="write report.md and figures from a run folder")
    rp.add_argument("run_dir", help="a folder written by normlab run, normlab train or normlab sweep (sweep.md and sweep.csv)")
    rp.add_argument("--data-dir", default=None,
                    help="CIFAR-10 folder for the image figures (default: the run's, else $NORMLAB_DATA, else ./data)")
    rp.set_defaults(func=cmd_report)

def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    with api.sigterm_stops():  # SIGTERM ends a command as Ctrl-C does: workers stopped, the resume line, no traceback
        try:
            return args.func(args, argv)
        except KeyboardInterrupt as stop:
            hint = _resume_hint(args)
            what = "stopped (SIGTERM)" if api.stop_signal(stop) == signal.SIGTERM else "interrupted"
            msg = f"normlab: {what}; the last complete epoch is kept" + (f". Resume with: {hint}" if hint else "")
            print(msg, file=sys.stderr)
            return api.stop_exit_status(stop)  # 130 after Ctrl-C, 143 after SIGTERM
        except (NormlabError, ValueError, OSError) as e:
            if isinstance(e, OSError) and e.filename and no_space(e, e.filename):  # e.g. --json on a full disk
                e = no_space(e, e.filename)
            print("normlab: error: " + " ".join(str(e).split()), file=sys.stderr)  # one line, always
            return EXIT_ERROR


def _resume_hint(args: argparse.Namespace) -> str | None:
    """The command that resumes an interrupted train, run or sweep (None where there is none, or its flags were bad)."""
    if args.command not in ("train", "run", "sweep", "study"):
        return None
    try:
        return resume_command(args)
    except (NormlabError, ValueError):
        return None


if __name__ == "__main__":
    sys.exit(main())
