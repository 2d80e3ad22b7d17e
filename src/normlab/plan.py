"""From a grid of settings to model folders, and the executors that train them.

``plan_models`` turns norms x seeds, and ``plan_sweep`` norms x a grid of settings x seeds, into
``Job``s: each model's config, its folder and what to do with it (skip a finished one, resume an
interrupted one, start a new one), checking every folder before anything trains. ``execute`` trains
the jobs in this process or in local worker processes (``cluster.execute_ray``: as Ray tasks); it
receives the function that trains one model (``api.train``), so this module needs nothing above it.
"""
from __future__ import annotations

import dataclasses
import difflib
import itertools
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from normlab import data as D
from normlab import workers
from normlab.config import Config, format_value, parse_widths, setting_fields
from normlab.device import Runtime, set_threads, worker_runtimes
from normlab.errors import ConfigError, UsageError
from normlab.norms import reads
from normlab.rundir import CHECKPOINT, CONFIG, RunDir, cell_folder, check_same_data, missing_model, model_folder

SKIP, RESUME, NEW = "skip", "resume", "new"


@dataclass(frozen=True)
class Job:
    cfg: Config
    out: Path
    action: str  # skip (finished earlier) | resume (from its checkpoint) | new


def check_same_settings(out: Path, cfg: Config) -> None:
    """A model folder that a resumed plan skips or continues must hold a run of the settings asked for now: else one
    report would mix models trained differently (e.g. an old run's SGD model beside new Muon ones)."""
    try:
        saved = Config.load(out / CONFIG)
    except (OSError, ValueError, TypeError) as e:
        raise UsageError(f"{out / CONFIG} cannot be read ({type(e).__name__}); move {out} away or choose another --out") from None
    diff = [f"{k} {v!r} (asked: {asked!r})" for k, v, asked in saved.differences(cfg)]
    if diff:
        raise UsageError(f"{out} was trained with other settings: {'; '.join(diff)}; choose another --out, or give the same settings")


def plan_models(base: Config, norms: Sequence[str], seeds: int, first_seed: int, parent: Path, resume: bool, resume_hint: str) -> list[Job]:
    """Every model of norms x seeds with its folder and action; raises before anything trains if a folder is in the way.

    Seed by seed, all norms each time: a run cut short still holds whole seeds to compare."""
    check_sizes(norms, seeds)
    return [_job(dataclasses.replace(base, norm=norm, seed=seed).validate(), model_folder(Path(parent), norm, seed, seeds), resume, resume_hint)
            for seed in range(first_seed, first_seed + seeds) for norm in norms]


def check_sizes(norms: Sequence[str], seeds: int, jobs: int = 1) -> None:
    """A plan's own numbers (each model's settings are ``Config.validate``'s): at least one seed and one job."""
    if seeds < 1:
        raise ConfigError(f"--seeds must be at least 1 (got {seeds})")
    if jobs < 1:
        raise ConfigError(f"--jobs must be at least 1 (got {jobs})")


def _job(cfg: Config, folder: Path, resume: bool, resume_hint: str, records: bool = False) -> Job:
    """The job of one model folder: skip it (finished), resume it, or start it; refused without ``resume`` if it holds a run.
    With ``records`` (a sweep, which reads its models' records only) results.json alone is a finished model, its
    model.pt and checkpoint.pt may be gone; otherwise a model.pt deleted is written again from checkpoint.pt."""
    rd = RunDir(folder)
    if not resume:
        rd.check_free(resume_hint)
    if rd.has_results:
        rd.check_record(UsageError)
        check_same_settings(rd.path, cfg)
        if rd.finished or (records and not rd.has_checkpoint):
            return Job(cfg, rd.path, SKIP)
        if not rd.has_checkpoint:
            raise UsageError(missing_model(rd.path, resume_hint))
        return Job(cfg, rd.path, RESUME)  # its model.pt was deleted: its last checkpoint writes it again
    if rd.has_checkpoint:
        check_same_settings(rd.path, cfg)
        return Job(cfg, rd.path, RESUME)
    return Job(cfg, rd.path, NEW)


