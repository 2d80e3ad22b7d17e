"""report.md from the files of a run folder: results, misclassified images, training curves,
per-class accuracy, model summaries, receptive fields and sample images.

It reads only what training wrote (config.json, metrics.csv, results.json, predictions.csv of each
model) plus the CIFAR-10 images, so a report can be rebuilt at any time without training again.
Layouts: one ``normlab train`` folder, or a ``normlab run`` parent with bn/ gn/ ln/ (one seed) or
bn/seed0/ bn/seed1/ ... (several seeds). The figures themselves are drawn in ``figures.py``.
"""
from __future__ import annotations

import os
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from normlab import data as D
from normlab import figures
from normlab.config import MAX_EPOCHS, Config, format_value, setting_fields
from normlab.errors import ReportError
from normlab.models import PARAM_BUDGET, Net, model_summary, receptive_field
from normlab.norms import NORMS, reads
from normlab.rundir import FIGURES, REPORT, Run, atomic_write_text, command, find_runs, shown_path
from normlab.version import UNRECORDED, __version__

TARGET_ACC = 0.70        # the prescribed floor for test accuracy
N_MISCLASSIFIED = 10     # images per misclassified grid (5 rows x 2 columns)
SAMPLES_PER_CLASS = 8    # training images per class in the sample grid
FIGURES_DIR = FIGURES  # PNGs go here, beside report.md, linked relatively
COMMAND_LEAD = "The command that made it (and trains it again):"  # above rundir.command's line in report.md and sweep.md


# ---------------------------------------------------------------- formatting
def pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}%"


def _secs(x: float) -> str:
    return f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def _mean_std(values: Sequence[float | None], unit: str, fmt: Callable[[float], str]) -> str:
    """One value as it is; several as 'mean ± std' (sample std over seeds)."""
    vals = [v for v in values if v is not None]
    if not vals:
        return "–"
    if len(vals) == 1:
        return fmt(vals[0]) + unit
    return f"{fmt(statistics.mean(vals))} ± {fmt(statistics.stdev(vals))}{unit}"


def acc_cell(values: Sequence[float | None]) -> str:
    """Accuracies as '85.23%' or '85.23 ± 0.31%' (mean ± sample std over seeds)."""
    return _mean_std([None if v is None else 100 * v for v in values], "%", lambda v: f"{v:.2f}")


def secs_cell(values: Sequence[float | None]) -> str:
    return _mean_std(values, "", _secs)


def _col(runs: list[Run], key: str) -> list[Any]:
    return [getattr(r.results, key) for r in runs]


def limit_flags(runs: list[Run]) -> list[str]:
    """What lies outside the prescribed limits: params, epochs, mean test accuracy (the prescribed floor)."""
    r = runs[0].results
    flags = []
    if r.params >= (r.param_budget or PARAM_BUDGET):
        flags.append(f"params ≥ {PARAM_BUDGET:,}")
    if r.epochs > MAX_EPOCHS:
        flags.append(f"epochs > {MAX_EPOCHS}")
    tests = [v for v in _col(runs, "test_acc") if v is not None]
    if tests and statistics.mean(tests) < TARGET_ACC:
        flags.append(f"test acc < {TARGET_ACC:.0%}")
    return flags


def summary_table(models: dict[str, list[Run]]) -> str:
    """Fixed-width text table, one row per model; mean ± std over seeds where there are several."""
    header = ["model", "seeds", "params", "epochs", "train acc (running, augmented)", "train acc (clean)", "test acc", "s/epoch (median)", "limits"]
    rows = [[norm, str(len(runs)), f"{runs[0].results.params:,}", str(runs[0].results.epochs),
             acc_cell(_col(runs, "train_acc_running")), acc_cell(_col(runs, "train_acc_clean")),
             acc_cell(_col(runs, "test_acc")), secs_cell(_col(runs, "seconds_per_epoch")),
             ", ".join(limit_flags(runs)) or ("ok" if runs[0].results.test_acc is not None else "ok, no test")]
            for norm, runs in models.items()]
    widths = [max(len(c) for c in col) for col in zip(header, *rows)]
    lines = ["  ".join(c.ljust(w) if i in (0, 8) else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
             for row in [header, *rows]]
    return "\n".join(lines)


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: str) -> str:
    """A GitHub markdown table; ``align`` holds one letter per column, l or r."""
    rule = ["---:" if a == "r" else ":---" for a in align]
    return "\n".join("| " + " | ".join(map(str, r)) + " |" for r in [header, rule, *rows])


