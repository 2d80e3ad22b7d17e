"""What normlab does, as functions: ``train`` one model, ``run`` the norms x seeds and report,
``sweep`` norms x a grid of settings x seeds (locally or on Ray), ``study`` the normalization study, ``merge`` sweep folders, ``evaluate`` a saved model, ``predict`` the classes of your own images, ``load`` a finished run.
The command line and notebooks both call these; they raise the errors of ``errors.py`` (the CLI
prints their message as its one line) and never exit.

From a notebook, settings are keywords: ``train(norm="gn", data_dir="data", epochs=20)`` takes any
``Config`` setting (what the model learns) and any ``Runtime`` option (``device``, ``threads``,
``precision``: how it runs), and without ``out`` writes into a fresh folder under ``runs/``.
``train`` and ``run`` return a ``TrainResult`` / ``RunResult`` (``result.py``).
"""
from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from normlab import data as D
from normlab.cluster import RayOptions, execute_ray, import_ray
from normlab.config import MAX_EPOCHS, Config, parse_widths, setting_fields
from normlab.device import COMPILE, PRECISIONS, Runtime, device_name, failure, peak_rss_mib, runtime_with, set_threads, setup
from normlab.errors import ConfigError, DiskFullError, NormlabError, SweepError, TrainingError, UsageError
from normlab.lock import FolderLock
from normlab.stops import exit_status as stop_exit_status, received as stop_signal, sigterm_stops
from normlab.loop import Diverged, FinalScores, Trainer, build, evaluate as evaluate_model, placement
from normlab.models import PARAM_BUDGET, count_params, model_summary
from normlab.norms import DEFAULT_NORMS, NORMS
from normlab.plan import SKIP, check_norms, check_sizes, execute, note_afresh, parse_grid, plan_cells, plan_models, same_data
from normlab.report import write_report as write_run_report
from normlab.result import RunResult, TrainResult, predict, predictions_table
from normlab.rundir import (CHECKPOINT, CONFIG, DATA, Results, RunDir, check_same_data, command, find_runs, load_model,
                            median_epoch_seconds)
from normlab.studies import SEEDS as STUDY_SEEDS, parts as study_parts
from normlab.manifest import Manifest, is_sweep, write_manifest
from normlab.sweepdir import TABLE, SweepResult, merge as merge_sweeps, write_sweep
from normlab.version import __version__

# What the command line reads from here (it talks to this module, config and errors only).
__all__ = ["COMPILE", "DEFAULT_NORMS", "NORMS", "PRECISIONS", "STUDY_SEEDS", "Runtime", "command", "evaluate", "load", "merge",
           "parse_grid", "predict", "predictions_table", "run", "set_threads", "sigterm_stops", "stop_exit_status", "stop_signal",
           "study", "summary", "sweep", "train", "write_report"]

Log = Callable[[str], None]


def _log(message: str) -> None:
    print(message, flush=True)  # flushed: a log file of a long run must show each epoch as it ends


RUNS = Path("runs")  # where a notebook's runs go when no folder is given


def options(cfg: Config | None, runtime: Runtime | None, keywords: dict[str, Any]) -> tuple[Config, Runtime]:
    """``cfg`` and ``runtime`` (defaults if None) with ``keywords`` applied: ``Config`` settings and ``Runtime``
    options by name. An unknown name is a ``ConfigError`` that lists the valid ones. Threads given here are set."""
    settings = tuple(f.name for f in setting_fields())
    runtime = runtime_with(runtime, keywords, others=settings)
    learn = {k: v for k, v in keywords.items() if k in settings}
    if isinstance(learn.get("widths"), str):
        learn["widths"] = parse_widths(learn["widths"])
    elif "widths" in learn:
        learn["widths"] = tuple(learn["widths"])
    return dataclasses.replace(cfg if cfg is not None else Config(), **learn), runtime


def out_folder(out: str | os.PathLike | None, resume: bool, name: str, needed: str) -> Path:
    """``out``, or without it a fresh runs/NAME-DATE-TIME; a resume needs ``out``: ``needed`` names it."""
    if out is not None:
        return Path(out)
    if resume:
        raise UsageError(f"resume needs {needed}")
    return fresh_folder(name)


def fresh_folder(name: str) -> Path:
    """runs/NAME-YYYYMMDD-HHMMSS (-2, -3... if that is taken): a folder no run has used."""
    stem = RUNS / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = stem, 1
    while path.exists():
        n += 1
        path = stem.with_name(f"{stem.name}-{n}")
    return path