# ---------------------------------------------------------------- sweeps: norms x a grid of settings x seeds
Grid = dict[str, tuple[Any, ...]]  # setting -> the values it takes, in the order given
NOT_SWEPT = {"norm": "--norms", "seed": "--seeds"}  # settings that have their own flag in a sweep
TRUE, FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _parse_value(name: str, text: str, default: Any) -> Any:
    """One grid value typed as the setting's default is (bool, int, float, str, widths)."""
    t = text.strip()
    try:
        if isinstance(default, bool):
            if t.lower() not in TRUE + FALSE:
                raise ValueError
            return t.lower() in TRUE
        if isinstance(default, tuple):
            return parse_widths(t)
        return type(default)(t)
    except ValueError:
        kind = {bool: "true or false", int: "whole numbers", float: "numbers", str: "words"}.get(type(default), "values")
        example = "16x32x24,16x24x32 (each widths value written with x)" if isinstance(default, tuple) else format_value(default)
        raise ConfigError(f"--grid {name}: {t!r} is not a value of {name}, which takes {kind} (e.g. {name}={example})") from None


def parse_grid(specs: Iterable[str] | Mapping[str, Any]) -> Grid:
    """``["lr=0.05,0.1", "groups=4,8"]`` (the --grid flags) or ``{"lr": [0.05, 0.1]}`` -> {setting: typed values}.

    Any ``Config`` setting but norm and seed (their own flags); values are typed as the setting is;
    a widths value is written 16x32x24. ConfigError for an unknown name, a bad or repeated value."""
    defaults = {f.name: f.default for f in setting_fields()}
    if isinstance(specs, Mapping):
        items = [(k, v) for k, v in specs.items()]
    else:
        items = []
        for spec in specs:
            name, eq, values = spec.partition("=")
            if not eq or not name.strip() or not values.strip():
                raise ConfigError(f"--grid takes SETTING=VALUE,VALUE... (e.g. --grid lr=0.05,0.1), not {spec!r}")
            items.append((name.strip(), values.split(",")))
    grid: Grid = {}
    for name, values in items:
        name = name.replace("-", "_")
        if name in NOT_SWEPT:
            raise ConfigError(f"--grid cannot sweep {name}: use {NOT_SWEPT[name]}")
        if name not in defaults:
            close = difflib.get_close_matches(name, defaults, n=1)
            raise ConfigError(f"--grid: unknown setting {name!r}{f' (did you mean {close[0]!r}?)' if close else ''}; "
                              f"settings: {', '.join(k for k in defaults if k not in NOT_SWEPT)}")
        if name in grid:
            raise ConfigError(f"--grid {name} is given twice; give all its values at once: --grid {name}=A,B,C")
        if isinstance(values, str):
            values = values.split(",")
        elif not isinstance(values, (list, tuple, set, range)) or (name == "widths" and values and isinstance(next(iter(values)), int)):
            values = [values]  # one value: a number, or one widths tuple
        typed = tuple(_parse_value(name, v, defaults[name]) if isinstance(v, str) else _coerce(name, v, defaults[name]) for v in values)
        if not typed:
            raise ConfigError(f"--grid {name} has no values")
        repeated = sorted({format_value(v) for v in typed if typed.count(v) > 1})
        if repeated:
            raise ConfigError(f"--grid {name} repeats {', '.join(repeated)}")
        grid[name] = typed
    return grid


def _coerce(name: str, value: Any, default: Any) -> Any:
    """A value given as a Python object (the API): widths as a tuple of ints, ints accepted for floats."""
    if isinstance(default, tuple) and isinstance(value, (tuple, list)):
        return _parse_value(name, "x".join(map(str, value)), default)
    ok = isinstance(value, type(default)) and (isinstance(value, bool) == isinstance(default, bool))
    if ok or (isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool)):
        return type(default)(value)
    return _parse_value(name, str(value), default)