# ---------------------------------------------------------------- misclassified images
def select_misclassified(labels: np.ndarray, preds: np.ndarray, probs: np.ndarray, k: int = N_MISCLASSIFIED) -> list[int]:
    """Indices of the ``k`` most confident mistakes: highest predicted-class probability, ties by lower index.

    ``probs`` is (N, 10) class probabilities or (N,) probabilities of the predicted class.
    """
    labels, preds, probs = np.asarray(labels), np.asarray(preds), np.asarray(probs, dtype=np.float64)
    conf = probs[np.arange(len(preds)), preds] if probs.ndim == 2 else probs
    wrong = np.flatnonzero(labels != preds)
    order = np.lexsort((wrong, -conf[wrong]))  # last key first: by confidence (descending), then index
    return wrong[order][:k].tolist()


# ---------------------------------------------------------------- figures (the report saves them; notebooks show them)
def misclassified_grid_args(norm: str, r: Run, test_images: np.ndarray, name_seed: bool = False) -> dict[str, Any]:
    """What ``figures.misclassified_grid`` draws for the model ``r``: its most confident mistakes, with the title
    (which names the seed with ``name_seed``)."""
    idx = select_misclassified(r.labels, r.preds, r.probs)
    seed = f", seed {r.seed}" if name_seed else ""
    title = f"{NORMS[norm].label} ({norm}{seed})\ntest accuracy {pct(r.results.test_acc)}: the {len(idx)} most confident mistakes"
    return {"images": test_images, "labels": r.labels, "preds": r.preds, "probs": r.probs, "indices": idx, "title": title}


def curves_figure(models: dict[str, list[Run]]):
    """Training curves of every model in one figure (mean over seeds); one model's: one line per seed."""
    if len(models) == 1:
        (norm, runs), = models.items()
        return figures.training_curves({f"seed {r.seed}": r.metrics for r in runs}, NORMS[norm].label)
    n_seeds = len(next(iter(models.values())))
    over = f" (mean over {n_seeds} seeds)" if n_seeds > 1 else ""
    return figures.training_curves({n: _mean_rows(rs) for n, rs in models.items()}, f"All models{over}",
                                   {n: NORMS[n].colour for n in models})


def confusion_figure(norm: str, run: Run, fig=None):
    title = f"{NORMS[norm].label}: confusion matrix (test accuracy {pct(run.results.test_acc)})"
    return figures.confusion_matrix(run.labels, run.preds, title, fig=fig)


def test_images_for(models: dict[str, list[Run]], data_dir: str | os.PathLike | None = None) -> np.ndarray | None:
    """The test images the runs' predictions.csv were made on (None if no run read the test set); ReportError if
    ``data_dir`` (else the folder the runs recorded, else the default) holds another test split."""
    if not any(rs[0].labels is not None for rs in models.values()):
        return None
    data_dir = _resolve_data_dir(models, data_dir)
    test_images, test_labels = _load_images(data_dir, train=False)
    for rs in models.values():
        if rs[0].labels is not None and not np.array_equal(rs[0].labels, test_labels):
            raise ReportError(f"the test split in {data_dir} ({len(test_labels):,} images) is not the one {rs[0].path / 'predictions.csv'} "
                              f"was made on ({len(rs[0].labels):,} images); pass the data folder the run used with --data-dir")
    return test_images


# ---------------------------------------------------------------- report sections
def _flags_cell(runs: list[Run]) -> str:
    flags = limit_flags(runs)
    if flags:
        return "⚠️ **no**: " + ", ".join(flags)
    return "yes" if runs[0].results.test_acc is not None else "params and epochs yes; test set not read"


def _command(models: dict[str, list[Run]], run_dir: Path, is_parent: bool, data_dir: Path) -> str:
    """The normlab command line that trains this folder again: the data it read and the flags that differ from
    the defaults."""
    runs = next(iter(models.values()))
    return command("run" if is_parent else "train", run_dir, runs[0].config, tuple(models), seeds=len(runs),
                   first_seed=runs[0].seed, data_dir=data_dir)