# ---------------------------------------------------------------- one model
def train(cfg: Config | None = None, data_dir: str | os.PathLike | None = None, out: str | os.PathLike | None = None,
          resume: bool = False, runtime: Runtime | None = None, log: Log = _log, **settings: Any) -> TrainResult:
    """Train one model into the run folder ``out``; returns its ``TrainResult`` (folder, results, metrics, config).

    What it learns is ``cfg`` (default ``Config()``) with ``settings`` applied, e.g.
    ``train(norm="gn", data_dir="data", epochs=20)``; how it runs is ``runtime`` with the runtime
    options among ``settings`` (``device``, ``threads``, ``precision``...). Without ``out`` it trains
    into a fresh folder runs/NORM-DATE-TIME. With ``resume`` the folder's own settings are used and
    training continues from its last complete epoch (a finished folder is left as it is). A run that
    fails before its first epoch is complete leaves nothing behind (except after Ctrl-C, when its saved
    settings let ``--resume`` start it again). The folder is locked while it trains: another process
    writing into it is refused (``lock.Busy``), and so is this call if another holds it."""
    cfg, runtime = options(cfg, runtime, settings)  # the runtime validated
    out = out_folder(out, resume, cfg.norm, "the run folder to continue: pass out=RUN_FOLDER")
    cfg.validate()
    started = time.perf_counter()
    rd = RunDir(out)
    created = rd.check_writable()
    with FolderLock(rd.path, created):  # one writer per folder for the whole training; a second one is refused (Busy)
        # Looked at under the lock: a run that another process ended a moment ago is seen
        if resume and rd.finished:
            rd.check_record()  # a folder two runs wrote into is no finished run
            log(f"{rd}: finished earlier, nothing to resume")  # and nothing is rewritten
        else:
            _train_locked(rd, cfg, resume, data_dir, runtime, log, started)
    return TrainResult.load(rd.path)  # read once the lock is released: a reader refuses a folder being written


def _train_locked(rd: RunDir, cfg: Config, resume: bool, data_dir: str | os.PathLike | None, runtime: Runtime, log: Log,
                  started: float) -> None:
    """Train into ``rd`` while holding its lock: resumed or fresh, its data found, what a failure leaves taken back."""
    cfg, resume = _resumed(rd, cfg, resume, data_dir, runtime, log)
    had_config = rd.has_config
    recorded = rd.read_data() if had_config else None
    if data_dir is None and recorded is not None:  # a resumed run finds its own data, not $NORMLAB_DATA's
        data_dir = recorded["data_dir"]
    try:
        _train(cfg, D.resolve_data_dir(data_dir), rd, resume, runtime, log, started, recorded)
    except KeyboardInterrupt:
        raise  # resumable: config.json (and any checkpoint) stay, and the CLI prints the command that resumes
    except BaseException as e:
        _discard_failed(rd, had_config, e)
        raise


def _discard_failed(rd: RunDir, had_config: bool, error: BaseException) -> None:
    """After a failed training: remove the records this call wrote if no epoch was kept (the folders it made go once
    the lock is released); a full disk, a GPU out of memory or a failing compiler become one line that says what was
    kept and what to try."""
    if not rd.has_checkpoint and not had_config:
        for name in (CONFIG, DATA):
            (rd / name).unlink(missing_ok=True)
    if isinstance(error, DiskFullError):
        kept = "its last complete epoch is kept: resume it with --resume once there is room" if rd.has_checkpoint else "nothing was kept"
        raise DiskFullError(f"{error}; {kept}") from None
    # the GPU out of memory, torch.compile failing: one line that says what to try, not a traceback
    line = failure(error, f"the finished epochs are kept in {rd} and --resume continues from the last" if rd.has_checkpoint
                   else "nothing was kept")
    if line is not None:
        raise line from None


