"""What the API returns: ``TrainResult`` (one model's folder), ``RunResult`` (a ``normlab run``
parent), each read from the files training wrote, and ``Prediction`` (one image of your own, by
``predict``).

In a notebook a result shows itself as the report's results table, and its ``plot_*`` methods
return matplotlib figures (the same ones the report saves, from the same functions).
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from normlab import figures
from normlab import images as I
from normlab import report as R
from normlab.config import Config
from normlab.data import CLASSES
from normlab.device import Runtime, runtime_with, setup
from normlab.errors import ConfigError, ReportError, UsageError
from normlab.loop import infer
from normlab.rundir import MODEL, REPORT, Run, find_runs, load_model


def _acc(x: float | None) -> str:
    return "None" if x is None else f"{x:.4f}"


class TrainResult:
    """One trained model: its folder (``path``), ``config``, ``results`` (results.json) and ``metrics``
    (metrics.csv, one dict per epoch)."""

    def __init__(self, run: Run, name_seed: bool = False):
        self.run, self._name_seed = run, name_seed  # name_seed: one of several seeds, so figure titles name it
        self._test_images: np.ndarray | None = None

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TrainResult":
        """The finished model in ``path`` (a ``normlab train`` folder, or one model's folder of a run)."""
        models, is_parent = find_runs(Path(path))
        if is_parent:
            raise ReportError(f"{path} holds a normlab run of several models; open it with RunResult.load or normlab.load")
        return cls(next(iter(models.values()))[0])

    @property
    def path(self) -> Path:
        return self.run.path

    @property
    def config(self) -> Config:
        return self.run.config

    @property
    def results(self) -> dict[str, Any]:
        """results.json: parameters, epochs, train and test accuracy, seconds per epoch, device... (``run.results``:
        the same as a ``rundir.Results``)."""
        return self.run.results.to_dict()

    @property
    def metrics(self) -> list[dict[str, Any]]:
        """metrics.csv, one dict per epoch (``rundir.METRICS_FIELDS``; None where not measured)."""
        return self.run.metrics

    @property
    def norm(self) -> str:
        return self.run.config.norm

    @property
    def model_path(self) -> Path:
        """The final model, for ``normlab.predict``, ``normlab.evaluate`` and ``rundir.load_model``."""
        return self.run.path / MODEL

    def _models(self) -> dict[str, list[Run]]:
        return {self.norm: [self.run]}

    def __repr__(self) -> str:
        r = self.run.results
        return (f"TrainResult(norm={self.norm!r}, epochs={r.epochs}, train_acc_clean={_acc(r.train_acc_clean)}, "
                f"test_acc={_acc(r.test_acc)}, path={str(self.path)!r})")

    def _repr_markdown_(self) -> str:
        return f"{R.results_table(self._models())}\n\nRun folder: `{self.path}`"

    def test_images(self, data_dir: str | os.PathLike | None = None) -> np.ndarray:
        """The test images the model was evaluated on (from the data folder it recorded, or ``data_dir``)."""
        if self.run.labels is None:
            raise ReportError(f"{self.path} did not read the test set (--no-test): there are no test predictions to show")
        if self._test_images is None or data_dir is not None:
            self._test_images = R.test_images_for(self._models(), data_dir)
        return self._test_images

    def plot_curves(self):
        """Loss and accuracy per epoch: train, validation (if held out) and test (monitoring only)."""
        return R.curves_figure(self._models())

    def plot_misclassified(self, data_dir: str | os.PathLike | None = None):
        """The 10 most confident mistakes on the test set in a 5x2 grid, true and predicted class on each."""
        return figures.misclassified_grid(**R.misclassified_grid_args(self.norm, self.run, self.test_images(data_dir), self._name_seed))

    def plot_confusion(self):
        """The 10x10 confusion matrix on the test set."""
        if self.run.labels is None:
            raise ReportError(f"{self.path} did not read the test set (--no-test): there is no confusion matrix")
        return R.confusion_figure(self.norm, self.run)

    def predict(self, paths, **options) -> list["Prediction"]:
        """Top-3 classes of your own images (files or folders); see ``normlab.predict``."""
        return predict(self.model_path, [paths] if isinstance(paths, (str, os.PathLike)) else paths, **options)


class RunResult:
    """A ``normlab run`` parent: one ``TrainResult`` per norm and seed, and its report.

    ``result["gn"]`` is the first seed's model of group norm (the one the report shows);
    ``result.models["gn"]`` lists every seed's."""

    def __init__(self, path: Path, models: dict[str, list[TrainResult]], report: Path | None):
        self.path, self.models, self.report = Path(path), models, report

    @classmethod
    def load(cls, path: str | os.PathLike) -> "RunResult":
        models, _ = find_runs(Path(path))
        report = Path(path) / REPORT
        return cls(Path(path), {n: [TrainResult(r, len(rs) > 1) for r in rs] for n, rs in models.items()},
                   report if report.is_file() else None)

    def __getitem__(self, norm: str) -> TrainResult:
        if norm not in self.models:
            raise KeyError(f"{norm!r}: this run has {', '.join(self.models)}")
        return self.models[norm][0]

    def __iter__(self):
        return iter(self.models)

    def __len__(self) -> int:
        return len(self.models)

    def _runs(self) -> dict[str, list[Run]]:
        return {n: [t.run for t in ts] for n, ts in self.models.items()}

    def table(self) -> str:
        """A fixed-width text table, one row per model (mean ± std over seeds where there are several)."""
        return R.summary_table(self._runs())

    def __repr__(self) -> str:
        tests = ", ".join(f"{n}={_acc(ts[0].run.results.test_acc)}" for n, ts in self.models.items())
        seeds = len(next(iter(self.models.values())))
        return f"RunResult(path={str(self.path)!r}, seeds={seeds}, test_acc: {tests}, report={str(self.report) if self.report else None!r})"

    def _repr_markdown_(self) -> str:
        where = f"Report: `{self.report}`" if self.report else f"Run folder: `{self.path}`"
        return f"{R.results_table(self._runs())}\n\n{where}"

    def plot_curves(self):
        """Every model's loss and accuracy per epoch in one figure (means over seeds); test curves are monitoring only."""
        return R.curves_figure(self._runs())

    def plot_misclassified(self, data_dir: str | os.PathLike | None = None):
        """The 5x2 grids of the most confident mistakes, one per model, side by side."""
        images = next(iter(self.models.values()))[0].test_images(data_dir)
        grids = [R.misclassified_grid_args(n, ts[0].run, images, len(ts) > 1) for n, ts in self.models.items()]
        return figures.side_by_side([lambda sub, g=g: figures.misclassified_grid(**g, fig=sub) for g in grids], figures.GRID_SIZE)

    def plot_confusion(self):
        """The confusion matrices of the models (first seed), side by side."""
        return figures.side_by_side([lambda sub, n=n, rs=rs: R.confusion_figure(n, rs[0], fig=sub) for n, rs in self._runs().items()],
                                    figures.CONFUSION_SIZE)


@dataclass
class Prediction:
    """One image of your own: its ``top`` classes with probabilities and the image as the network saw it."""

    path: Path
    probs: dict[str, float]                                  # every class -> probability, in class order
    top: list[tuple[str, float]]                             # the best classes, most probable first
    image: np.ndarray = field(repr=False)                    # (3, 32, 32) uint8: the model's input

    @property
    def label(self) -> str:
        return self.top[0][0]

    def __repr__(self) -> str:
        return f"Prediction({str(self.path)!r}: " + ", ".join(f"{c} {p:.1%}" for c, p in self.top) + ")"

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "top": [{"class": c, "prob": round(p, 6)} for c, p in self.top],
                "probs": {c: round(p, 6) for c, p in self.probs.items()}}


