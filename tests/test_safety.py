"""Files a user is handed never run code: crafted checkpoint.pt and model.pt files are refused with
one line, and their payload never runs. A run that fails before its first epoch leaves nothing."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import DEVICE, EXACT, make_cifar, one_error_line
from normlab.cli import main
from normlab.rundir import CHECKPOINT, CONFIG, MODEL, RESULTS

TRAIN = ["--epochs", "1", "--batch-size", "100", "--threads", "1", "--device", DEVICE, *EXACT]


class Payload:
    """Unpickling this calls os.system, which creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def crafted(path: Path, marker: Path, legacy: bool = False) -> None:
    """A .pt file shaped like normlab's (weights, config) with a payload inside."""
    obj = {"format": "normlab-model", "config": {"norm": "bn"}, "model": {"C1.0.weight": Payload(marker)}, "epoch": 1}
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_crafted_checkpoint_is_refused_on_resume(finished, data_dir, tmp_path, capsys, legacy):
    run, marker = tmp_path / "run", tmp_path / "MARKER"
    shutil.copytree(finished, run)
    (run / RESULTS).unlink()
    crafted(run / CHECKPOINT, marker, legacy)
    assert main(["train", "--resume", str(run), "--data-dir", str(data_dir), "--threads", "1"]) == 2
    err = one_error_line(capsys)
    assert str(run / CHECKPOINT) in err and "not a readable normlab checkpoint" in err
    assert not marker.exists()


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_crafted_model_is_refused_by_evaluate(data_dir, tmp_path, capsys, legacy):
    path, marker = tmp_path / MODEL, tmp_path / "MARKER"
    crafted(path, marker, legacy)
    assert main(["evaluate", str(path), "--data-dir", str(data_dir), "--threads", "1"]) == 2
    assert str(path) in one_error_line(capsys)
    assert not marker.exists()


def test_report_never_loads_a_crafted_model(finished, data_dir, tmp_path, capsys):
    """report reads config.json, metrics.csv, results.json and predictions.csv only: a crafted model.pt is inert."""
    run, marker = tmp_path / "run", tmp_path / "MARKER"
    shutil.copytree(finished, run)
    crafted(run / MODEL, marker)
    crafted(run / CHECKPOINT, marker)
    assert main(["report", str(run), "--data-dir", str(data_dir)]) == 0
    assert (run / "report.md").is_file() and not marker.exists()


def test_real_checkpoints_load_with_weights_only(finished):
    ck = torch.load(finished / CHECKPOINT, weights_only=True)
    assert {"model", "optimizer", "generator", "torch_rng", "metrics", "step", "epoch", "config"} <= set(ck)
    assert set(torch.load(finished / MODEL, weights_only=True)) == {"format", "config", "model"}


# ---------------------------------------------------------------- nothing half-made is left behind
def test_failure_before_the_first_epoch_leaves_no_folder(tmp_path, capsys):
    out = tmp_path / "new" / "deeper" / "run"
    assert main(["train", "--data-dir", str(tmp_path / "nowhere"), *TRAIN, "--out", str(out)]) == 2
    one_error_line(capsys)
    assert not (tmp_path / "new").exists()


def test_failure_before_the_first_epoch_keeps_an_existing_folder(data_dir, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes\n")
    assert main(["train", "--data-dir", str(data_dir), *TRAIN, "--lr", "0.1", "--val-size", "10000", "--out", str(out)]) == 2
    one_error_line(capsys)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_run_that_fails_on_bad_data_leaves_no_model_folders(tmp_path, capsys):
    data = make_cifar(tmp_path / "data")
    (data / "cifar-10-batches-py" / "test_batch").write_bytes(b"\x80\x04garbage")
    parent = tmp_path / "parent"
    assert main(["run", "--data-dir", str(data), *TRAIN, "--out", str(parent), "--no-report"]) == 2
    one_error_line(capsys)
    assert not parent.exists()


def test_ctrl_c_in_the_first_epoch_keeps_a_resumable_folder(data_dir, tmp_path, monkeypatch, capsys):
    from normlab import loop as T

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(T, "train_epoch", interrupted)
    out = tmp_path / "run"
    assert main(["train", "--data-dir", str(data_dir), *TRAIN, "--out", str(out)]) == 130
    assert "Resume with: normlab train" in capsys.readouterr().err
    assert (out / CONFIG).is_file() and not (out / CHECKPOINT).exists()
