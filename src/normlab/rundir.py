"""The run folder: one home for its file names and formats, written atomically and read back.

A model's folder holds ``config.json`` (the settings), ``checkpoint.pt`` (after every epoch),
``metrics.csv``, ``model.pt``, ``predictions.csv`` and ``results.json``; a ``normlab run`` parent
holds one such folder per norm (``bn/``, or ``bn/seed0/``... with several seeds). Everything is
written to a temporary file and renamed, so a kill at any instant leaves the old file intact, and
every ``.pt`` file is read with ``torch.load(weights_only=True)``: a folder someone hands you can
hold wrong numbers, never code that runs.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import os
import shlex
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from normlab import folders, lock
from normlab.config import Config, format_value
from normlab.data import CLASSES
from normlab.errors import NormlabError, ReportError, TrainingError, UsageError, no_space
from normlab.models import Net
from normlab.norms import DEFAULT_NORMS, NORMS

CONFIG = "config.json"          # the settings, written when the first epoch starts
CHECKPOINT = "checkpoint.pt"    # written after every epoch: everything needed to resume
METRICS = "metrics.csv"         # one row per epoch
MODEL = "model.pt"              # written at the end: weights + config
PREDICTIONS = "predictions.csv"  # one row per test image
RESULTS = "results.json"        # written last: its presence means the model is finished
DATA = "data.json"              # the data folder and a fingerprint of the data the run trains on
REPORT = "report.md"            # in the folder given to normlab report
FIGURES = "figures"             # the report's PNGs, beside report.md
MARKERS = (CONFIG, RESULTS, CHECKPOINT)  # any of these marks a model's folder
# One row per epoch. seconds: training time of the epoch only; test_*: the test set after the epoch,
# monitoring only (no epoch, seed or setting is chosen by it), and test_seconds what that evaluation
# took. Files of earlier versions lack the test columns: read_metrics gives None there.
METRICS_FIELDS = ["epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc", "seconds", "test_seconds"]
MODEL_FORMAT = "normlab-model"


# ---------------------------------------------------------------- the record of a finished model
@dataclass(kw_only=True)
class Results:
    """results.json: what one finished model scored, on what, in how long. Written last (its presence marks the
    model finished) by ``RunDir.write_results``, read by ``RunDir.read_results``; every reader (report, sweep
    table, result objects) takes these fields, never the file's keys. Files of earlier versions lack some keys:
    those fields are None, and keys this version does not know are kept in ``extra``."""

    norm: str
    norm_name: str | None = None
    params: int
    param_budget: int | None = None
    epochs: int
    over_epoch_limit: bool | None = None
    seed: int | None = None
    train_acc_running: float | None = None  # the last epoch's, on its augmented batches
    train_acc_clean: float | None = None    # the final model's, on the un-augmented training images
    val_acc: float | None = None
    seconds_per_epoch: float | None = None  # the median of metrics.csv's seconds (read back from there)
    compile_seconds: float | None = None    # None unless compiled: the first step, compilation included
    version: str | None = None              # the normlab that trained it (None: before 1.0.0, which did not write it)
    torch: str | None = None
    data_dir: str | None = None
    test_acc: float | None = None           # absent without the test set (--no-test)
    test_acc_flip_tta: float | None = None
    device: str | None = None               # Placement.record(): device, precision, layout, compilation...
    precision: str | None = None
    channels_last: bool | None = None
    compile: bool | None = None
    cuda_graphs: bool | None = None         # written only where true
    captured_step: bool | None = None
    cuda_capability: str | None = None      # on CUDA: capability, peak GPU memory, cuDNN determinism
    gpu_peak_mib: float | None = None
    deterministic: bool | None = None
    threads: int | None = None              # on a CPU
    wall_seconds: float | None = None       # this call's: data loading, training, final evaluations
    peak_rss_mib: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    # Written only where they hold a value (as results.json always had them); the others are written as null.
    OPTIONAL = ("test_acc", "test_acc_flip_tta", "cuda_graphs", "captured_step", "cuda_capability", "gpu_peak_mib",
                "deterministic", "threads")

    def to_dict(self) -> dict[str, Any]:
        """The record as results.json holds it."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**{k: v for k, v in out.items() if v is not None or k not in self.OPTIONAL}, **self.extra}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Results":
        """A results.json of this or an earlier version (TypeError where norm, params or epochs is missing)."""
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in d.items() if k in names}, extra={k: v for k, v in d.items() if k not in names})