def predictions_table(predictions: list[Prediction]) -> str:
    """A fixed-width table, one row per image: the path and its top classes with probabilities."""
    k = max(len(p.top) for p in predictions)
    header = ["image", *(["1st", "2nd", "3rd"] + [f"{i}th" for i in range(4, k + 1)])[:k]]
    rows = [[str(p.path), *(f"{c} {q:.1%}" for c, q in p.top)] for p in predictions]
    widths = [max(len(r[i]) if i < len(r) else 0 for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows])


def plot_predictions(predictions: list[Prediction]):
    """Each image as the network saw it (32x32), titled with its top classes."""
    return figures.image_grid([p.image for p in predictions],
                              [f"{p.path.name}\n" + "\n".join(f"{c} {q:.1%}" for c, q in p.top) for p in predictions])


def _warn(message: str) -> None:
    print(f"normlab: warning: {message}", file=sys.stderr, flush=True)


def predict(model_path: str | os.PathLike, paths: Sequence[str | os.PathLike], top: int = 3, runtime: Runtime | None = None,
            warn: Callable[[str], None] = _warn, **runtime_options: Any) -> list[Prediction]:
    """The ``top`` classes, with probabilities, of each image that ``paths`` name (files of any size, or folders,
    expanded to their image files), by the model in ``model_path`` (a ``model.pt``).

    Each image is cut to its centred square and resized to 32x32 (``images.py``). A path that gives no
    image is reported on one line through ``warn`` (default: stderr) and the others are still predicted;
    ``UsageError`` if none is."""
    runtime = runtime_with(runtime, runtime_options)
    if not 1 <= top <= len(CLASSES):
        raise ConfigError(f"top must be between 1 and {len(CLASSES)} (got {top})")
    model, cfg = load_model(Path(model_path))  # first: a bad model fails before any image is read
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    kept, pixels = _read_images(paths, warn)
    if not kept:
        raise UsageError(f"no image to predict among the {len(paths)} path(s) given ({I.DESCRIBED} files, or folders of them)")
    place = setup(runtime, cfg.norm)
    batch = torch.from_numpy(np.stack(pixels)).to(place.device)  # (N, 3, 32, 32) uint8
    probs = infer(place.place(model), batch, place).softmax(1).cpu()
    out = []
    for f, image, p in zip(kept, pixels, probs.tolist()):
        best = sorted(range(len(CLASSES)), key=lambda c: -p[c])[:top]
        out.append(Prediction(f, dict(zip(CLASSES, p)), [(CLASSES[c], p[c]) for c in best], image))
    return out


def _read_images(paths: list, warn: Callable[[str], None]) -> tuple[list[Path], list[np.ndarray]]:
    """The image files ``paths`` give and their pixels; each path or file that gives none is one ``warn`` line, in order."""
    kept, pixels = [], []
    for path in paths:
        try:
            files = I.expand(path)
        except I.ImageError as e:
            warn(str(e))
            continue
        for f in files:
            try:
                pixels.append(I.read_image(f))
                kept.append(f)
            except I.ImageError as e:
                warn(str(e))
    return kept, pixels
