"""From a grid of settings to model folders, and the executors that train them.

``plan_models`` turns norms x seeds (and later any grid) into ``Job``s: each model's config, its
folder and what to do with it (skip a finished one, resume an interrupted one, start a new one),
checking every folder before anything trains. ``execute`` trains the jobs in this process or in
local worker processes; it receives the function that trains one model (``api.train``), so this
module needs nothing above it.
"""
from __future__ import annotations

import dataclasses
import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from normlab.config import Config
from normlab.device import Runtime, set_threads
from normlab.errors import ConfigError, UsageError
from normlab.norms import NORMS
from normlab.rundir import RunDir, model_folder

SKIP, RESUME, NEW = "skip", "resume", "new"


@dataclass(frozen=True)
class Job:
    cfg: Config
    out: Path
    action: str  # skip (finished earlier) | resume (from its checkpoint) | new


def check_same_settings(out: Path, cfg: Config) -> None:
    """A finished model that a resumed plan skips must have been trained with the settings asked for now."""
    try:
        saved = Config.load(out / "config.json")
    except (OSError, ValueError, TypeError) as e:
        raise UsageError(f"{out / 'config.json'} cannot be read ({type(e).__name__}); move {out} away or choose another --out") from None
    diff = [f"{k} {v!r} (asked: {getattr(cfg, k)!r})" for k, v in saved.to_dict().items() if v != getattr(cfg, k)]
    if diff:
        raise UsageError(f"{out} was trained with other settings: {'; '.join(diff)}; choose another --out, or give the same settings")


def plan_models(base: Config, norms: Sequence[str], seeds: int, first_seed: int, parent: Path, resume: bool, resume_hint: str) -> list[Job]:
    """Every model of norms x seeds with its folder and action; raises before anything trains if a folder is in the way.

    Seed by seed, all norms each time: a run cut short still holds whole seeds to compare."""
    for n in norms:
        if n not in NORMS:
            raise ConfigError(f"unknown norm {n!r} in --norms; choose from: {', '.join(NORMS)}")
    if seeds < 1:
        raise ConfigError(f"--seeds must be at least 1 (got {seeds})")
    jobs = []
    for seed in range(first_seed, first_seed + seeds):
        for norm in norms:
            cfg = dataclasses.replace(base, norm=norm, seed=seed).validate()
            rd = RunDir(model_folder(Path(parent), norm, seed, seeds))
            if rd.finished:
                if not resume:
                    raise UsageError(f"{rd} already holds a finished run; use --resume to skip finished models, or choose another --out")
                check_same_settings(rd.path, cfg)
                jobs.append(Job(cfg, rd.path, SKIP))
            elif rd.has_checkpoint:
                if not resume:
                    raise UsageError(f"{rd} holds an unfinished run; continue it with: {resume_hint}")
                jobs.append(Job(cfg, rd.path, RESUME))
            else:
                jobs.append(Job(cfg, rd.path, NEW))
    return jobs


TrainFn = Callable[..., object]  # train(cfg, data_dir, out, resume=..., runtime=..., log=...)


def execute(jobs: Sequence[Job], train: TrainFn, data_dir: Path, runtime: Runtime, n_jobs: int = 1, log=print) -> None:
    """Train the jobs not skipped: one after another here, or ``n_jobs`` at a time in worker processes.

    With workers, a first failure cancels the models not yet started and lets those training
    finish; then it is raised. Every finished model keeps its folder either way."""
    if n_jobs < 1:
        raise ConfigError(f"--jobs must be at least 1 (got {n_jobs})")
    todo = [j for j in jobs if j.action != SKIP]
    if n_jobs == 1 or len(todo) <= 1:  # one model left: it gets all the cores
        for j in todo:
            train(j.cfg, data_dir, j.out, resume=j.action == RESUME, runtime=runtime, log=log)
        return
    per_job = runtime.threads or max(1, (os.cpu_count() or 1) // n_jobs)
    log(f"training {len(todo)} models, {n_jobs} at a time, {per_job} thread(s) each")
    worker_runtime = dataclasses.replace(runtime, threads=per_job, progress=False)  # several bars on one terminal garble
    # A fresh process per model (spawned: no forked thread pools): clean threads and its own peak-memory figure.
    with ProcessPoolExecutor(n_jobs, mp_context=multiprocessing.get_context("spawn"), max_tasks_per_child=1) as pool:
        futures = [pool.submit(_worker, train, j, data_dir, worker_runtime) for j in todo]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        failed = next((f.exception() for f in done if f.exception()), None)
        if failed:
            pool.shutdown(cancel_futures=True)  # drops the models not yet started, waits for the running ones
            raise failed


def _worker(train: TrainFn, job: Job, data_dir: Path, runtime: Runtime) -> str:
    """One model in its own process: its log lines carry its folder's name."""
    set_threads(runtime.threads)
    train(job.cfg, data_dir, job.out, resume=job.action == RESUME, runtime=runtime, log=lambda m: print(f"[{job.out}] {m}", flush=True))
    return str(job.out)