def _by_seed(runs: list[Run], value, name=lambda r: f"seed {r.seed}") -> str:
    """``value`` of the runs, once if they all share it, else each value with the seeds that have it (a report must
    show a mix, e.g. a model resumed with other settings or on another device, not just its first seed's)."""
    seeds: dict[str, list[str]] = {}
    for r in runs:
        seeds.setdefault(value(r), []).append(name(r))
    if len(seeds) == 1:
        return next(iter(seeds))
    return ", ".join(f"{v} ({', '.join(s)})" for v, s in seeds.items())


def _device(r: Run) -> str:
    return f"{r.results.device or '?'}, {r.results.precision or '?'}"


def trained_by(runs: list[Run]) -> str:
    """The normlab version(s) that trained ``runs``, from their results.json ("before 1.0.0" where it names none), once if
    they all share one, else each with its models."""
    return _by_seed(runs, lambda r: r.results.version or UNRECORDED, lambda r: f"{r.config.norm} seed {r.seed}")


def _header(models: dict[str, list[Run]], run_dir: Path, is_parent: bool, data_dir: Path) -> str:
    """The title, what was trained, the versions of normlab that trained it and wrote this report, and the command."""
    seeds = [r.seed for r in next(iter(models.values()))]
    names = ", ".join(f"{NORMS[n].label} ({n})" for n in models)
    seed_text = f"seed {seeds[0]}" if len(seeds) == 1 else f"{len(seeds)} seeds ({', '.join(map(str, seeds))})"
    return "\n\n".join([
        f"# normlab report: `{run_dir}`",
        f"{names} in one network (C1 C2 c3 P1 C3 C4 C5 c6 P2 C7 C8 C9 GAP C10) trained on CIFAR-10; {seed_text}.",
        f"Trained by normlab {trained_by([r for rs in models.values() for r in rs])}; "
        f"this report written by normlab {__version__}.",
        f"{COMMAND_LEAD}\n\n```sh\n{_command(models, run_dir, is_parent, data_dir)}\n```",
    ])


def _settings_section(models: dict[str, list[Run]]) -> str:
    """Every setting of the models (one value where they share it; the norms that do not read it named beside it), the
    device and torch."""
    runs = [r for rs in models.values() for r in rs]
    settings = [(f.metadata["label"], f.name) for f in setting_fields() if f.name not in ("norm", "seed")]
    rows = []
    for label, key in settings:
        values = {n: _by_seed(rs, lambda r: format_value(getattr(r.config, key))) for n, rs in models.items() if reads(n, key)}
        shown = set(values.values())
        value = shown.pop() if len(shown) == 1 else "; ".join(f"{n}: {v}" for n, v in values.items())
        if ignored := [n for n in models if not reads(n, key)]:
            value = f"{value} (not read by {', '.join(ignored)})" if values else "not read"
        rows.append([label, value])
    where = lambda r: f"{_device(r)}, {r.results.threads or '?'} threads"
    model = lambda r: f"{r.config.norm} seed {r.seed}"
    rows.append(["device, precision", _by_seed(runs, where, model)])
    rows.append(["torch", _by_seed(runs, lambda r: r.results.torch or '?', model)])
    return "\n\n".join(["## Settings", "From each model's `config.json` and `results.json`; where models differ, each value "
                         "with the models that have it.", md_table(["setting", "value"], rows, "ll")])


def results_table(models: dict[str, list[Run]]) -> str:
    """The markdown table of the results, one row per model (mean ± std over seeds where there are several)."""
    header = ["model", "norm layer", "params", "epochs", "train acc (running, augmented)", "train acc (clean)",
              "**test acc**", "test acc, flip TTA", "s/epoch (median)", "device", "within limits"]
    rows = [[f"{NORMS[n].label} ({n})", NORMS[n].describe(**rs[0].config.to_dict()), f"{rs[0].results.params:,}", rs[0].results.epochs,
             acc_cell(_col(rs, "train_acc_running")), acc_cell(_col(rs, "train_acc_clean")),
             f"**{acc_cell(_col(rs, 'test_acc'))}**", acc_cell(_col(rs, "test_acc_flip_tta")),
             secs_cell(_col(rs, "seconds_per_epoch")), _by_seed(rs, _device),
             _flags_cell(rs)] for n, rs in models.items()]
    return md_table(header, rows, "llrrrrrrrll")