def _resumed(rd: RunDir, cfg: Config, resume: bool, data_dir: str | os.PathLike | None, runtime: Runtime,
             log: Log) -> tuple[Config, bool]:
    """The settings and whether to load a checkpoint: a resumed folder's own settings (resumed only if it has a
    checkpoint); a fresh start refuses a folder that holds a run."""
    if not resume:
        rd.check_free(command("train", rd.path, cfg, data_dir=data_dir, runtime=runtime, resume=True))
        return cfg, False
    if not rd.has_config:
        raise TrainingError(f"{rd} is not a normlab run that can be resumed (no {CONFIG}); start it with normlab train --out {rd}")
    cfg = rd.read_config()  # a resumed run keeps the settings it was started with
    rd.check_record()  # config.json and the results or checkpoint of one run, not of two
    if not rd.has_checkpoint:  # stopped within its first epoch: nothing to keep, start it again
        log(f"{rd} stopped before its first epoch ended; starting it again with its saved settings")
        return cfg, False
    return cfg, True


def _train(cfg: Config, data_dir: Path, rd: RunDir, resume: bool, runtime: Runtime, log: Log, started: float,
           recorded: dict[str, Any] | None) -> None:
    """One model from its data to its files: placement, data, trainer, epochs, final evaluation, the record."""
    place = placement(cfg, runtime)
    splits, fingerprint = _load_data(cfg, data_dir, rd, recorded)
    trainer = build(cfg, place, *splits, progress=runtime.progress)
    if resume:
        _load_checkpoint(trainer, rd)
        log(f"resuming {rd} after epoch {trainer.epoch} of {cfg.epochs}")
    else:
        rd.write_config(cfg)
    if recorded is None or recorded["data_dir"] != str(data_dir.resolve()):
        rd.write_data({"data_dir": str(data_dir.resolve()), "train": fingerprint})
    log(_header_line(trainer))
    if trainer.epoch == 0:
        log(f"{'epoch':>5} {'lr':>7} {'loss':>7} {'train':>7} {'val':>7} {'test':>7} {'sec':>6}")
    _train_epochs(trainer, rd, log)
    scores = trainer.final_scores()
    if scores.test_logits is not None:
        rd.write_predictions(trainer.test_y.cpu(), scores.test_logits)
    rd.save_model(cfg, trainer.final)
    results = _record(trainer, scores, rd, data_dir, started)
    rd.write_results(results)
    log(_done_line(results, rd))


def _load_data(cfg: Config, data_dir: Path, rd: RunDir, recorded: dict[str, Any] | None) -> tuple[tuple, dict[str, Any]]:
    """(train_x, train_y, val_x, val_y, test_x, test_y) as ``build`` takes them, and the training data's fingerprint;
    refuses other data than a resumed run's."""
    images, labels = D.load_split(data_dir, train=True)
    fingerprint = D.fingerprint(images, labels)
    check_same_data(rd.path, data_dir, recorded, fingerprint)  # a resumed run: the data it started on
    # Read (not yet used) up front: a bad test file must fail before the training, not after it.
    test_x, test_y = D.load_split(data_dir, train=False) if cfg.eval_test else (None, None)
    train_idx, val_idx = D.stratified_split(labels, cfg.val_size, cfg.seed)
    return (images[train_idx], labels[train_idx], images[val_idx], labels[val_idx], test_x, test_y), fingerprint


def _load_checkpoint(trainer: Trainer, rd: RunDir) -> None:
    ck = rd.load_checkpoint()
    try:
        trainer.load_state_dict(ck)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise TrainingError(f"{rd / CHECKPOINT} is not a checkpoint of this run ({type(e).__name__}); "
                            f"{rd} cannot be resumed, start afresh with another --out") from None


def _train_epochs(trainer: Trainer, rd: RunDir, log: Log) -> None:
    """The remaining epochs, each saved (checkpoint, metrics.csv) and logged as it ends; a non-finite loss stops it."""
    while not trainer.done:
        try:
            row = trainer.run_epoch()
        except Diverged as e:
            kept = f"the last good epoch ({e.epoch - 1}) is kept in {rd}. " if e.epoch > 1 else "nothing was kept. "
            raise TrainingError(f"{e}; {kept}Start again with a lower --lr (and --muon-lr)" + (" and another --out" if e.epoch > 1 else "")) from None
        rd.save_checkpoint(trainer.state_dict(), trainer.cfg)
        rd.write_metrics(trainer.metrics)
        log(_epoch_line(row))


def _header_line(trainer: Trainer) -> str:
    cfg, place = trainer.cfg, trainer.place
    limit = "" if cfg.epochs <= MAX_EPOCHS else f"  [{cfg.epochs} epochs: outside the prescribed limit of {MAX_EPOCHS}]"
    return (f"{NORMS[cfg.norm].label} ({cfg.norm}; {NORMS[cfg.norm].describe(**cfg.to_dict())}): {count_params(trainer.model):,} parameters, "
            f"{len(trainer.train_y):,} training / {len(trainer.val_y):,} validation images, {place.device.type}, {place.precision}, "
            f"{place.layout}, {torch.get_num_threads()} threads{limit}")


