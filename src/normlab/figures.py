"""The report's figures, one function per PNG (matplotlib with the Agg backend: no display needed).

Each function takes plain arrays, draws one figure, saves it and closes it; ``report.py`` decides
what goes in. Images are shown as their raw uint8 pixels (never normalized), upscaled with
nearest-neighbour so that every one of the 32x32 pixels stays visible.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402

from normlab.data import CLASSES  # noqa: E402

DPI = 110
GRID_ROWS, GRID_COLS = 5, 2  # the misclassified grid: 5 rows x 2 columns = 10 images


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def _hwc(image: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(image.transpose(1, 2, 0))  # (3, 32, 32) -> (32, 32, 3), uint8 as stored


def misclassified_grid(images: np.ndarray, labels: np.ndarray, preds: np.ndarray, probs: np.ndarray,
                       indices: Sequence[int], title: str, path: Path) -> Path:
    """Up to 10 test images in a 5x2 grid, each with its true class, predicted class and probability."""
    fig, axes = plt.subplots(GRID_ROWS, GRID_COLS, figsize=(6, 14.5))
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
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    return _save(fig, path)


def training_curves(series: dict[str, list[dict]], title: str, path: Path, colours: dict[str, str] | None = None) -> Path:
    """Loss and accuracy per epoch: one line per entry of ``series`` (train solid, validation dashed).

    ``series`` maps a legend label to metrics rows (dicts with epoch, train_loss, train_acc,
    val_loss, val_acc; val_* None when there was no validation split).
    """
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
    for k, (label, rows) in enumerate(series.items()):
        colour = (colours or {}).get(label, f"C{k}")
        epochs = [r["epoch"] for r in rows]
        for ax, key in ((ax_loss, "loss"), (ax_acc, "acc")):
            scale = 100 if key == "acc" else 1
            ax.plot(epochs, [r[f"train_{key}"] * scale for r in rows], "-o", ms=3, color=colour, label=f"{label} train")
            val = [(e, r[f"val_{key}"] * scale) for e, r in zip(epochs, rows) if r[f"val_{key}"] is not None]
            if val:
                ax.plot(*zip(*val), "--s", ms=3, color=colour, label=f"{label} validation")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy (train: with label smoothing)", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy (train: running, augmented)")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    return _save(fig, path)


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, title: str, path: Path) -> Path:
    """10x10 counts (rows: true class, columns: predicted), coloured by the share of each true class."""
    n = len(CLASSES)
    counts = np.bincount(labels * n + preds, minlength=n * n).reshape(n, n)
    share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for t in range(n):
        for p in range(n):
            ax.text(p, t, str(counts[t, p]), ha="center", va="center", fontsize=8,
                    color="white" if share[t, p] > 0.5 else "black")
    ax.set_xticks(range(n), CLASSES, rotation=45, ha="right")
    ax.set_yticks(range(n), CLASSES)
    ax.set(xlabel="predicted class", ylabel="true class", title=title)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    fig.tight_layout()
    return _save(fig, path)


def sample_grid(images: np.ndarray, labels: np.ndarray, per_class: int, path: Path) -> Path:
    """The first ``per_class`` training images of every class in file order, one row per class.

    Drawn as one mosaic (tiles with white gaps) in one axes: 80 separate axes take seconds to draw.
    """
    n, gap, side = len(CLASSES), 4, images.shape[-1]
    step = side + gap
    mosaic = np.full((n * step - gap, per_class * step - gap, 3), 255, np.uint8)  # (H, W, 3)
    for c in range(n):
        for k, i in enumerate(np.flatnonzero(labels == c)[:per_class]):
            mosaic[c * step : c * step + side, k * step : k * step + side] = _hwc(images[i])
    fig, ax = plt.subplots(figsize=(1.1 * per_class + 1.2, 1.1 * n))
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_yticks([c * step + side / 2 for c in range(n)], CLASSES, fontsize=10)
    ax.set_xticks([])
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_title(f"CIFAR-10 training images: the first {per_class} of each class", fontsize=12)
    fig.tight_layout()
    return _save(fig, path)
