"""The sweep folder, as ``rundir.py`` is the run folder: beside one run folder per model, the sweep's own
files ``sweep.json`` (what was asked: norms, grid, seeds, base settings), ``sweep.csv`` (one row per
cell and seed), ``sweep.md`` and its figures, and ``SweepResult``, the sweep as a notebook sees it.

Everything but the manifest is computed from the run folders (``config.json`` and ``results.json``
of each model), so ``normlab report SWEEP_DIR`` rebuilds the table, the figures and the report at
any time, and a sweep cut short shows what it has. The planning itself (grid -> cells -> folders)
is ``plan.plan_sweep``; the figures are drawn in ``figures.py``.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from normlab import figures, lock, studies
from normlab.config import Config, flag_of, format_value, setting_fields
from normlab.device import Runtime
from normlab.errors import ReportError, UsageError
from normlab.norms import NORMS, reads
from normlab.plan import NOT_SWEPT, Cell, Grid, Part, cells_of, parse_grid
from normlab.report import COMMAND_LEAD, acc_cell, md_table, pct, secs_cell
from normlab.rundir import (CONFIG, FIGURES, Results, RunDir, atomic_write, atomic_write_text, cell_folder, check_writable, command, csv_cell,
                            unwritable)
from normlab.version import UNRECORDED, __version__

MANIFEST = "sweep.json"   # written before anything trains: the grid, norms, seeds and base settings
TABLE = "sweep.csv"       # one row per cell and seed, from the run folders
REPORT = "sweep.md"       # the table, the figures, the command that trains it again
FORMAT = "normlab-sweep"
SETTINGS = [f.name for f in setting_fields() if f.name not in NOT_SWEPT]
RESULT_COLUMNS = ["params", "train_acc_running", "train_acc_clean", "val_acc", "test_acc", "test_acc_flip_tta",
                  "seconds_per_epoch", "wall_seconds", "device", "precision", "threads"]
COLUMNS = ["folder", "norm", "seed", "status", *SETTINGS, *RESULT_COLUMNS]
FINISHED, UNFINISHED, NOT_STARTED = "finished", "unfinished", "not started"
WHOLE_BATCH = "norm_batch"  # its value 0 is the whole batch: named so in tables, drawn at the batch size
LOG_SPAN = 8  # a numeric setting whose positive values span at least this factor is drawn on a log axis


@dataclass(frozen=True)
class Manifest:
    """What a sweep was asked to train: the cells of ``parts`` (each norms x a grid; one part for ``normlab sweep``, a
    union of them for ``normlab study`` or merged sweeps) x ``seeds`` seeds from ``first_seed``, on ``base``."""

    base: Config
    parts: tuple[Part, ...]
    seeds: int
    first_seed: int

    @classmethod
    def sweep(cls, base: Config, norms: Sequence[str], grid: Grid, seeds: int, first_seed: int) -> "Manifest":
        """The manifest of one rectangle: norms x grid x seeds."""
        return cls(base, ((tuple(norms), dict(grid)),), seeds, first_seed)

    @property
    def norms(self) -> tuple[str, ...]:
        """Every norm of the sweep, in the order the parts name them."""
        return tuple(dict.fromkeys(n for norms, _ in self.parts for n in norms))

    @property
    def grid(self) -> Grid:
        """Every swept setting with every value some part gives it, in order of appearance."""
        out: dict[str, list[Any]] = {}
        for _, grid in self.parts:
            for k, values in grid.items():
                out.setdefault(k, []).extend(v for v in values if v not in out.get(k, []))
        return {k: tuple(v) for k, v in out.items()}

    @property
    def seed_list(self) -> list[int]:
        return list(range(self.first_seed, self.first_seed + self.seeds))

    def to_dict(self) -> dict[str, Any]:
        head: dict[str, Any] = {"format": FORMAT}
        if len(self.parts) == 1:  # one rectangle: the keys every version of the manifest has
            head |= _part_dict(self.parts[0])
        else:
            head["parts"] = [_part_dict(p) for p in self.parts]
        return {**head, "seeds": self.seeds, "first_seed": self.first_seed, "base": self.base.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Manifest":
        parts = d["parts"] if "parts" in d else [d]
        return cls(Config.from_dict(d["base"]), tuple((tuple(p["norms"]), parse_grid(p["grid"])) for p in parts),
                   int(d["seeds"]), int(d["first_seed"]))

    def cells(self) -> list[Cell]:
        return cells_of(self.parts)

    def models(self, parent: Path) -> list[tuple[str, dict[str, Any], int, Path]]:
        """(norm, cell, seed, folder) of every model, in the order ``plan_cells`` trains them (seed by seed)."""
        return [(norm, cell, seed, cell_folder(parent, norm, cell, seed)) for seed in self.seed_list for norm, cell in self.cells()]

    def union(self, other: "Manifest", where: str) -> "Manifest":
        """This sweep and ``other`` as one (merged folders, a sweep resumed with more cells or seeds): the parts of both,
        the seeds of both. Refused (``UsageError``) where their base settings differ, or their seeds leave a gap."""
        diff = [f"{k} {format_value(a)} (and {format_value(b)})" for k, a, b in self.base.differences(other.base) if k not in ("norm", "seed")]
        if diff:
            raise UsageError(f"{where} holds a sweep of other base settings: {'; '.join(diff)}; one sweep folder holds models "
                             f"of one set of settings: choose another --out")
        seeds = sorted(set(self.seed_list) | set(other.seed_list))
        if seeds != list(range(seeds[0], seeds[-1] + 1)):
            raise UsageError(f"{where}: seeds {', '.join(map(str, seeds))} leave a gap; train the missing seeds first, "
                             "so that one sweep folder holds consecutive seeds")
        parts = self.parts + tuple(p for p in other.parts if p not in self.parts)
        return Manifest(self.base, parts, len(seeds), seeds[0])

    def command(self, parent: Path, data_dir: str | os.PathLike | None = None, runtime: Runtime | None = None,
                resume: bool = False) -> str:
        """The normlab command line that trains this sweep again (``rundir.command``): the data it reads (``data_dir``,
        where known) and the settings that differ from the defaults. A study is ``normlab study``; a union of other
        rectangles is one ``normlab sweep ... --resume`` line per rectangle, into the same folder."""
        lines, parts = [], list(self.parts)
        if parts[:len(studies.parts())] == list(studies.parts()):
            lines.append(command("study", parent, self.base, None, None, self.seeds, self.first_seed, data_dir, runtime, resume,
                                 default_seeds=studies.SEEDS))
            parts = parts[len(studies.parts()):]
        for norms, grid in parts:
            lines.append(command("sweep", parent, self.base, norms, grid, self.seeds, self.first_seed, data_dir, runtime,
                                 resume or len(self.parts) > 1))
        return "\n".join(lines)


def _part_dict(part: Part) -> dict[str, Any]:
    norms, grid = part
    return {"norms": list(norms), "grid": {k: list(v) for k, v in grid.items()}}


def is_sweep(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


def write_manifest(parent: Path, manifest: Manifest, resume: bool) -> Manifest:
    """Record what the sweep trains, before it trains; returns the manifest written. A folder that holds another sweep
    is refused without ``resume``; with it, the folder's sweep grows by this one (the union: more cells or seeds, the
    same base settings). The same sweep's manifest is rewritten: one that stopped before its first model, e.g. on a
    wrong --ray address, just starts again."""
    path = Path(parent) / MANIFEST
    if path.exists():
        try:
            held = read_manifest(parent)
        except ReportError:
            held = None
        if held != manifest and not resume:
            raise UsageError(f"{parent} already holds another sweep ({MANIFEST}); use --resume to continue it (with this grid), "
                             "or choose another --out")
        if held is not None and resume:
            manifest = held.union(manifest, str(parent))
    check_writable(Path(parent))
    try:
        atomic_write_text(path, json.dumps(manifest.to_dict(), indent=2) + "\n")
    except OSError as e:
        raise unwritable(parent, e) from None
    return manifest


def read_manifest(parent: Path) -> Manifest:
    path = Path(parent) / MANIFEST
    try:
        d = json.loads(path.read_text())
        if d.get("format") != FORMAT:
            raise ValueError(f"format {d.get('format')!r}")
        return Manifest.from_dict(d)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ReportError(f"{path} is not a readable normlab sweep manifest ({type(e).__name__}: {e}); "
                          f"pass a folder written by normlab sweep") from None


# ---------------------------------------------------------------- rows: one per cell and seed, from the run folders
def collect(parent: Path, manifest: Manifest) -> list[dict[str, Any]]:
    """One row per model of the manifest: its folder, status, settings (its config.json where it has one) and results."""
    rows = []
    for norm, cell, seed, folder in manifest.models(parent):
        rd = RunDir(folder)
        cfg = Config(**{**manifest.base.to_dict(), "norm": norm, "seed": seed, **cell})
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


def metric(rows: list[dict[str, Any]]) -> str | None:
    """What the figure and the headline column show: test accuracy, else (tuning sweeps, --no-test) validation accuracy."""
    for key in ("test_acc", "val_acc"):
        if any(r[key] is not None for r in rows):
            return key
    return None


def _cell_label(cell: dict[str, Any]) -> str:
    return ", ".join(f"{k}={format_value(v)}" for k, v in cell.items())


def shown_value(key: str, value: Any) -> str:
    """A swept value as the tables show it: as typed, with 0 of ``norm_batch`` named the whole batch."""
    return f"{format_value(value)} (whole batch)" if key == WHOLE_BATCH and value == 0 else format_value(value)


def _groups(rows: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Rows by (norm, cell), in plan order (every seed of a cell together)."""
    out: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault((r["norm"], _cell_label(r["cell"])), []).append(r)
    return out