# ---------------------------------------------------------------- writing
def median_epoch_seconds(rows: list[dict[str, Any]]) -> float | None:
    """The seconds per epoch a run reports: the median over its epochs (metrics.csv's ``seconds``), the typical epoch,
    which a burst of other work on the machine, or a GPU's compilation in epoch 1 (``compile_seconds``), does not move."""
    secs = [r["seconds"] for r in rows if r.get("seconds") is not None]
    return statistics.median(secs) if secs else None


def atomic_write(path: Path, write: Callable[[Path], None], size: int | None = None) -> None:
    """``write`` a temporary file beside ``path``, then rename it over ``path``. A failed write removes the temporary
    file (the old ``path`` stays whole); one for want of room (``size`` bytes, if known) is one ``DiskFullError`` line."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and (full := no_space(e, path, size)) is not None:
            raise full from None
        raise


def atomic_save(obj: Any, path: Path) -> None:
    def write(tmp: Path) -> None:
        try:
            torch.save(obj, tmp)  # to the path: the archive inside is named after the file, as it always was
            return
        except RuntimeError as e:  # its traceback and context hold torch's writer, whose open file keeps the space taken
            failed = RuntimeError(str(e))
        # torch's writer says "unexpected pos", not why: the same bytes written by Python say it (ENOSPC...)
        blob = _serialized(obj)
        try:
            tmp.write_bytes(blob)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise (no_space(e, path, len(blob)) or e) from None
        raise failed
    atomic_write(path, write)


def _serialized(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: Path, blob: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(blob), len(blob))


def load_pt(path: Path) -> Any:
    """A ``.pt`` file's tensors, numbers, strings, lists and dicts; never code (weights_only=True)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def csv_cell(v: Any) -> Any:
    """A value as normlab's CSV files write it: empty for None, 6 significant digits, widths as 16,32,24."""
    if v is None:
        return ""
    return f"{v:.6g}" if isinstance(v, float) else format_value(v) if isinstance(v, tuple) else v


def check_writable(path: Path) -> list[Path]:
    """Create ``path`` (and its parents) if needed and prove it can be written (a run's or a sweep's --out); returns the
    folders it created, innermost first."""
    try:
        created = folders.make(Path(path))
        probe = Path(path) / f".normlab-write-test-{os.getpid()}"  # two writers starting at once each have their own
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise unwritable(path, e) from None
    return created


def unwritable(path: Path, e: OSError) -> UsageError:
    return UsageError(f"cannot write to output folder {path} ({e.strerror or e}); choose another with --out")