def _epoch_line(row: dict[str, Any]) -> str:
    v, t = (f"{row[k]:7.2%}" if row[k] is not None else f"{'-':>7}" for k in ("val_acc", "test_acc"))
    return f"{row['epoch']:>5} {row['lr']:7.4f} {row['train_loss']:7.4f} {row['train_acc']:7.2%} {v} {t} {row['seconds']:6.1f}"


def _done_line(results: Results, rd: RunDir) -> str:
    test = f", test {results.test_acc:.2%}" if results.test_acc is not None else ""
    minutes, secs = divmod(round(results.wall_seconds), 60)
    return (f"done in {minutes} min {secs:02d} s: train {results.train_acc_clean:.2%} (clean), "
            f"{results.train_acc_running:.2%} (running, augmented){test}; files in {rd}")


def _record(trainer: Trainer, scores: FinalScores, rd: RunDir, data_dir: Path, started: float) -> Results:
    """The finished model's results.json: the model as it stands after its last epoch."""
    cfg, rows = trainer.cfg, trainer.metrics
    return Results(
        norm=cfg.norm, norm_name=NORMS[cfg.norm].label, params=count_params(trainer.model), param_budget=PARAM_BUDGET,
        epochs=cfg.epochs, over_epoch_limit=cfg.over_epoch_limit, seed=cfg.seed,
        train_acc_running=rows[-1]["train_acc"] if rows else None, train_acc_clean=scores.train_acc_clean,
        val_acc=rows[-1]["val_acc"] if rows else None,
        seconds_per_epoch=median_epoch_seconds(rd.read_metrics()),  # as RunDir.read_results reads it back
        compile_seconds=trainer.compile_seconds, version=__version__, torch=torch.__version__, data_dir=str(Path(data_dir).resolve()),
        test_acc=scores.test_acc, test_acc_flip_tta=scores.test_acc_flip_tta,
        **trainer.place.record(),  # device, precision, layout; threads on a CPU; capability and peak GPU memory on CUDA
        # This call's wall time (data loading, training, final evaluations; a resumed run counts from
        # its resumption) and the process's peak resident memory so far.
        wall_seconds=time.perf_counter() - started, peak_rss_mib=peak_rss_mib())


# ---------------------------------------------------------------- several models
def run(base: Config | None = None, data_dir: str | os.PathLike | None = None, out: str | os.PathLike | None = None,
        norms: Sequence[str] = DEFAULT_NORMS, seeds: int = 1, first_seed: int | None = None, resume: bool = False, jobs: int = 1,
        runtime: Runtime | None = None, report: bool = True, resume_hint: str | None = None, log: Log = _log,
        **settings: Any) -> RunResult:
    """Train every norm x seed into ``out`` (one folder each), then write ``out/report.md``; returns the
    ``RunResult`` of the whole folder (its ``report`` is None with ``report=False``). Every folder is
    checked before anything trains.

    Settings and runtime options as keywords as for ``train``, e.g. ``run(data_dir="data", epochs=20)``;
    without ``out`` it trains into a fresh folder runs/run-DATE-TIME. Seeds start at ``first_seed``
    (default: the config's ``seed``)."""
    base, runtime = options(base, runtime, settings)
    out = out_folder(out, resume, "run", "the folder of the run to continue: pass out=PARENT")
    first_seed = base.seed if first_seed is None else first_seed
    check_sizes(norms, seeds, jobs)
    parent = Path(out)
    hint = resume_hint or command("run", parent, base, norms, seeds=seeds, first_seed=first_seed, data_dir=data_dir,
                                  runtime=runtime, resume=True)
    plan = plan_models(base, norms, seeds, first_seed, parent, resume, hint)
    for j in plan:
        if j.action == SKIP:
            log(f"{j.out}: finished earlier, skipped")
    # data_dir stays None if not given: a resumed model then finds the data it started on (data.json)
    execute(plan, train, same_data(plan, data_dir), runtime, jobs, log)
    path = write_run_report(parent) if report else None
    result = RunResult.load(parent)
    result.report = path  # None with report=False, even where an older report.md lies
    return result