def sweep_cells(norm: str, grid: Grid) -> list[dict[str, Any]]:
    """The cells of one norm: every combination of the values of the settings it reads. A setting it does
    not read (another norm's option) is left at the base value, so it is trained once, not once per value."""
    keys = [k for k in grid if reads(norm, k)]
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


Part = tuple[tuple[str, ...], Grid]  # norms x a grid: one rectangle of a sweep; a study is a union of them
Cell = tuple[str, dict[str, Any]]     # a norm and the settings it trains at beyond the base (its folder's name)


def cells_of(parts: Sequence[Part]) -> list[Cell]:
    """The cells of a union of rectangles, in order: each part's norms x ``sweep_cells``; a cell that two parts share
    (the same norm and settings) is trained once, where it first appears."""
    out: list[Cell] = []
    for norms, grid in parts:
        for norm in norms:
            for cell in sweep_cells(norm, grid):
                if (norm, cell) not in out:
                    out.append((norm, cell))
    return out


def check_norms(norms: Sequence[str]) -> None:
    if len(set(norms)) < len(norms) or not norms:
        raise ConfigError(f"--norms must name each norm once (got {','.join(norms) or 'none'})")


def plan_sweep(base: Config, norms: Sequence[str], grid: Grid, seeds: int, first_seed: int, parent: Path, resume: bool,
               resume_hint: str) -> list[Job]:
    """Every model of norms x grid x seeds with its folder and action (``plan_cells`` of one rectangle)."""
    check_norms(norms)
    return plan_cells(base, cells_of([(tuple(norms), grid)]), seeds, first_seed, parent, resume, resume_hint)


def plan_cells(base: Config, cells: Sequence[Cell], seeds: int, first_seed: int, parent: Path, resume: bool,
               resume_hint: str) -> list[Job]:
    """Every model of cells x seeds with its folder and action, every cell's settings validated and every folder
    checked before anything trains. Seed by seed (seed 0 of every cell, then seed 1...): a sweep cut short, or trained
    over several sittings, holds whole seeds to compare."""
    check_sizes((), seeds)
    jobs = []
    for seed in range(first_seed, first_seed + seeds):
        for norm, cell in cells:
            try:
                cfg = dataclasses.replace(base, norm=norm, seed=seed, **cell).validate()
            except ConfigError as e:
                where = " ".join(f"{k}={format_value(v)}" for k, v in cell.items())
                raise ConfigError(f"{norm}{' with ' + where if where else ''}: {e}") from None
            jobs.append(_job(cfg, cell_folder(parent, norm, cell, seed), resume, resume_hint, records=True))
    return jobs


TrainFn = Callable[..., object]  # train(cfg, data_dir, out, resume=..., runtime=..., log=...)


Failures = list[tuple[Job, Exception]]