class RunDir:
    """One model's run folder."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __str__(self) -> str:
        return str(self.path)

    # -- state
    @property
    def finished(self) -> bool:
        """results.json and model.pt: a model whose model.pt was deleted is resumed from its last checkpoint, which
        writes it again (the final evaluation only, no epoch trained)."""
        return self.has_results and (self.path / MODEL).is_file()

    @property
    def has_results(self) -> bool:
        return (self.path / RESULTS).is_file()

    @property
    def has_checkpoint(self) -> bool:
        return (self.path / CHECKPOINT).is_file()

    @property
    def has_config(self) -> bool:
        return (self.path / CONFIG).is_file()

    def is_run(self) -> bool:
        return any((self.path / f).exists() for f in MARKERS)

    def check_writable(self) -> list[Path]:
        """Create the folder (and its parents) if needed and prove it can be written; returns the folders it created,
        innermost first (``folders.remove_empty`` takes them back)."""
        return check_writable(self.path)

    def check_free(self, resume_hint: str) -> None:
        """Refuse to start a model in a folder that holds one (finished, or stopped with a checkpoint) without --resume."""
        if self.has_results:
            raise UsageError(f"{self} already holds a finished run; use --resume to skip finished models, or choose another --out")
        if self.has_checkpoint:
            raise UsageError(f"{self} holds an unfinished run; continue it with: {resume_hint}")

    # -- files
    def write_config(self, cfg: Config) -> None:
        atomic_write_text(self.path / CONFIG, json.dumps(cfg.to_dict(), indent=2) + "\n")

    def read_config(self) -> Config:
        """The saved settings; TrainingError if the file cannot be read as a normlab config."""
        try:
            return Config.load(self.path / CONFIG).validate()
        except (OSError, ValueError, TypeError) as e:
            raise TrainingError(f"{self.path / CONFIG} is not a readable normlab config ({type(e).__name__}); "
                                f"{self.path} cannot be resumed, start afresh with another --out") from None

    def check_record(self, error: type[NormlabError] = TrainingError) -> None:
        """Refuse a folder whose config.json and results.json disagree (norm, seed, epochs): two runs wrote into it."""
        if self.has_config and self.has_results:
            check_agree(self.path, _read_json(self.path / CONFIG), RESULTS, _read_json(self.path / RESULTS), error)

    def save_checkpoint(self, state: dict[str, Any], cfg: Config) -> None:
        atomic_save({**state, "config": cfg.to_dict()}, self.path / CHECKPOINT)

    def load_checkpoint(self) -> dict[str, Any]:
        path = self.path / CHECKPOINT
        try:
            ck = load_pt(path)
        except Exception as e:
            raise TrainingError(f"{path} is not a readable normlab checkpoint ({type(e).__name__}); it may be damaged or not "
                                f"written by normlab (normlab loads no code from it); delete it to start the run afresh") from None
        if not isinstance(ck, dict):
            raise TrainingError(f"{path} is not a normlab checkpoint; delete it to start the run afresh")
        if self.has_config and isinstance(ck.get("config"), dict):
            check_agree(self.path, _read_json(self.path / CONFIG), CHECKPOINT, ck["config"], TrainingError)
        return ck

    def write_metrics(self, rows: list[dict[str, Any]]) -> None:
        def write(tmp: Path) -> None:
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=METRICS_FIELDS)
                w.writeheader()
                for r in rows:
                    w.writerow({k: csv_cell(r.get(k)) for k in METRICS_FIELDS})
        atomic_write(self.path / METRICS, write)

    def read_metrics(self) -> list[dict[str, Any]]:
        path = self.path / METRICS
        try:
            with open(path, newline="") as f:
                rows = list(csv.DictReader(f))
            out = [{k: (None if r.get(k) in ("", None) else (int(r[k]) if k == "epoch" else float(r[k]))) for k in (*METRICS_FIELDS, *r)}
                   for r in rows]  # columns an older file lacks (test_*) are None
        except (OSError, ValueError) as e:
            raise ReportError(f"{path} is unreadable ({type(e).__name__}: {e}); copy the run folder again") from None
        if not out:
            raise ReportError(f"{path} has no epochs: the run did not finish its first epoch")
        return out

    def write_predictions(self, labels: torch.Tensor, logits: torch.Tensor) -> None:
        """One row per test image: index, true label, predicted label, the 10 class probabilities."""
        probs = logits.float().softmax(1).cpu()
        preds = probs.argmax(1)
        lines = ["index,label,pred," + ",".join(f"p_{c}" for c in CLASSES)]
        for i, (t, p, row) in enumerate(zip(labels.tolist(), preds.tolist(), probs.tolist())):
            lines.append(f"{i},{t},{p}," + ",".join(f"{v:.5f}" for v in row))
        atomic_write_text(self.path / PREDICTIONS, "\n".join(lines) + "\n")

    def read_predictions(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        path = self.path / PREDICTIONS
        try:
            table = np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2)
        except (OSError, ValueError) as e:
            raise ReportError(f"{path} is unreadable ({type(e).__name__}: {e}); copy the run folder again") from None
        if table.shape[1] != 3 + len(CLASSES) or not np.array_equal(table[:, 0], np.arange(len(table))):
            raise ReportError(f"{path} does not hold index,label,pred and 10 probabilities per test image in order; it was not written by normlab")
        return table[:, 1].astype(np.int64), table[:, 2].astype(np.int64), table[:, 3:]

    def write_results(self, results: Results) -> None:
        atomic_write_text(self.path / RESULTS, json.dumps(results.to_dict(), indent=2) + "\n")

    def read_results(self, metrics: list[dict[str, Any]] | None = None) -> Results:
        """results.json, its seconds per epoch taken from ``metrics`` (read here if not given) as their median: the
        value normlab writes, and the median also for folders whose results.json (of earlier versions) holds the mean."""
        path = self.path / RESULTS
        try:
            results = Results.from_dict(_read_json(path))
        except (TypeError, AttributeError) as e:
            raise ReportError(f"{path} is not a normlab results.json ({e}); copy the run folder again") from None
        results.seconds_per_epoch = median_epoch_seconds(self.read_metrics() if metrics is None else metrics)
        return results

    def write_data(self, record: dict[str, Any]) -> None:
        atomic_write_text(self.path / DATA, json.dumps(record, indent=2) + "\n")

    def read_data(self) -> dict[str, Any] | None:
        """The data record of the run (None for folders written before it existed)."""
        if not (self.path / DATA).is_file():
            return None
        try:
            record = json.loads((self.path / DATA).read_text())
        except (OSError, ValueError) as e:
            raise TrainingError(f"{self.path / DATA} is unreadable ({type(e).__name__}); delete it to resume without the data check") from None
        if not isinstance(record, dict) or "data_dir" not in record or "train" not in record:
            raise TrainingError(f"{self.path / DATA} does not describe the run's data; delete it to resume without the data check")
        return record

    def save_model(self, cfg: Config, model: torch.nn.Module) -> None:
        atomic_save({"format": MODEL_FORMAT, "config": cfg.to_dict(), "model": model.state_dict()}, self.path / MODEL)


def check_same_data(folder: Path, data_dir: Path, recorded: dict[str, Any] | None, fingerprint: dict[str, Any]) -> None:
    """Refuse training data (``fingerprint``, read from ``data_dir``) other than what the model in ``folder``
    trained on (``recorded``, its data.json; None: nothing to compare)."""
    if recorded is not None and recorded["train"] != fingerprint:
        was, now = recorded["train"], fingerprint
        raise TrainingError(
            f"{data_dir} holds other training data ({now['images']:,} images, labels hash {now['labels_sha256'][:12]}) than {folder} "
            f"was trained on ({was['images']:,} images, labels hash {was['labels_sha256'][:12]}, from {recorded['data_dir']}); "
            f"pass --data-dir {recorded['data_dir']} (or leave it out), or start afresh with another --out")


RECORD_KEYS = ("norm", "seed", "epochs")  # in config.json, results.json and checkpoint.pt alike


def check_agree(folder: Path, config: dict[str, Any], name: str, other: dict[str, Any], error: type[NormlabError] = ReportError) -> None:
    """Refuse a run folder whose config.json (``config``) and ``name`` (``other``) name another norm, seed or number of
    epochs: two runs wrote into it at once, and its files mix them."""
    if not (isinstance(config, dict) and isinstance(other, dict)):
        return  # not a record at all: its readers say so in their own words
    diff = [k for k in RECORD_KEYS if k in other and other.get(k) != config.get(k)]
    if diff:
        says = lambda d: ", ".join(f"{k} {d.get(k)}" for k in diff)  # noqa: E731
        raise error(f"{folder} holds the files of two runs: {CONFIG} says {says(config)}, {name} says {says(other)}; "
                    "nothing in it can be trusted: train the model again into another --out")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ReportError(f"{path} is unreadable ({type(e).__name__}: {e}); copy the run folder again") from None


def load_model(path: str | os.PathLike):
    """The network (on the CPU) and ``Config`` stored in a ``model.pt`` (or a per-epoch ``checkpoint.pt``)."""
    path = Path(path)
    if not path.is_file():
        why = "" if path.is_dir() or folders.why_missing(path) == folders.MISSING else f" ({folders.why_missing(path)})"
        raise TrainingError(f"no checkpoint at {path}{why}; pass the model.pt of a run folder")
    try:
        ck = load_pt(path)
    except Exception as e:
        raise TrainingError(f"{path} is not a PyTorch checkpoint that normlab can read safely ({type(e).__name__}); it may be damaged, "
                            "or hold code, which normlab never runs; pass the model.pt that normlab train wrote") from None
    if not isinstance(ck, dict) or "config" not in ck or "model" not in ck:
        raise TrainingError(f"{path} is not a normlab checkpoint (no config and weights); pass the model.pt that normlab train wrote")
    try:
        cfg = Config.from_dict(ck["config"])
        model = Net.from_config(cfg)
        model.load_state_dict(ck["model"])
    except (TypeError, ValueError, RuntimeError, KeyError, AttributeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TrainingError(f"{path} holds weights of another network, not normlab's ({first[:160]}); pass the model.pt that normlab train wrote") from None
    return model, cfg


# ---------------------------------------------------------------- reading finished runs
@dataclass
class Run:
    """One trained model (one norm, one seed) as its run folder describes it."""

    path: Path
    config: Config
    results: Results
    metrics: list[dict[str, Any]]  # rows of metrics.csv; val_* None without a validation split
    labels: np.ndarray | None      # (N,) true test labels, from predictions.csv (None: test set not read)
    preds: np.ndarray | None       # (N,) predicted labels
    probs: np.ndarray | None       # (N, 10) class probabilities

    @property
    def seed(self) -> int:
        return self.config.seed


def load_run(folder: Path, resume_hint: str) -> Run:
    """Read one finished model folder; ``resume_hint`` is the command that would finish it."""
    rd = RunDir(folder)
    if (pid := lock.holder(folder)) is not None:
        raise ReportError(f"{folder} is being written by {lock.who(pid)} (normlab): run the report once it has finished")
    if not rd.has_results:
        raise ReportError(f"{folder} has no {RESULTS}: the run did not finish; resume it with {resume_hint}")
    for name in (CONFIG, METRICS):
        if not (folder / name).is_file():
            raise ReportError(f"{folder} has {RESULTS} but no {name}: the run folder is incomplete; copy all of it again")
    if not rd.finished:
        raise ReportError(missing_model(folder, resume_hint))
    metrics = rd.read_metrics()
    results = rd.read_results(metrics)
    try:
        config = Config.from_dict(_read_json(folder / CONFIG))
    except TypeError as e:
        raise ReportError(f"{folder / CONFIG} does not describe a normlab run ({e})") from None
    check_agree(folder, config.to_dict(), RESULTS, results.to_dict())
    labels = preds = probs = None
    if results.test_acc is not None:
        if not (folder / PREDICTIONS).is_file():
            raise ReportError(f"{folder} has a test accuracy but no {PREDICTIONS}: the run folder is incomplete; copy all of it again")
        labels, preds, probs = rd.read_predictions()
    return Run(folder, config, results, metrics, labels, preds, probs)


def missing_model(folder: Path, resume_hint: str) -> str:
    """What to do about a finished model whose model.pt is gone: its checkpoint writes it again, else nothing can."""
    if RunDir(folder).has_checkpoint:
        return (f"{folder} has {RESULTS} but no {MODEL} (deleted?); {resume_hint} writes it again from {CHECKPOINT} "
                "(its final evaluation only, no epoch trained)")
    return (f"{folder} has {RESULTS} but neither {MODEL} nor {CHECKPOINT}: its trained weights are gone; "
            "move the folder away and train the model again")


def model_folder(parent: Path, norm: str, seed: int, n_seeds: int) -> Path:
    """Where ``normlab run`` puts a model: ``parent/bn`` with one seed, ``parent/bn/seed3`` with several."""
    return parent / norm if n_seeds == 1 else parent / norm / f"seed{seed}"


def cell_folder(parent: Path, norm: str, cell: dict[str, Any], seed: int) -> Path:
    """Where ``normlab sweep`` puts a model: ``parent/bn/norm_batch=8/seed0``, one level per swept setting the norm
    reads (widths written 16x32x24)."""
    path = Path(parent) / norm
    for k, v in cell.items():
        path = path / f"{k}={format_value(v).replace(',', 'x')}"
    return path / f"seed{seed}"


# ---------------------------------------------------------------- the command that trains a folder again
def shown_path(path: str | os.PathLike) -> str:
    """``path`` as a report shows it: relative to the working directory, where its command lines run, when it lies
    under that directory or its parent (the README's ``../shared/cifar10``), else absolute; a report of a run
    made elsewhere then names no folder of the machine that made it that a reader's own does not have."""
    path = Path(path).absolute()
    try:
        rel = os.path.relpath(path)
    except ValueError:  # another drive (Windows)
        return str(path)
    return str(path) if rel.startswith(os.path.join(os.pardir, os.pardir)) else rel


def command(verb: str, out: str | os.PathLike, cfg: Config | None = None, norms: Sequence[str] | None = None,
            grid: Mapping[str, Sequence[Any]] | None = None, seeds: int = 1, first_seed: int = 0,
            data_dir: str | os.PathLike | None = None, runtime: Any = None, resume: bool = False, default_seeds: int = 1) -> str:
    """The normlab command line that trains ``out`` again (``resume``: that continues it): ``normlab train|run|sweep|study``,
    the data it reads (where known), the norms, the swept settings, every setting of ``cfg`` that differs from the
    defaults, the seeds, the runtime options that differ from ``Runtime()``'s (a ``device.Runtime``), ``--out``."""
    parts = ["normlab", verb]
    if data_dir is not None:
        parts += ["--data-dir", shlex.quote(shown_path(data_dir))]
    if verb == "train" and cfg is not None:
        parts += ["--norm", cfg.norm]
    elif norms is not None and tuple(norms) != DEFAULT_NORMS:
        parts += ["--norms", ",".join(norms)]
    for k, values in (grid or {}).items():
        parts += ["--grid", f"{k}=" + ",".join(format_value(v).replace(",", "x") for v in values)]
    if cfg is not None:
        parts += cfg.to_flags(skip=("norm", "seed", *(grid or {})))
    if seeds != default_seeds:  # the command's own default: 1, a study's 3
        parts += ["--seeds", str(seeds)]
    if first_seed != 0:
        parts += ["--seed", str(first_seed)]
    if runtime is not None:
        parts += runtime.to_flags()
    return " ".join(parts + ["--out", shlex.quote(str(out))] + ["--resume"] * resume)


def _seed_folders(norm_dir: Path) -> list[Path]:
    found = [p for p in norm_dir.glob("seed*") if p.is_dir() and p.name[4:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[4:]))


def find_runs(run_dir: Path) -> tuple[dict[str, list[Run]], bool]:
    """Models of ``run_dir`` as {norm: runs sorted by seed}, and whether it is a ``normlab run`` parent."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        why = "does not exist" if folders.why_missing(run_dir) == folders.MISSING else f"cannot be opened: {folders.why_missing(run_dir)}"
        raise ReportError(f"{run_dir} {why}; pass a folder written by normlab run or normlab train")
    if RunDir(run_dir).is_run():  # a single normlab train folder
        run = load_run(run_dir, command("train", run_dir, resume=True))
        return {run.config.norm: [run]}, False
    hint = command("run", run_dir, resume=True)
    models: dict[str, list[Run]] = {}
    for norm in NORMS:
        norm_dir = run_dir / norm
        if not norm_dir.is_dir():
            continue
        if RunDir(norm_dir).is_run():
            models[norm] = [load_run(norm_dir, hint)]
        elif seeds := _seed_folders(norm_dir):
            models[norm] = [load_run(s, hint) for s in seeds]
        else:
            raise ReportError(f"{norm_dir} holds no run (no {RESULTS}, no seed*/ folders): the run did not finish; resume it with {hint}")
    if not models:
        raise ReportError(f"{run_dir} holds no normlab run (no {RESULTS} in it, nor in {'/, '.join(NORMS)}/); "
                          "pass a folder written by normlab run or normlab train")
    seed_sets = {norm: [r.seed for r in runs] for norm, runs in models.items()}
    if len({tuple(s) for s in seed_sets.values()}) > 1:
        have = "; ".join(f"{n}: seeds {', '.join(map(str, s))}" for n, s in seed_sets.items())
        raise ReportError(f"{run_dir} has different seeds per model ({have}): the run did not finish; resume it with {hint}")
    return models, True
