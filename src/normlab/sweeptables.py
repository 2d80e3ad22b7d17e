"""A sweep's rows (one per cell and seed: ``sweepdir.collect``) summarized: the results table (mean ± std over the
seeds, each seed beside it), the paired differences, and the figures' series (``figures.sweep_panels`` draws them)."""
from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from normlab import figures
from normlab.config import flag_of, format_value, setting_fields
from normlab.manifest import Manifest
from normlab.norms import NORMS, reads
from normlab.report import acc_cell, md_table, pct, secs_cell

FINISHED, UNFINISHED, NOT_STARTED = "finished", "unfinished", "not started"  # a row's status
WHOLE_BATCH = "norm_batch"  # its value 0 is the whole batch: named so in tables, drawn at the batch size
LOG_SPAN = 8  # a numeric setting whose positive values span at least this factor is drawn on a log axis


def metric(rows: list[dict[str, Any]]) -> str | None:
    """What the figure and the headline column show: test accuracy, else (tuning sweeps, --no-test) validation accuracy."""
    for key in ("test_acc", "val_acc"):
        if any(r[key] is not None for r in rows):
            return key
    return None


def _cell_label(cell: dict[str, Any]) -> str:
    return ", ".join(f"{k}={format_value(v)}" for k, v in cell.items())


def is_whole_batch(key: str, value: Any) -> bool:
    """Whether a setting's value is 0 of ``norm_batch``: statistics over the whole batch."""
    return key == WHOLE_BATCH and value == 0


def shown_value(key: str, value: Any) -> str:
    """A swept value as the tables show it: as typed, with 0 of ``norm_batch`` named the whole batch."""
    return f"{format_value(value)} (whole batch)" if is_whole_batch(key, value) else format_value(value)


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
    cfg = manifest.config(norm, cell)
    return {k: getattr(cfg, k) for k in manifest.grid if reads(norm, k)}


def paired_differences(manifest: Manifest, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Seed by seed (paired), in points of the shown accuracy, with the seeds both sides finished: each norm against the
    first norm of the sweep (``setting`` "norm"; ``other``: the swept settings of the two cells compared), then each value
    of a swept setting against the first value of the same setting among the cells of the same norm and other swept
    settings (one entry per norm, setting, value and combination of the other swept settings)."""
    shown = metric(rows)
    done = {(r["norm"], _cell_label(r["cell"]), r["seed"]): 100 * r[shown]
            for r in rows if shown and r["status"] == FINISHED and r[shown] is not None}

    def pair(arm: tuple[str, str], base: tuple[str, str]) -> dict[str, Any]:
        seeds = [s for s in manifest.seed_list if (*arm, s) in done and (*base, s) in done]
        diffs = [done[(*arm, s)] - done[(*base, s)] for s in seeds]
        return {"seeds": seeds, "diffs": diffs, "mean": statistics.mean(diffs) if diffs else None,
                "spread": statistics.stdev(diffs) if len(diffs) > 1 else None}

    out = []
    first = manifest.norms[0]
    theirs = {_cell_label(_settings(manifest, first, c)): _cell_label(c) for n, c in manifest.cells() if n == first}
    for norm, cell in manifest.cells():
        # the first norm's cell with this cell's values of the settings both read, and its own base values of the rest
        mine = _settings(manifest, norm, cell)
        at = _settings(manifest, first, {k: v for k, v in mine.items() if reads(first, k)})
        if norm != first and _cell_label(at) in theirs:
            out.append({"norm": norm, "setting": "norm", "value": norm, "baseline": first, "other": _cell_label({**at, **mine}),
                        **pair((norm, _cell_label(cell)), (first, theirs[_cell_label(at)]))})
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
                    out.append({"norm": norm, "setting": key, "value": v, "baseline": baseline, "other": other,
                                **pair((norm, arm), (norm, base))})
    return out


def paired_table(pairs: list[dict[str, Any]], shown: str | None) -> str:
    """The markdown table of ``paired_differences`` (``pairs``, of the accuracy ``shown``: ``metric(rows)``), with the
    decision rule: a change is kept only if its mean gain exceeds the spread (sample standard deviation) of the paired
    differences; a mean loss beyond it reads "worse"."""
    what = {"test_acc": "test", "val_acc": "validation"}.get(shown or "", "")
    table = []
    for d in pairs:
        beyond = ("–" if d["spread"] is None else "better" if d["mean"] > d["spread"]
                  else "worse" if -d["mean"] > d["spread"] else "no")
        setting = "" if d["setting"] == "norm" else f"{d['setting']} "
        table.append([f"{NORMS[d['norm']].label} ({d['norm']})",
                      f"{setting}{shown_value(d['setting'], d['value'])} vs {shown_value(d['setting'], d['baseline'])}"
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
    cfgs = {(n, _cell_label(c)): manifest.config(n, c) for n, c in manifest.cells()}

    def x_of(norm: str, cell: dict[str, Any]) -> Any:
        cfg = cfgs[(norm, _cell_label(cell))]
        v = getattr(cfg, key)
        return cfg.batch_size if is_whole_batch(key, v) else v

    values = list(dict.fromkeys(x_of(n, c) for n, c in manifest.cells() if reads(n, key)))  # in the order swept
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    if numeric:
        values.sort()
    position = (lambda v: v) if numeric else (lambda v: values.index(v))
    whole = {cfg.batch_size for (n, _), cfg in cfgs.items() if reads(n, key) and is_whole_batch(key, getattr(cfg, key))}
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