def execute(jobs: Sequence[Job], train: TrainFn, data_dir: Path, runtime: Runtime, n_jobs: int = 1, log=print,
            keep_going: bool = False) -> Failures:
    """Train the jobs not skipped: one after another here, or ``n_jobs`` at a time in worker processes.

    By default a first failure stops the plan (with workers: the models not yet started are
    not started, those training finish) and is raised. With ``keep_going`` (a sweep) every other job
    still trains and the failures are returned. Every finished model keeps its folder either way."""
    check_sizes((), 1, n_jobs)
    todo = [j for j in jobs if j.action != SKIP]
    failures: Failures = []
    if n_jobs == 1 or len(todo) <= 1:  # one model left: it gets all the cores
        for j in todo:
            try:
                train(j.cfg, data_dir, j.out, resume=j.action == RESUME, runtime=runtime, log=log)
            except Exception as e:  # KeyboardInterrupt is no Exception: Ctrl-C stops the whole plan
                if not keep_going:
                    raise
                failures.append((j, e))
                log(f"{j.out}: FAILED: {e}")
        return failures
    fetch_once(todo, data_dir)
    runtimes = worker_runtimes(runtime, len(todo), (os.cpu_count() or 1) // n_jobs)  # each its share of the cores
    log(f"training {len(todo)} models, {n_jobs} at a time, {runtimes[0].threads} thread(s) each")
    # A fresh process per model (spawned: no forked thread pools): clean threads and its own peak-memory figure.
    tasks = [(_worker, (train, j, data_dir, r)) for j, r in zip(todo, runtimes)]
    first: list[BaseException] = []

    def done(i: int, error: BaseException | None) -> bool:
        if error is not None and keep_going:
            failures.append((todo[i], error))
            log(f"{todo[i].out}: FAILED: {error}")
        elif error is not None:
            first.append(error)  # the models not yet started are not started, those training finish
        return not first

    workers.run(tasks, n_jobs, done)  # Ctrl-C or SIGTERM: queued models never start, running ones stop at once
    if first:
        raise first[0]
    return failures


def same_data(jobs: Sequence[Job], data_dir: str | os.PathLike | None) -> str | os.PathLike | None:
    """The data folder for a resumed plan's models: one report must not mix models trained on two data sets. Without
    ``data_dir`` the new models train on the data the plan's earlier models recorded (data.json), not on ./data or
    $NORMLAB_DATA, and a recorded folder this machine lacks (a sweep copied from another machine) is refused with the
    flag to pass; with ``data_dir``, at whatever path, its training split must be the one they trained on (the same
    fingerprint), else the plan is refused before anything trains. A plan with nothing to train, or no earlier model
    with a record, keeps ``data_dir`` as given."""
    if all(j.action == SKIP for j in jobs):
        return data_dir
    earlier = ((j, RunDir(j.out).read_data()) for j in jobs if j.action != NEW)
    job, recorded = next(((j, r) for j, r in earlier if r is not None), (None, None))
    if recorded is None:
        return data_dir
    if data_dir is None:
        if not (Path(recorded["data_dir"]) / D.FOLDER).is_dir():
            raise UsageError(f"{job.out} trained on the CIFAR-10 of {recorded['data_dir']}, which this machine does not have; "
                             f"pass --data-dir with the same training data (its fingerprint is checked, not its path)")
        return recorded["data_dir"] if any(j.action == NEW for j in jobs) else data_dir
    if any(j.action == NEW for j in jobs):  # a resumed model checks its own data as it loads it
        root = D.resolve_data_dir(data_dir)
        check_same_data(job.out, root, recorded, D.fingerprint(*D.load_split(root, train=True)))
    return data_dir


def note_afresh(jobs: Sequence[Job], log: Callable[[str], None]) -> None:
    """Say which models start again from nothing although their folder holds a run: unfinished, with no checkpoint (a
    sweep whose heavy files were deleted keeps only the records; a model stopped within its first epoch has none)."""
    for j in jobs:
        if j.action == NEW and RunDir(j.out).is_run():
            log(f"{j.out}: unfinished, with no {CHECKPOINT} to continue from: training it afresh")


def fetch_once(jobs: Sequence[Job], data_dir: Path | None) -> None:
    """Download CIFAR-10 here, once, if the models about to start in worker processes would each fetch it: else
    every worker downloads into the same partial file at once (and a refused download prints its error once per
    worker). A model resumed without ``data_dir`` reads the data it started on (data.json), so it needs nothing."""
    if data_dir is None and all(j.action == RESUME for j in jobs):
        return
    root = D.resolve_data_dir(data_dir)
    if not (root / D.FOLDER).is_dir():
        D.download(root)


def _worker(train: TrainFn, job: Job, data_dir: Path, runtime: Runtime) -> str:
    """One model in its own process: its log lines carry its folder's name."""
    set_threads(runtime.threads)
    train(job.cfg, data_dir, job.out, resume=job.action == RESUME, runtime=runtime, log=lambda m: print(f"[{job.out}] {m}", flush=True))
    return str(job.out)