def _results_section(models: dict[str, list[Run]]) -> str:
    parts = ["## Results", results_table(models)]
    n_seeds = len(next(iter(models.values())))
    has_val = any(r.results.val_acc is not None for rs in models.values() for r in rs)
    if n_seeds > 1 or has_val:
        seed_rows = [[n, r.seed, pct(r.results.train_acc_running), pct(r.results.train_acc_clean),
                      pct(r.results.val_acc), pct(r.results.test_acc), pct(r.results.test_acc_flip_tta),
                      _secs(r.results.seconds_per_epoch)] for n, rs in models.items() for r in rs]
        parts += ["Per seed:" if n_seeds > 1 else "With the validation split:",
                  md_table(["model", "seed", "train (running)", "train (clean)", "validation", "test", "test, flip TTA", "s/epoch (median)"],
                           seed_rows, "lrrrrrrr")]
    parts.append("What the columns mean, and the prescribed limits that ⚠️ marks: see [Notes](#notes) at the end.")
    return "\n\n".join(parts)


def _notes_section(models: dict[str, list[Run]], run_dir: Path, data_dir: Path) -> str:
    """What the results table's columns mean, the prescribed limits, and where every number comes from."""
    n_seeds = len(next(iter(models.values())))
    notes = [f"The prescribed limits: fewer than {PARAM_BUDGET:,} parameters (trainable or frozen, all counted), at most {MAX_EPOCHS} "
             f"epochs, and a test accuracy of at least {TARGET_ACC:.0%} (the prescribed floor); anything outside them is marked ⚠️."]
    if n_seeds > 1:
        notes.append(f"With several seeds: mean ± sample standard deviation over the {n_seeds} seeds; the per-seed values are in "
                     "the second table.")
    notes += ["*Running* train accuracy is measured on the augmented batches of the last epoch while the weights were still "
              "changing; *clean* train accuracy is the final model's on the un-augmented training images. "
              "*Flip TTA* averages the logits of each test image and its mirror image; it is reported beside the plain "
              "test accuracy, not in its place. Seconds per epoch are training time only, the median over the epochs (a slow stretch of a shared machine, or a slow first epoch, does not move it)."]
    compiled = {n: vs for n, rs in models.items() if (vs := [v for v in _col(rs, "compile_seconds") if v is not None])}
    if compiled:
        notes.append("The network was compiled (torch.compile): its first training step, compilation included, took "
                     + ", ".join(f"{secs_cell(vs)} s ({n})" for n, vs in compiled.items())
                     + "; that time is part of the first epoch's seconds.")
    notes.append("Every table and figure is computed from the files in this folder (`config.json`, `metrics.csv`, "
                 f"`results.json`, `predictions.csv` of each model) and the CIFAR-10 images in `{shown_path(data_dir)}`; "
                 f"rebuild it with `normlab report {run_dir}`.")
    return "\n\n".join(["## Notes", "\n".join(f"- {n}" for n in notes)])


def _misclassified_section(models, fig_dir: Path, test_images: np.ndarray | None) -> str:
    parts = ["## Misclassified test images",
             f"For each model: the {N_MISCLASSIFIED} test images it got wrong with the highest predicted-class probability "
             "(its most confident mistakes), ties broken by the lower test-set index, read from `predictions.csv`. "
             "Pixels are the raw test images, enlarged with nearest-neighbour interpolation."]
    if len(next(iter(models.values()))) > 1:
        parts[-1] += " With several seeds the first seed's model is shown."
    for norm, runs in models.items():
        if runs[0].labels is None or test_images is None:
            parts.append(f"{NORMS[norm].label}: the test set was not read (`--no-test`), so there are no predictions to show.")
            continue
        grid = misclassified_grid_args(norm, runs[0], test_images, name_seed=len(runs) > 1)
        path = figures.save(figures.misclassified_grid(**grid), fig_dir / f"misclassified_{norm}.png")
        n = len(grid["indices"])
        short = "" if n == N_MISCLASSIFIED else f" (only {n} test images were misclassified)"
        parts.append(f"### {NORMS[norm].label}{short}\n\n![{NORMS[norm].label}: misclassified test images]({FIGURES_DIR}/{path.name})")
    return "\n\n".join(parts)


