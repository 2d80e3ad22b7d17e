"""The sweep folder, as ``rundir.py`` is the run folder: beside one run folder per model, the sweep's own
files ``sweep.json`` (what was asked: ``manifest.py``), ``sweep.csv`` (one row per
cell and seed), ``sweep.md`` and its figures, and ``SweepResult``, the sweep as a notebook sees it.

Everything but the manifest is computed from the run folders (``config.json`` and ``results.json``
of each model), so ``normlab report SWEEP_DIR`` rebuilds the table, the figures and the report at
any time, and a sweep cut short shows what it has. The planning itself (grid -> cells -> folders)
is ``plan.plan_sweep``; the tables and the figures' series are ``sweeptables.py``, drawn in ``figures.py``.
"""
from __future__ import annotations

import csv
import os
import shutil
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from normlab import figures, lock
from normlab.config import Config, format_value, setting_fields
from normlab.errors import ReportError, UsageError
from normlab.manifest import Manifest, is_sweep, read_manifest, write_manifest
from normlab.norms import NORMS, reads
from normlab.plan import NOT_SWEPT, Grid
from normlab.report import COMMAND_LEAD
from normlab.rundir import CONFIG, FIGURES, Results, RunDir, atomic_write, atomic_write_text, csv_cell, unwritable
from normlab.sweeptables import (ACCURACY_WORDS, FINISHED, NOT_STARTED, UNFINISHED, axis_words, devices, figure_keys, metric,
                                 paired_differences, paired_table, results_table, sweep_figure)
from normlab.version import UNRECORDED, __version__

TABLE = "sweep.csv"       # one row per cell and seed, from the run folders
REPORT = "sweep.md"       # the table, the figures, the command that trains it again
SETTINGS = [f.name for f in setting_fields() if f.name not in NOT_SWEPT]
RESULT_COLUMNS = ["params", "train_acc_running", "train_acc_clean", "val_acc", "test_acc", "test_acc_flip_tta",
                  "seconds_per_epoch", "wall_seconds", "device", "precision", "threads"]
COLUMNS = ["folder", "norm", "seed", "status", *SETTINGS, *RESULT_COLUMNS]


# ---------------------------------------------------------------- rows: one per cell and seed, from the run folders
def collect(parent: Path, manifest: Manifest) -> list[dict[str, Any]]:
    """One row per model of the manifest: its folder, status, settings (its config.json where it has one) and results."""
    rows = []
    for norm, cell, seed, folder in manifest.models(parent):
        rd = RunDir(folder)
        cfg = manifest.config(norm, cell, seed)
        status = FINISHED if rd.has_results else UNFINISHED if rd.is_run() else NOT_STARTED  # a record is enough
        results: Results | None = None
        if status == FINISHED:
            results = rd.read_results()
            try:
                cfg = Config.load(folder / CONFIG)
            except (OSError, ValueError, TypeError) as e:
                raise ReportError(f"{folder / CONFIG} is unreadable ({type(e).__name__}); copy the run folder again") from None
        row = {"folder": folder.relative_to(parent).as_posix(), "norm": norm, "seed": seed, "status": status,
               **{k: getattr(cfg, k) for k in SETTINGS}, **{k: getattr(results, k, None) for k in RESULT_COLUMNS}}
        row["cell"] = cell  # the swept settings this norm reads (not a column of sweep.csv)
        row["data_dir"] = getattr(results, "data_dir", None)  # the data the model read (not a column either)
        row["version"] = getattr(results, "version", None)    # the normlab version that trained it (not a column either)
        rows.append(row)
    return rows


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(COLUMNS)
            for r in rows:
                w.writerow([csv_cell(r[k]) for k in COLUMNS])
    atomic_write(path, write)