def _minutes(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m} min {s:02d} s" if m else f"{s} s"


def devices(rows: list[dict[str, Any]]) -> list[str]:
    """The devices and precisions the finished models ran on."""
    return sorted({f"{r['device']}, {r['precision']}" for r in rows if r["status"] == FINISHED})


def results_table(manifest: Manifest, rows: list[dict[str, Any]]) -> str:
    """The markdown table: one row per norm and cell, mean ± std over its finished seeds. Columns no model has
    (validation without a split, test with --no-test) are left out, and so is the device where all share one."""
    keys = list(manifest.grid)
    accs = [(k, name) for k, name in (("train_acc_clean", "train acc (clean)"), ("val_acc", "validation acc"), ("test_acc", "**test acc**"))
            if any(r[k] is not None for r in rows)]
    per_model = len(devices(rows)) > 1
    # with several seeds, the headline accuracy of each seed too, in seed order ("–" for one not finished)
    per_seed = [f"{accs[-1][1].strip('*')} per seed ({', '.join(map(str, manifest.seed_list))})"] if accs and manifest.seeds > 1 else []
    header = ["model", *keys, "seeds", *(name for _, name in accs), *per_seed, "s/epoch (median)", "wall time (per seed)",
              *(["device"] if per_model else [])]
    table = []
    for (norm, _), rs in _groups(rows).items():
        done = [r for r in rs if r["status"] == FINISHED]
        values = [shown_value(k, rs[0][k]) if reads(norm, k) else f"{format_value(rs[0][k])} (not read)" for k in keys]
        walls = [r["wall_seconds"] for r in done if r["wall_seconds"] is not None]
        cells = [acc_cell([r[k] for r in done]) for k, _ in accs]
        if accs and accs[-1][0] == "test_acc":
            cells[-1] = f"**{cells[-1]}**"
        if per_seed:
            by_seed = {r["seed"]: r[accs[-1][0]] for r in done}
            cells.append(", ".join(pct(by_seed.get(s)) for s in manifest.seed_list))
        table.append([f"{NORMS[norm].label} ({norm})", *values, f"{len(done)}/{len(rs)}", *cells,
                      secs_cell([r["seconds_per_epoch"] for r in done]), _minutes(statistics.mean(walls)) if walls else "–",
                      *([", ".join(devices(done)) or "–"] if per_model else [])])
    return md_table(header, table, "l" + "r" * (len(keys) + len(accs) + len(per_seed) + 3) + "l" * per_model)


