"""What normlab does, as functions: ``train`` one model, ``run`` the norms x seeds and report,
``evaluate`` a saved model. The command line and notebooks both call these; they raise the
errors of ``errors.py`` and never exit.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from normlab import data as D
from normlab.config import MAX_EPOCHS, Config
from normlab.device import Runtime, device_name, peak_rss_mib, set_threads, setup
from normlab.errors import ConfigError, TrainingError
from normlab.models import PARAM_BUDGET, count_params
from normlab.norms import DEFAULT_NORMS, NORMS
from normlab.plan import execute, plan_models
from normlab.rundir import RunDir, load_model
from normlab.train import Diverged, Trainer, evaluate as evaluate_model, infer

Log = Callable[[str], None]


def _log(message: str) -> None:
    print(message, flush=True)  # flushed: a log file of a long run must show each epoch as it ends


def train(cfg: Config, data_dir: str | os.PathLike | None, out: str | os.PathLike, resume: bool = False,
          runtime: Runtime = Runtime(), log: Log = _log) -> dict[str, Any]:
    """Train one model as ``cfg`` says into the run folder ``out``; returns results.json's content.

    With ``resume`` the folder's own settings are used and training continues from its last
    complete epoch. A run that fails before its first epoch is complete leaves nothing behind
    (except after Ctrl-C, when its saved settings let ``--resume`` start it again)."""
    cfg.validate()
    runtime.validate()
    started = time.perf_counter()
    rd = RunDir(out)
    if resume:
        if not rd.has_config:
            raise TrainingError(f"{rd} is not a normlab run that can be resumed (no config.json); start it with normlab train --out {rd}")
        cfg = rd.read_config()  # a resumed run keeps the settings it was started with
        if not rd.has_checkpoint:  # stopped within its first epoch: nothing to keep, start it again
            resume = False
            log(f"{rd} stopped before its first epoch ended; starting it again with its saved settings")
    elif rd.finished or rd.has_checkpoint:
        raise TrainingError(f"{rd} already holds a run; resume it with --resume, or choose another --out")
    had_config = rd.has_config
    created = rd.check_writable()
    try:
        return _train(cfg, D.resolve_data_dir(data_dir), rd, resume, runtime, log, started)
    except KeyboardInterrupt:
        raise  # resumable: config.json (and any checkpoint) stay, and the CLI prints the command that resumes
    except BaseException:
        if not rd.has_checkpoint:  # nothing worth keeping: remove what this call made
            if not had_config:
                (rd / "config.json").unlink(missing_ok=True)
            for folder in reversed(created):
                _remove_if_empty(folder)
        raise


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


def _train(cfg: Config, data_dir: Path, rd: RunDir, resume: bool, runtime: Runtime, log: Log, started: float) -> dict[str, Any]:
    place = setup(runtime, cfg.norm)
    images, labels = D.load_split(data_dir, train=True)
    # Read (not yet used) up front: a bad test file must fail before the training, not after it.
    test_split = D.load_split(data_dir, train=False) if cfg.eval_test else None
    train_idx, val_idx = D.stratified_split(labels, cfg.val_size, cfg.seed)
    trainer = Trainer(cfg, place, images[train_idx], labels[train_idx], images[val_idx], labels[val_idx], progress=runtime.progress)
    if resume:
        ck = rd.load_checkpoint()
        try:
            trainer.load_state_dict(ck)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise TrainingError(f"{rd / 'checkpoint.pt'} is not a checkpoint of this run ({type(e).__name__}); "
                                f"{rd} cannot be resumed, start afresh with another --out") from None
        log(f"resuming {rd} after epoch {trainer.epoch} of {cfg.epochs}")
    else:
        rd.write_config(cfg)

    n_params = count_params(trainer.model)
    limit = "" if cfg.epochs <= MAX_EPOCHS else f"  [{cfg.epochs} epochs: OUTSIDE the assignment's limit of {MAX_EPOCHS}]"
    log(f"{NORMS[cfg.norm].label} ({cfg.norm}): {n_params:,} parameters, {len(trainer.train_y):,} training / {len(trainer.val_y):,} "
        f"validation images, {place.device.type}, {place.precision}, {place.layout}, {torch.get_num_threads()} threads{limit}")
    if trainer.epoch == 0:
        log(f"{'epoch':>5} {'lr':>7} {'loss':>7} {'train':>7} {'val':>7} {'sec':>6}")
    while not trainer.done:
        try:
            row = trainer.run_epoch()
        except Diverged as e:
            kept = f"the last good epoch ({e.epoch - 1}) is kept in {rd}. " if e.epoch > 1 else "nothing was kept. "
            raise TrainingError(f"{e}; {kept}Start again with a lower --lr" + (" and another --out" if e.epoch > 1 else "")) from None
        rd.save_checkpoint(trainer.state_dict(), cfg)
        rd.write_metrics(trainer.metrics)
        v = f"{row['val_acc']:7.2%}" if row["val_acc"] is not None else f"{'-':>7}"
        log(f"{row['epoch']:>5} {row['lr']:7.4f} {row['train_loss']:7.4f} {row['train_acc']:7.2%} {v} {row['seconds']:6.1f}")

    # Final figures: the model as it stands after its last epoch.
    rows, final = trainer.metrics, trainer.final
    results: dict[str, Any] = {
        "norm": cfg.norm, "norm_name": NORMS[cfg.norm].label, "params": n_params, "param_budget": PARAM_BUDGET,
        "epochs": cfg.epochs, "over_epoch_limit": cfg.over_epoch_limit, "seed": cfg.seed,
        "train_acc_running": rows[-1]["train_acc"] if rows else None,
        "train_acc_clean": evaluate_model(final, trainer.train_x, trainer.train_y, place)[0],
        "val_acc": rows[-1]["val_acc"] if rows else None,
        "seconds_per_epoch": sum(r["seconds"] for r in rows) / max(1, len(rows)),
        "device": device_name(place.device), "precision": place.precision, "channels_last": place.channels_last,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "data_dir": str(Path(data_dir).resolve()),
    }
    if cfg.eval_test:
        test_x, test_y = (t.to(place.device) for t in test_split)
        logits = infer(final, test_x, place)
        results["test_acc"] = (logits.argmax(1) == test_y).float().mean().item()
        results["test_acc_flip_tta"] = evaluate_model(final, test_x, test_y, place, flip=True)[0]
        rd.write_predictions(test_y.cpu(), logits)
    rd.save_model(cfg, final)
    # This call's wall time (data loading, training, final evaluations; a resumed run counts from
    # its resumption) and the process's peak resident memory so far.
    results["wall_seconds"] = time.perf_counter() - started
    results["peak_rss_mib"] = peak_rss_mib()
    rd.write_results(results)
    test = f", test {results['test_acc']:.2%}" if "test_acc" in results else ""
    minutes, secs = divmod(round(results["wall_seconds"]), 60)
    log(f"done in {minutes} min {secs:02d} s: train {results['train_acc_clean']:.2%} (clean), "
        f"{results['train_acc_running']:.2%} (running, augmented){test}; files in {rd}")
    return results


def run(base: Config, data_dir: str | os.PathLike | None, out: str | os.PathLike, norms: Sequence[str] = DEFAULT_NORMS,
        seeds: int = 1, first_seed: int = 0, resume: bool = False, jobs: int = 1, runtime: Runtime = Runtime(),
        report: bool = True, resume_hint: str | None = None, log: Log = _log) -> Path | None:
    """Train every norm x seed into ``out`` (one folder each), then write ``out/report.md``; returns its path
    (None with ``report=False``). Every folder is checked before anything trains."""
    if jobs < 1:
        raise ConfigError(f"--jobs must be at least 1 (got {jobs})")
    parent = Path(out)
    hint = resume_hint or f"normlab run --resume --out {parent}"
    plan = plan_models(base, norms, seeds, first_seed, parent, resume, hint)
    for j in plan:
        if j.action == "skip":
            log(f"{j.out}: finished earlier, skipped")
    todo = any(j.action != "skip" for j in plan)
    execute(plan, train, D.resolve_data_dir(data_dir) if todo else None, runtime, jobs, log)
    if not report:
        return None
    from normlab.report import write_report

    return write_report(parent)


def evaluate(model_path: str | os.PathLike, data_dir: str | os.PathLike | None, runtime: Runtime = Runtime()) -> dict[str, Any]:
    """Test accuracy (plain and flip-averaged) and loss of a saved ``model.pt`` on a CIFAR-10 folder."""
    runtime.validate()
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