# ---------------------------------------------------------------- the whole sweep
class SweepResult:
    """A sweep as its folder holds it: ``manifest``, ``rows`` (one per cell and seed, as in sweep.csv), ``report``."""

    def __init__(self, path: Path, manifest: Manifest, rows: list[dict[str, Any]], report: Path | None):
        self.path, self.manifest, self.rows, self.report = Path(path), manifest, rows, report

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SweepResult":
        manifest = read_manifest(Path(path))
        report = Path(path) / REPORT
        return cls(Path(path), manifest, collect(Path(path), manifest), report if report.is_file() else None)

    @property
    def csv(self) -> Path:
        """The sweep's table, sweep.csv."""
        return self.path / TABLE

    @property
    def unfinished(self) -> list[str]:
        """Folders (relative to ``path``) of the models not finished."""
        return [r["folder"] for r in self.rows if r["status"] != FINISHED]

    def table(self) -> str:
        return results_table(self.manifest, self.rows)

    def paired(self) -> str:
        """Each norm against the first, and each swept value against the first, seed by seed: the markdown table
        (``sweeptables.paired_differences`` as data)."""
        return paired_table(paired_differences(self.manifest, self.rows), metric(self.rows))

    def plot(self, setting: str | None = None):
        """Accuracy against ``setting`` (default: the first swept one)."""
        if not self.manifest.grid:
            raise ReportError(f"{self.path} sweeps no setting (only norms and seeds): there is nothing to draw against")
        key = setting or next(iter(self.manifest.grid))
        if key not in self.manifest.grid:
            raise ReportError(f"{key!r} is not swept in {self.path}; swept: {', '.join(self.manifest.grid)}")
        if metric(self.rows) is None:
            raise ReportError(f"{self.path} has no finished model with a test or validation accuracy to draw")
        return sweep_figure(self.manifest, self.rows, key)

    def __repr__(self) -> str:
        done = sum(r["status"] == FINISHED for r in self.rows)
        return f"SweepResult(path={str(self.path)!r}, models={done}/{len(self.rows)} finished, grid={self.manifest.grid!r})"

    def _repr_markdown_(self) -> str:
        return f"{self.table()}\n\nSweep folder: `{self.path}`"


def write_sweep(parent: Path, report: bool = True) -> SweepResult:
    """``sweep.csv`` and (with ``report``) ``sweep.md`` and its figures, from the folder's manifest and run folders."""
    parent = Path(parent)
    manifest = read_manifest(parent)
    rows = collect(parent, manifest)
    try:
        write_csv(parent / TABLE, rows)
        path = _write_report(parent, manifest, rows) if report else None
    except OSError as e:
        raise ReportError(f"cannot write the sweep's files into {parent} ({e.strerror or e})") from None
    return SweepResult(parent, manifest, rows, path)


def _data_dir(finished: list[dict[str, Any]]) -> str | None:
    """The data folder the sweep's finished models read (the first one's, as recorded in its results.json), if any."""
    return next((r["data_dir"] for r in finished if r.get("data_dir")), None)


def _trained_by(finished: list[dict[str, Any]]) -> str:
    """The normlab version(s) that trained the finished models ("before 1.0.0" where results.json names none), each
    with its number of models where they differ."""
    counts = Counter(r["version"] or UNRECORDED for r in finished)
    if len(counts) == 1:
        return next(iter(counts))
    return ", ".join(f"{v} ({n} model{'s' * (n > 1)})" for v, n in counts.items())