def _mean_rows(runs: list[Run]) -> list[dict[str, Any]]:
    """Metrics averaged over seeds, epoch by epoch (epochs that every seed has)."""
    n = min(len(r.metrics) for r in runs)
    keys = ("train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc")
    return [{"epoch": runs[0].metrics[i]["epoch"],
             **{k: None if any(r.metrics[i].get(k) is None for r in runs) else statistics.mean(r.metrics[i][k] for r in runs) for k in keys}}
            for i in range(n)]


def _curves_section(models, fig_dir: Path) -> str:
    parts = ["## Training curves",
             "Loss and accuracy per epoch from `metrics.csv`: training (solid; running values on augmented batches, the loss "
             "with label smoothing), validation (dashed, where a validation split was held out) and test (dotted, where the "
             "run read the test set). The test curves are monitoring only: no epoch, seed or setting is chosen by them, and "
             "every model is the one after its last epoch."]
    if len(models) > 1:
        n_seeds = len(next(iter(models.values())))
        over = f" (mean over {n_seeds} seeds)" if n_seeds > 1 else ""
        path = figures.save(curves_figure(models), fig_dir / "curves_all.png")
        parts.append(f"All models together{over}:\n\n![training curves of all models]({FIGURES_DIR}/{path.name})")
    for norm, runs in models.items():
        path = figures.save(curves_figure({norm: runs}), fig_dir / f"curves_{norm}.png")
        parts.append(f"### {NORMS[norm].label}\n\n![training curves, {NORMS[norm].label}]({FIGURES_DIR}/{path.name})")
    return "\n\n".join(parts)


def _per_class_section(models, fig_dir: Path) -> str:
    tested = {n: rs for n, rs in models.items() if rs[0].labels is not None}
    parts = ["## Per-class test accuracy"]
    if not tested:
        return "\n\n".join(parts + ["The test set was not read (`--no-test`)."])
    n_seeds = len(next(iter(tested.values())))
    rows = []
    for c, name in enumerate(D.CLASSES):
        accs = {n: [float(np.mean(r.preds[r.labels == c] == c)) if np.any(r.labels == c) else None for r in rs] for n, rs in tested.items()}
        rows.append([name, *(acc_cell(a) for a in accs.values())])
    rows.append(["**all**", *(f"**{acc_cell(_col(rs, 'test_acc'))}**" for rs in tested.values())])
    parts += [md_table(["class", *(f"{NORMS[n].label} ({n})" for n in tested)], rows, "l" + "r" * len(tested)),
              "Confusion matrices (rows: true class, columns: predicted class; numbers are image counts, colour is the share "
              f"of the true class){', of the first seed' if n_seeds > 1 else ''}:"]
    if n_seeds > 1:
        parts[1] = f"Mean ± std over {n_seeds} seeds.\n\n" + parts[1]
    for norm, runs in tested.items():
        path = figures.save(confusion_figure(norm, runs[0]), fig_dir / f"confusion_{norm}.png")
        parts.append(f"![confusion matrix, {NORMS[norm].label}]({FIGURES_DIR}/{path.name})")
    return "\n\n".join(parts)


def _summary_section(models) -> str:
    parts = ["## Model summaries",
             "From `torchinfo` on the network each run's `config.json` describes, input (1, 3, 32, 32); layer names as in the "
             "specification (C = 3x3 conv, c = 1x1 conv, each followed by its norm and activation; P = max pool)."]
    for norm, runs in models.items():
        cfg = runs[0].config
        params = runs[0].results.params
        parts.append(f"<details>\n<summary>{NORMS[norm].label} ({norm}): {params:,} parameters</summary>\n\n"
                     f"```text\n{model_summary(cfg)}\n```\n\n</details>")
    return "\n\n".join(parts)