def sweep(base: Config | None = None, data_dir: str | os.PathLike | None = None, out: str | os.PathLike | None = None,
          norms: Sequence[str] | str = DEFAULT_NORMS, grid: Sequence[str] | dict[str, Sequence[Any]] = (), seeds: int = 1,
          first_seed: int | None = None, resume: bool = False, jobs: int = 1, runtime: Runtime | None = None, ray: str | None = None,
          ray_cpus: float = 1.0, ray_gpus: float = 0.0, ray_retries: int = 3, ray_scratch: str | None = None, report: bool = True,
          resume_hint: str | None = None, log: Log = _log, **settings: Any) -> SweepResult:
    """Train norms x ``grid`` x seeds into ``out`` (one folder per model: out/bn/norm_batch=8/seed0), then write
    ``sweep.csv`` and ``sweep.md``; returns the ``SweepResult``. ``grid`` is ``{"lr": [0.05, 0.1]}`` or the CLI's
    ``["lr=0.05,0.1"]``; a setting that only other norms read (``groups`` for bn) gives a norm one model, not one per value.

    Locally by default (``jobs`` at a time); with ``ray`` (auto | local | HOST:PORT) each model is a Ray task asking
    ``ray_cpus`` CPUs and ``ray_gpus`` GPUs. A model that fails is reported and the others finish: then ``SweepError``
    (its ``result`` is the sweep) names the failed ones, after the files are written. Settings as for ``run``."""
    base, runtime = options(base, runtime, settings)
    out = out_folder(out, resume, "sweep", "the folder of the sweep to continue: pass out=PARENT")
    parent, first_seed = Path(out), base.seed if first_seed is None else first_seed
    norms = tuple(norms.split(",") if isinstance(norms, str) else norms)
    check_sizes(norms, seeds, jobs)
    ray_options = _ray_options(ray, ray_cpus, ray_gpus, ray_retries, ray_scratch, jobs)
    check_norms(norms)
    manifest = Manifest.sweep(base, norms, parse_grid(grid), seeds, first_seed)
    return _sweep(manifest, parent, data_dir, resume, jobs, runtime, ray_options, report, resume_hint, log)


def study(base: Config | None = None, data_dir: str | os.PathLike | None = None, out: str | os.PathLike | None = None,
          seeds: int = STUDY_SEEDS, first_seed: int | None = None, resume: bool = False, jobs: int = 1, runtime: Runtime | None = None,
          ray: str | None = None, ray_cpus: float = 1.0, ray_gpus: float = 0.0, ray_retries: int = 3, ray_scratch: str | None = None,
          report: bool = True, resume_hint: str | None = None, log: Log = _log, **settings: Any) -> SweepResult:
    """Train the normalization study (``study.py``: bn at 2 ... 128 images per statistic, brn at 2 ... 32, gn, ln, in,
    none and frn, bn at 2 and 4 without precise BN) x ``seeds`` seeds into the sweep folder ``out``, seed 0 of every
    cell first, then write ``sweep.csv`` and ``sweep.md`` with its figures; returns the ``SweepResult``. Settings,
    runtime options, ``jobs``, ``ray`` and ``resume`` as for ``sweep``: a study over several sittings is resumed."""
    base, runtime = options(base, runtime, settings)
    out = out_folder(out, resume, "study", "the folder of the study to continue: pass out=PARENT")
    parent, first_seed = Path(out), base.seed if first_seed is None else first_seed
    check_sizes((), seeds, jobs)
    ray_options = _ray_options(ray, ray_cpus, ray_gpus, ray_retries, ray_scratch, jobs)
    manifest = Manifest(base, study_parts(), seeds, first_seed)
    return _sweep(manifest, parent, data_dir, resume, jobs, runtime, ray_options, report, resume_hint, log)


def _ray_options(ray: str | None, cpus: float, gpus: float, retries: int, scratch: str | None, jobs: int) -> RayOptions | None:
    options = RayOptions(ray, cpus, gpus, retries, scratch).validate() if ray else None
    if options and jobs > 1:
        raise ConfigError("--jobs is for local runs; with --ray, the cluster runs as many models at once as --ray-cpus/--ray-gpus allow")
    return options