def _write_report(parent: Path, manifest: Manifest, rows: list[dict[str, Any]]) -> Path:
    finished = [r for r in rows if r["status"] == FINISHED]
    shown = metric(finished)
    def rectangle(norms: Sequence[str], grid: Grid) -> str:
        values = "; ".join(f"{k} = {', '.join(format_value(v) for v in vs)}" for k, vs in grid.items()) or "no setting (norms and seeds only)"
        return f"{', '.join(f'{NORMS[n].label} ({n})' for n in norms)} x {values}"
    seeds = f"{manifest.seeds} seed{'s' if manifest.seeds > 1 else ''} ({', '.join(map(str, manifest.seed_list))})"
    ignored = [f"{NORMS[n].label} ({n}) does not read {', '.join(ks)}: trained once at {', '.join(f'{k}={format_value(getattr(manifest.base, k))}' for k in ks)}"
               for n in manifest.norms if (ks := [k for k in manifest.grid if not reads(n, k)])]
    parts = [f"# normlab sweep: `{parent}`",
             f"{'; '.join(f'({rectangle(*p)})' if len(manifest.parts) > 1 else rectangle(*p) for p in manifest.parts)} x {seeds}: "
             f"{len(rows)} models, {len(finished)} finished.",
             (f"Trained by normlab {_trained_by(finished)}; this page" if finished else "This page") + f" written by normlab {__version__}.",
             f"{COMMAND_LEAD}\n\n```sh\n{manifest.command(parent, _data_dir(finished))}\n```",
             "Every other setting is the same in every model: `config.json` of each run folder has them all; `sweep.csv` has one "
             f"row per model (every setting, accuracies, seconds per epoch, wall time, device). Rebuild this page with "
             f"`normlab report {parent}`.",
             "## Results", results_table(manifest, rows)]
    notes = []
    if ignored:
        notes += [f"{line}." for line in ignored]
    if manifest.seeds > 1:
        notes.append(f"Mean ± sample standard deviation over the finished seeds of each cell (of {manifest.seeds}).")
    notes.append("Each model is the one after its last epoch: no epoch, seed or setting is chosen by the test set here; "
                 "choose settings on a validation split (`--val-size 5000 --no-test`), which this table then shows.")
    notes.append("Wall time: data loading, training and the final evaluations of one model (of a resumed model: since it resumed).")
    if len(devices(rows)) == 1:
        notes.append(f"Every model ran on {devices(rows)[0]}.")
    parts.append("\n".join(f"- {n}" for n in notes))
    pairs = paired_differences(manifest, rows) if manifest.seeds > 1 else []
    if pairs:
        parts += ["## Paired differences",
                  f"Each norm against {manifest.norms[0]} at the same settings, and each value of a swept setting against its "
                  "first value, seed by seed (same seed and other settings): the paired difference removes most of the seed-to-seed noise. A change is worth keeping only if its mean gain "
                  "exceeds the spread (sample standard deviation) of its paired differences; a mean loss beyond it reads \"worse\".",
                  paired_table(pairs, shown)]
    unfinished = [r["folder"] for r in rows if r["status"] != FINISHED]
    if unfinished:
        busy = {f: pid for f in unfinished if (pid := lock.holder(parent / f)) is not None}  # a sweep still running
        parts.append(f"**Not finished ({len(unfinished)}):** {', '.join(f'`{f}`' + (f' (being trained by {lock.who(busy[f])})' if f in busy else '') for f in unfinished)}. "
                     f"Train them with the command above and `--resume`.")
    fig_dir = parent / FIGURES
    if shown and figure_keys(manifest):
        fig_dir.mkdir(exist_ok=True)
        what = ACCURACY_WORDS[shown]
        parts.append("## Figures")
        for key in figure_keys(manifest):
            path = figures.save(sweep_figure(manifest, finished, key), fig_dir / f"sweep_{key}.png")
            caption = f"{what[0].upper() + what[1:]} and clean train accuracy against {axis_words(key)}"
            parts.append(f"{caption}:\n\n![{caption.lower()}]({FIGURES}/{path.name})")
    path = parent / REPORT
    atomic_write_text(path, "\n\n".join(parts) + "\n")
    return path


# ---------------------------------------------------------------- several folders as one
def merge(sources: Sequence[str | os.PathLike], out: str | os.PathLike, log=print) -> SweepResult:
    """Sweep folders of the same base settings and data (trained on several machines, or over sittings) as one in
    ``out`` (which may hold one of them already): the manifest of their union, each model folder copied where ``out``
    has no finished model of that cell and seed, then ``sweep.csv``, ``sweep.md`` and the figures. Refused before
    anything is copied where the base settings or the training data differ, or the seeds leave a gap."""
    out = Path(out)
    folders = list(dict.fromkeys(Path(s).resolve() for s in ([out] if is_sweep(out) else []) + [Path(s) for s in sources]))
    manifests = [(f, read_manifest(f)) for f in folders]
    union = manifests[0][1]
    for f, m in manifests[1:]:
        union = union.union(m, str(f))
    _check_one_data(manifests)
    write_manifest(out, union, resume=True)
    copied = kept = 0
    for f, m in manifests:
        for *_, folder in m.models(f):
            dest = out / folder.relative_to(f)
            if not RunDir(folder).is_run() or dest.resolve() == folder:
                continue
            if RunDir(dest).has_results or (dest.exists() and not RunDir(folder).has_results):
                kept += RunDir(folder).has_results
                continue
            try:
                if dest.exists():
                    shutil.rmtree(dest)  # unfinished: the finished copy replaces it
                shutil.copytree(folder, dest)
            except OSError as e:
                raise unwritable(out, e) from None
            copied += 1
    log(f"merged {len(folders)} sweep folders into {out}: {copied} model folders copied, "
        f"{kept} finished models already there kept")
    return write_sweep(out)


def _check_one_data(manifests: list[tuple[Path, Manifest]]) -> None:
    """One sweep, one training set: the data fingerprint each folder's models recorded (data.json) must agree."""
    seen: tuple[Path, dict[str, Any]] | None = None
    for f, m in manifests:
        record = next((r for *_, folder in m.models(f) if (r := RunDir(folder).read_data()) is not None), None)
        if record is None:
            continue
        if seen is not None and seen[1]["train"] != record["train"]:
            raise UsageError(f"{f} was trained on other data than {seen[0]} (training labels hash {record['train']['labels_sha256'][:12]} "
                             f"against {seen[1]['train']['labels_sha256'][:12]}); merge only sweeps of the same data")
        seen = seen or (f, record)
