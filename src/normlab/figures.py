"""The figures, one function per kind: each takes plain arrays and returns a matplotlib ``Figure``.

A notebook shows the returned figure inline; ``report.py`` decides what goes in and saves it with
``save``. Figures are made with ``matplotlib.figure.Figure``, not pyplot: no backend is chosen (a
notebook keeps its inline one, a server needs no display), nothing is left open in pyplot's list,
and a figure returned by a notebook cell is shown once. Images are shown as their raw uint8 pixels
(never normalized), upscaled with nearest-neighbour so that every one of the 32x32 pixels stays visible.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure, SubFigure

from normlab.data import CLASSES
from normlab.rundir import atomic_write

DPI = 110
GRID_ROWS, GRID_COLS = 5, 2  # the misclassified grid: 5 rows x 2 columns = 10 images
GRID_SIZE = (6, 14.5)        # inches of one misclassified grid
CONFUSION_SIZE = (7.5, 6.5)  # inches of one confusion matrix
MONITORING_NOTE = "test: monitoring only: no epoch, seed or setting is chosen by it (the model is the last epoch's)"


def save(fig: Figure, path: Path) -> Path:
    """Write ``fig`` as a PNG at ``path`` (whole or not at all); returns the path."""
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight"))
    return path


def _hwc(image: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(image.transpose(1, 2, 0))  # (3, 32, 32) -> (32, 32, 3), uint8 as stored


def misclassified_grid(images: np.ndarray, labels: np.ndarray, preds: np.ndarray, probs: np.ndarray,
                       indices: Sequence[int], title: str, fig: Figure | SubFigure | None = None) -> Figure | SubFigure:
    """Up to 10 test images in a 5x2 grid, each with its true class, predicted class and probability.

    Drawn into ``fig`` (e.g. one of several subfigures side by side), else into a new figure."""
    fig = fig if fig is not None else Figure(figsize=GRID_SIZE, layout="constrained")
    axes = fig.subplots(GRID_ROWS, GRID_COLS)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    for ax, i in zip(axes.flat, indices):
        ax.imshow(_hwc(images[i]), interpolation="nearest")
        ax.set_title(f"true: {CLASSES[labels[i]]}\npredicted: {CLASSES[preds[i]]} ({probs[i, preds[i]]:.1%})", fontsize=11)
        ax.set_xlabel(f"test image #{i}", fontsize=9)
    for k, ax in enumerate(axes.flat[len(indices):]):
        ax.axis("off")
        if k == 0:
            ax.text(0.5, 0.5, "no further\nmistakes", ha="center", va="center", fontsize=11, color="grey", transform=ax.transAxes)
    fig.suptitle(title, fontsize=13)
    return fig


def side_by_side(draws: Sequence[Callable[[SubFigure], object]], size: tuple[float, float]) -> Figure:
    """One figure of several side by side: each of ``draws`` draws into its own subfigure of ``size`` inches."""
    fig = Figure(figsize=(size[0] * len(draws), size[1]), layout="constrained")
    for sub, draw in zip(np.atleast_1d(fig.subfigures(1, len(draws))), draws):
        draw(sub)
    return fig


def training_curves(series: dict[str, list[dict]], title: str, colours: dict[str, str] | None = None) -> Figure:
    """Loss and accuracy per epoch: one line per entry of ``series`` (train solid, validation dashed,
    test dotted; test is monitoring only, and the figure says so).

    ``series`` maps a legend label to metrics rows (dicts with epoch, train_loss, train_acc,
    val_loss, val_acc, test_loss, test_acc; val_* and test_* None (or absent) where not measured).
    """
    fig = Figure(figsize=(11, 4.6), layout="constrained")
    ax_loss, ax_acc = fig.subplots(1, 2)
    has_test = False
    for k, (label, rows) in enumerate(series.items()):
        colour = (colours or {}).get(label, f"C{k}")
        epochs = [r["epoch"] for r in rows]
        for ax, key in ((ax_loss, "loss"), (ax_acc, "acc")):
            scale = 100 if key == "acc" else 1
            ax.plot(epochs, [r[f"train_{key}"] * scale for r in rows], "-o", ms=3, color=colour, label=f"{label} train")
            for split, style, name in (("val", "--s", "validation"), ("test", ":^", "test (monitoring only)")):
                points = [(e, r[f"{split}_{key}"] * scale) for e, r in zip(epochs, rows) if r.get(f"{split}_{key}") is not None]
                if points:
                    ax.plot(*zip(*points), style, ms=3, color=colour, label=f"{label} {name}")
                    has_test |= split == "test"
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy (train: with label smoothing)", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy (train: running, augmented)")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=12)
    if has_test:
        fig.supxlabel(MONITORING_NOTE, fontsize=9, color="0.35")
    return fig


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, title: str, fig: Figure | SubFigure | None = None) -> Figure | SubFigure:
    """10x10 counts (rows: true class, columns: predicted), coloured by the share of each true class
    (drawn into ``fig`` if given)."""
    n = len(CLASSES)
    counts = np.bincount(labels * n + preds, minlength=n * n).reshape(n, n)
    share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    fig = fig if fig is not None else Figure(figsize=CONFUSION_SIZE, layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for t in range(n):
        for p in range(n):
            ax.text(p, t, str(counts[t, p]), ha="center", va="center", fontsize=8,
                    color="white" if share[t, p] > 0.5 else "black")
    ax.set_xticks(range(n), CLASSES, rotation=45, ha="right")
    ax.set_yticks(range(n), CLASSES)
    ax.set(xlabel="predicted class", ylabel="true class", title=title)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    return fig


def sample_grid(images: np.ndarray, labels: np.ndarray, per_class: int) -> Figure:
    """The first ``per_class`` training images of every class in file order, one row per class.

    Drawn as one mosaic (tiles with white gaps) in one axes: 80 separate axes take seconds to draw.
    """
    n, gap, side = len(CLASSES), 4, images.shape[-1]
    step = side + gap
    mosaic = np.full((n * step - gap, per_class * step - gap, 3), 255, np.uint8)  # (H, W, 3)
    for c in range(n):
        for k, i in enumerate(np.flatnonzero(labels == c)[:per_class]):
            mosaic[c * step : c * step + side, k * step : k * step + side] = _hwc(images[i])
    fig = Figure(figsize=(1.1 * per_class + 1.2, 1.1 * n), layout="constrained")
    ax = fig.subplots()
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_yticks([c * step + side / 2 for c in range(n)], CLASSES, fontsize=10)
    ax.set_xticks([])
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_title(f"CIFAR-10 training images: the first {per_class} of each class", fontsize=12)
    return fig


def image_grid(images: Sequence[np.ndarray], titles: Sequence[str], cols: int = 5) -> Figure:
    """(3, H, W) uint8 images in rows of ``cols``, each with its title (e.g. your own images and their predictions)."""
    rows = max(1, -(-len(images) // cols))
    fig = Figure(figsize=(2.2 * cols, 2.6 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols))
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, title in zip(axes.flat, images, titles):
        ax.imshow(_hwc(image), interpolation="nearest")
        ax.set_title(title, fontsize=9)
    return fig


SWEEP_MARKERS = ("o", "s", "^", "D")          # one per line of a norm (per variant: other swept settings)
BAND_STYLES = ("--", ":", "-.", (0, (5, 1)))  # one per band of a norm


def sweep_panels(spec: dict) -> Figure:
    """A metric per panel against one swept setting (``sweeptables.sweep_series`` makes ``spec``): in each panel every
    line is mean ± std over seeds as error bars; a band (x ``[None]``: a norm that does not read the setting) is a
    horizontal line at its mean over a ± std band across the whole axis. ``ticks``: the swept values (numbers);
    without them x holds positions 0, 1, ... of ``tick_labels`` (words, true/false, widths). One legend below."""
    panels = spec["panels"]
    fig = Figure(figsize=(6.4 * len(panels), 5.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    legend: list = []  # the first panel's artists in the order of its lines (matplotlib's own order puts bands first)
    for ax, panel in zip(axes, panels):
        drawn = [line for line in panel["lines"] if not line["band"]]
        handles = []
        for line in panel["lines"]:
            mean, std = np.asarray(line["mean"]), np.asarray(line["std"])
            if line["band"]:
                handles.append(ax.axhline(mean[0], color=line["colour"], ls=BAND_STYLES[line["style"] % len(BAND_STYLES)], lw=1.6,
                                          label=line["label"]))
                if std[0] > 0:
                    ax.axhspan(mean[0] - std[0], mean[0] + std[0], color=line["colour"], alpha=0.12, lw=0)
                continue
            # Lines side by side, a little apart, so that error bars at the same value do not hide each other.
            shift = 0.04 * (drawn.index(line) - (len(drawn) - 1) / 2)
            x = np.asarray(line["x"], float)
            if spec["log_x"]:
                x = x * 2 ** shift
            else:  # positions 0, 1, ... or numbers: apart by a share of the axis
                x = x + shift * (1 if spec["ticks"] is None else (max(spec["ticks"]) - min(spec["ticks"])) / 4 or 1)
            handles.append(ax.errorbar(x, mean, yerr=std, fmt="-" if line["style"] == 0 else "--", ms=5, capsize=3, lw=1.6,
                                       marker=SWEEP_MARKERS[line["style"] % 4], color=line["colour"], label=line["label"]))
        if spec["log_x"]:
            ax.set_xscale("log", base=2 if all(float(t).is_integer() for t in spec["ticks"] or ()) else 10)
            ax.minorticks_off()
        positions = list(spec["ticks"]) if spec["ticks"] is not None else list(range(len(spec["tick_labels"])))
        ax.set_xticks(positions, list(spec["tick_labels"]))
        if spec["ticks"] is None:
            ax.set_xlim(-0.5, len(positions) - 0.5)
        ax.set(xlabel=spec["xlabel"], ylabel=panel["ylabel"], title=panel["title"])
        ax.grid(alpha=0.3)
        legend = legend or handles
    if legend:
        box = fig.legend(legend, [h.get_label() for h in legend], loc="outside lower center", ncols=min(3, len(legend)), fontsize=9,
                         title=spec.get("note") or None, title_fontsize=9)
        box.get_title().set_color("0.35")
    fig.suptitle(spec["title"], fontsize=12)
    return fig