def receptive_field_table(cfg: Config) -> str:
    """The receptive field of the network ``cfg`` describes, layer by layer, as a markdown table."""
    rows = receptive_field(Net.from_config(cfg))
    table = [[r["layer"], r["type"], f"{r['kernel']}×{r['kernel']}", r["stride"], r["padding"], f"{r['jump_in']} → {r['jump']}",
              f"{r['rf_in']} → {r['rf']}" if not r["global"] else "whole image", f"{r['size']}×{r['size']}"] for r in rows]
    return md_table(["layer", "module", "kernel", "stride", "padding", "jump (in → out)", "receptive field (in → out)", "output"],
                    table, "llrrrrrr")


def _rf_section(models) -> str:
    cfg = next(iter(models.values()))[0].config
    rows = receptive_field(Net.from_config(cfg))
    last_conv = [r for r in rows if not r["global"]][-1]
    return "\n\n".join([
        "## Receptive field",
        "Computed from the model's own layers in the order C1 … C10: jump j_out = j_in · stride, receptive field "
        "r_out = r_in + (kernel − 1) · j_in, starting from r = j = 1 on the 32×32 input. The norm layers and the widths do not "
        "change it, so it is the same for all three models. The skip additions add a branch with a "
        "smaller field to the main one, so the main path sets it.",
        receptive_field_table(cfg),
        f"The last convolution, {last_conv['layer']}, sees {last_conv['rf']}×{last_conv['rf']} pixels of the (zero-padded) "
        f"input per output unit, on a {last_conv['size']}×{last_conv['size']} map. GAP then averages that whole "
        f"{last_conv['size']}×{last_conv['size']} map, so every output of GAP and C10 depends on the whole 32×32 image.",
    ])


# ---------------------------------------------------------------- the whole report
def _resolve_data_dir(models, data_dir) -> Path:
    """An explicit ``data_dir`` wins (the run folder may have moved); else the one the run recorded, else the default."""
    if data_dir is not None:
        return Path(data_dir)
    recorded = next(iter(models.values()))[0].results.data_dir
    if recorded and (Path(recorded) / D.FOLDER).is_dir():
        return Path(recorded)
    return D.resolve_data_dir(None)


def _load_images(data_dir: Path, train: bool) -> tuple[np.ndarray, np.ndarray]:
    try:
        images, labels = D.load_split(data_dir, train=train, allow_download=False)
    except D.DataError as e:
        raise ReportError(f"the report's figures need the CIFAR-10 images: {e}") from None
    return images.numpy(), labels.numpy()


def write_report(run_dir: Path, data_dir: str | os.PathLike | None = None) -> Path:
    """Write ``run_dir/report.md`` and its PNGs in ``run_dir/figures/``; returns the path of report.md.
    A ``normlab sweep`` folder has its own report (``sweepdir.write_sweep``; ``api.write_report`` picks)."""
    run_dir = Path(run_dir)
    models, is_parent = find_runs(run_dir)
    test_images = test_images_for(models, data_dir)
    data_dir = _resolve_data_dir(models, data_dir)
    fig_dir = run_dir / FIGURES_DIR
    try:
        fig_dir.mkdir(exist_ok=True)
    except OSError as e:
        raise ReportError(f"cannot write the report into {run_dir} ({e.strerror or e})") from None
    train_images, train_labels = _load_images(data_dir, train=True)
    samples = figures.save(figures.sample_grid(train_images, train_labels, SAMPLES_PER_CLASS), fig_dir / "samples.png")
    # Results first (the table, then the images it got wrong), then how training went, then what it was trained
    # with, then the rest.
    sections = [
        _header(models, run_dir, is_parent, data_dir.resolve()),
        _results_section(models),
        _misclassified_section(models, fig_dir, test_images),
        _curves_section(models, fig_dir),
        _settings_section(models),
        _per_class_section(models, fig_dir),
        _summary_section(models),
        _rf_section(models),
        f"## Sample training images\n\nThe first {SAMPLES_PER_CLASS} training images of each class in file order:"
        f"\n\n![CIFAR-10 training images]({FIGURES_DIR}/{samples.name})",
        _notes_section(models, run_dir, data_dir.resolve()),
    ]
    path = run_dir / REPORT
    atomic_write_text(path, "\n\n".join(sections) + "\n")
    return path