def _sweep(manifest: Manifest, parent: Path, data_dir: str | os.PathLike | None, resume: bool, jobs: int, runtime: Runtime,
           ray_options: RayOptions | None, report: bool, resume_hint: str | None, log: Log) -> SweepResult:
    """The cells of ``manifest`` x its seeds into ``parent``: planned and checked, trained, then the sweep's files."""
    hint = resume_hint or manifest.command(parent, D.resolve_data_dir(data_dir), runtime, resume=True)
    plan = plan_cells(manifest.base, manifest.cells(), manifest.seeds, manifest.first_seed, parent, resume, hint)
    if ray_options:
        import_ray()  # without the extra: one line now, before any file is written
    data_dir = same_data(plan, data_dir)  # a resumed sweep's new models: the data its finished ones trained on
    write_manifest(parent, manifest, resume)
    todo = [j for j in plan if j.action != SKIP]
    log(f"sweep into {parent}: {len(plan)} model{'s' * (len(plan) > 1)}, {len(plan) - len(todo)} finished earlier, {len(todo)} to train")
    note_afresh(plan, log)
    if ray_options:
        failures = execute_ray(plan, train, data_dir, runtime, ray_options, parent, resume, log)
    else:  # data_dir stays None if not given: a resumed model then finds the data it started on (data.json)
        failures = execute(plan, train, data_dir, runtime, jobs, log, keep_going=True)
    try:
        result, unwritten = write_sweep(parent, report=report), None
    except NormlabError as e:  # e.g. a full disk: the failed models still come first
        if not failures:
            raise
        result, unwritten = None, e
    if failures:
        failed = "; ".join(f"{j.out.relative_to(parent).as_posix()} ({' '.join(str(e).split()) or type(e).__name__})" for j, e in failures)
        table = f"{TABLE} in {parent} has them all" if unwritten is None else f"the sweep's files could not be written ({unwritten})"
        raise SweepError(f"{len(failures)} of the {len(todo)} models of the sweep failed: {failed}. The others finished and "
                         f"{table}; once the cause is fixed, train the failed ones with: {hint}", result)
    return result


def merge(sources: Sequence[str | os.PathLike], out: str | os.PathLike, log: Log = _log) -> SweepResult:
    """Sweep folders of the same base settings and data as one sweep in ``out``: the union of their cells and seeds,
    the model folders copied, then ``sweep.csv``, ``sweep.md`` and the figures (``sweepdir.merge``)."""
    return merge_sweeps(sources, out, log)


# ---------------------------------------------------------------- finished runs
def load(path: str | os.PathLike) -> TrainResult | RunResult | SweepResult:
    """A finished run read from its folder: a ``SweepResult`` for a ``normlab sweep`` folder, a ``RunResult`` for a
    ``normlab run`` parent, else a ``TrainResult``."""
    if is_sweep(path):
        return SweepResult.load(path)
    _, is_parent = find_runs(Path(path))
    return RunResult.load(path) if is_parent else TrainResult.load(path)


def write_report(path: str | os.PathLike, data_dir: str | os.PathLike | None = None) -> Path:
    """Rebuild the report of a finished folder from its files: ``report.md`` and its figures for a run, ``sweep.csv``
    and ``sweep.md`` for a sweep; returns the report's path."""
    if is_sweep(path):
        return write_sweep(Path(path)).report
    return write_run_report(Path(path), data_dir)


def summary(norm: str, widths: tuple[int, int, int], groups: int) -> str:
    """The torchinfo table of the network of ``norm`` at these widths (and group count)."""
    return model_summary(Config(norm=norm, widths=widths, groups=groups).validate())


def evaluate(model_path: str | os.PathLike, data_dir: str | os.PathLike | None = None, runtime: Runtime | None = None,
             **runtime_options: Any) -> dict[str, Any]:
    """Test accuracy (plain and flip-averaged) and loss of a saved ``model.pt`` on a CIFAR-10 folder."""
    runtime = runtime_with(runtime, runtime_options)
    model, cfg = load_model(Path(model_path))
    place = setup(runtime, cfg.norm)
    model = place.place(model)
    data_dir = D.resolve_data_dir(data_dir)
    images, labels = D.load_split(data_dir, train=False)
    images, labels = images.to(place.device), labels.to(place.device)
    acc, loss = evaluate_model(model, images, labels, place)
    tta, _ = evaluate_model(model, images, labels, place, flip=True)
    return {"checkpoint": str(model_path), "norm": cfg.norm, "params": count_params(model), "data_dir": str(data_dir),
            "images": len(labels), "test_acc": acc, "test_loss": loss, "test_acc_flip_tta": tta, "device": device_name(place.device)}