def _settings(manifest: Manifest, norm: str, cell: dict[str, Any]) -> dict[str, Any]:
    """The values of the swept settings that ``norm`` reads in ``cell``: the cell's own, else the base's (as the norm
    trains it: none's own learning rate, say)."""
    cfg = dataclasses.replace(manifest.base, norm=norm, **cell)
    return {k: getattr(cfg, k) for k in manifest.grid if reads(norm, k)}


def paired_differences(manifest: Manifest, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each value of a swept setting against the first value of the same setting among the cells of the same norm and
    other swept settings, seed by seed (paired), in points of the shown accuracy; one entry per norm, setting, value and
    combination of the other swept settings, with the seeds both sides finished."""
    shown = metric(rows)
    done = {(r["norm"], _cell_label(r["cell"]), r["seed"]): 100 * r[shown]
            for r in rows if shown and r["status"] == FINISHED and r[shown] is not None}
    out = []
    for key in manifest.grid:
        for norm in manifest.norms:
            if not reads(norm, key):
                continue
            groups: dict[str, dict[Any, str]] = {}  # other settings -> {value of key: the cell's label}
            for n, cell in manifest.cells():
                if n == norm:
                    values = _settings(manifest, norm, cell)
                    other = _cell_label({k: v for k, v in values.items() if k != key})
                    groups.setdefault(other, {}).setdefault(values[key], _cell_label(cell))
            for other, arms in groups.items():
                (baseline, base), *rest = arms.items()
                for v, arm in rest:
                    seeds = [s for s in manifest.seed_list if (norm, base, s) in done and (norm, arm, s) in done]
                    diffs = [done[(norm, arm, s)] - done[(norm, base, s)] for s in seeds]
                    out.append({"norm": norm, "setting": key, "value": v, "baseline": baseline, "other": other,
                                "seeds": seeds, "diffs": diffs, "mean": statistics.mean(diffs) if diffs else None,
                                "spread": statistics.stdev(diffs) if len(diffs) > 1 else None})
    return out


def paired_table(manifest: Manifest, rows: list[dict[str, Any]]) -> str:
    """The markdown table of ``paired_differences``, with the decision rule: a change is kept only if its mean gain
    exceeds the spread (sample standard deviation) of the paired differences; a mean loss beyond it reads "worse"."""
    what = {"test_acc": "test", "val_acc": "validation"}.get(metric(rows) or "", "")
    table = []
    for d in paired_differences(manifest, rows):
        beyond = ("–" if d["spread"] is None else "better" if d["mean"] > d["spread"]
                  else "worse" if -d["mean"] > d["spread"] else "no")
        table.append([f"{NORMS[d['norm']].label} ({d['norm']})", f"{d['setting']} {shown_value(d['setting'], d['value'])} vs {shown_value(d['setting'], d['baseline'])}"
                      + (f", at {d['other']}" if d["other"] else ""), ", ".join(str(s) for s in d["seeds"]) or "–",
                      ", ".join(f"{x:+.2f}" for x in d["diffs"]) or "–", "–" if d["mean"] is None else f"{d['mean']:+.2f}",
                      "–" if d["spread"] is None else f"{d['spread']:.2f}", beyond])
    header = ["model", "change", "paired seeds", f"{what} acc difference per seed (points)", "mean", "spread (std)", "mean beyond the spread"]
    return md_table(header, table, "llllrrl")


# ---------------------------------------------------------------- figures
def log_x(values: Sequence[Any]) -> bool:
    """A log axis where the values are positive numbers spanning at least LOG_SPAN times (2, 4, ... 128; 1e-3 ... 1e-1)."""
    nums = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return len(nums) == len(values) > 1 and min(nums) > 0 and max(nums) / min(nums) >= LOG_SPAN


AXIS_WORDS = {"norm_batch": "images per normalization statistic"}  # the axis where a setting's own label is too long
ACCURACY_WORDS = {"test_acc": "test accuracy", "val_acc": "validation accuracy"}


def axis_words(key: str) -> str:
    """A swept setting as a figure names it: in words, never its field name."""
    return AXIS_WORDS.get(key) or next(f.metadata["label"] for f in setting_fields() if f.name == key)


def _variant_words(key: str, value: Any, base: Any) -> str:
    """A line's difference from the others of its norm, in words (empty: the norm as it trains by default)."""
    if key == "precise_bn":
        return "" if value == base else "without precise BN" if value == 0 else f"precise BN on {value:,} images"
    flag = next(flag_of(f) for f in setting_fields() if f.name == key)
    return f"{flag} {format_value(value)}"


def sweep_series(manifest: Manifest, rows: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """The figure of ``key`` as data (``figures.sweep_panels`` draws it): two panels, the shown accuracy (test, else
    validation) and clean train accuracy, each with one line per norm and variant (the other swept settings it reads,
    where they vary) as mean ± std over its finished seeds at each value of ``key``; a norm that does not read ``key``
    is a band (x ``[None]``) at its mean ± std. Value 0 of ``norm_batch`` (the whole batch) is drawn at the batch size."""
    shown = metric(rows)
    cfgs = {(n, _cell_label(c)): dataclasses.replace(manifest.base, norm=n, **c) for n, c in manifest.cells()}

    def x_of(norm: str, cell: dict[str, Any]) -> Any:
        cfg = cfgs[(norm, _cell_label(cell))]
        v = getattr(cfg, key)
        return cfg.batch_size if key == WHOLE_BATCH and v == 0 else v

    values = list(dict.fromkeys(x_of(n, c) for n, c in manifest.cells() if reads(n, key)))  # in the order swept
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    if numeric:
        values.sort()
    position = (lambda v: v) if numeric else (lambda v: values.index(v))
    whole = {cfg.batch_size for (n, _), cfg in cfgs.items() if key == WHOLE_BATCH and reads(n, key) and getattr(cfg, key) == 0}
    tick_labels = [f"{format_value(v)}\n(whole batch)" if v in whole else format_value(v) for v in values]

    panels = [(shown, ACCURACY_WORDS[shown]), ("train_acc_clean", "clean train accuracy")]
    out_panels = []
    for field, words in panels:
        lines = []
        for norm in manifest.norms:
            cells = [c for n, c in manifest.cells() if n == norm]
            settings = [_settings(manifest, norm, c) for c in cells]
            varying = [k for k in manifest.grid if k != key and reads(norm, k) and len({format_value(s[k]) for s in settings}) > 1]
            by_variant: dict[str, dict[Any, list[float]]] = {}
            for r in rows:
                if r["norm"] != norm or r["status"] != FINISHED or r.get(field) is None:
                    continue
                values_here = _settings(manifest, norm, r["cell"])
                variant = ", ".join(w for k in varying if (w := _variant_words(k, values_here[k], getattr(manifest.base, k))))
                x = x_of(norm, r["cell"]) if reads(norm, key) else None
                by_variant.setdefault(variant, {}).setdefault(x, []).append(100 * r[field])
            for i, (variant, points) in enumerate(by_variant.items()):
                xs = sorted(points, key=position) if None not in points else [None]
                name = f"{NORMS[norm].label} ({norm})" + (f", {variant}" if variant else "")
                lines.append({"label": name, "norm": norm, "colour": NORMS[norm].colour, "style": i, "band": xs == [None],
                              "x": [None if x is None else position(x) for x in xs],
                              "mean": [statistics.mean(points[x]) for x in xs],
                              "std": [statistics.stdev(points[x]) if len(points[x]) > 1 else 0.0 for x in xs],
                              "seeds": [len(points[x]) for x in xs]})
        lines.sort(key=lambda line: line["band"])  # the lines, then the bands: the legend reads in that order
        out_panels.append({"title": words[0].upper() + words[1:], "ylabel": f"{words} (%)", "lines": lines})
    what = ACCURACY_WORDS[shown]
    return {"title": f"{what[0].upper() + what[1:]} and clean train accuracy against {axis_words(key)}"
                     + _seeds_words(manifest.seeds, [c for line in out_panels[0]["lines"] for c in line["seeds"]]),
            "xlabel": axis_words(key), "log_x": numeric and log_x(values), "ticks": values if numeric else None,
            "tick_labels": tick_labels, "panels": out_panels,
            "note": f"bands: norms that {'read no batch statistics' if key == WHOLE_BATCH else 'do not read ' + axis_words(key)}, "
                    "mean ± std" if any(line["band"] for line in out_panels[0]["lines"]) else ""}


def _seeds_words(seeds: int, drawn: list[int]) -> str:
    """The title's note on the seeds behind each point: all of them, or as many as have finished so far."""
    if seeds == 1 or not drawn:
        return ""
    if min(drawn) == max(drawn) == seeds:
        return f" (mean ± std over {seeds} seeds)"
    counts = f"{min(drawn)}" if min(drawn) == max(drawn) else f"{min(drawn)} to {max(drawn)}"
    return f" (mean ± std over the seeds finished so far: {counts} of {seeds})"


def sweep_figure(manifest: Manifest, rows: list[dict[str, Any]], key: str):
    """Accuracy and clean train accuracy against the setting ``key`` (``sweep_series``), drawn."""
    return figures.sweep_panels(sweep_series(manifest, rows, key))


def figure_keys(manifest: Manifest) -> list[str]:
    """The swept settings drawn as figures: those given two or more values."""
    return [k for k, values in manifest.grid.items() if len(values) > 1]


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
        """Each swept value against the first, seed by seed: the markdown table (``paired_differences`` as data)."""
        return paired_table(self.manifest, self.rows)

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
    seeds = f"{manifest.seeds} seed{'s' if manifest.seeds > 1 else ''} ({', '.join(str(manifest.first_seed + i) for i in range(manifest.seeds))})"
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
    if manifest.seeds > 1 and any(len(vs) > 1 for vs in manifest.grid.values()):
        parts += ["## Paired differences",
                  "Each value of a swept setting against its first value, seed by seed (same seed and other settings): the "
                  "paired difference removes most of the seed-to-seed noise. A change is worth keeping only if its mean gain "
                  "exceeds the spread (sample standard deviation) of its paired differences; a mean loss beyond it reads \"worse\".",
                  paired_table(manifest, rows)]
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
