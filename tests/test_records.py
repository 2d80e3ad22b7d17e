"""A run folder's files must describe one run: a record whose config.json and results.json (or checkpoint.pt)
disagree is refused by report and --resume in one line, and a deleted model.pt is noticed: report says how to get
it back, and --resume writes it again from the last checkpoint (its final evaluation only, the same bytes)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from conftest import FINISHED, one_error_line
from normlab.cli import main
from normlab.rundir import CHECKPOINT, CONFIG, MODEL, RESULTS


def mixed(finished: Path, folder: Path) -> Path:
    """bn's files, 2 epochs, under the config.json of a gn run of 1 epoch: what two runs started 1 s apart left."""
    shutil.copytree(finished, folder)
    config = json.loads((folder / CONFIG).read_text())
    (folder / CONFIG).write_text(json.dumps({**config, "norm": "gn", "epochs": 1}, indent=2) + "\n")
    return folder


def test_report_refuses_a_record_of_two_runs(finished, tmp_path, capsys):
    out = mixed(finished, tmp_path / "run")
    assert main(["report", str(out)]) == 2
    err = one_error_line(capsys)
    assert f"{out} holds the files of two runs: {CONFIG} says norm gn, epochs 1, {RESULTS} says norm bn, epochs 2" in err
    assert not (out / "report.md").exists()


def test_resume_refuses_a_record_of_two_runs(finished, data_dir, tmp_path, capsys):
    out = mixed(finished, tmp_path / "run")
    assert main(["train", "--resume", str(out), "--data-dir", str(data_dir), "--threads", "1"]) == 2  # finished: refused too
    assert "holds the files of two runs" in one_error_line(capsys)
    (out / RESULTS).unlink()  # unfinished: its checkpoint is bn's
    assert main(["train", "--resume", str(out), "--data-dir", str(data_dir), "--threads", "1"]) == 2
    assert f"{CONFIG} says norm gn, epochs 1, {CHECKPOINT} says norm bn, epochs 2" in one_error_line(capsys)


def test_run_resume_refuses_a_record_of_two_runs(finished, data_dir, tmp_path, capsys):
    parent = tmp_path / "parent"
    out = mixed(finished, parent / "bn")
    assert main(["run", "--data-dir", str(data_dir), "--norms", "bn", *FINISHED, "--out", str(parent), "--resume", "--no-report"]) == 2
    assert f"{out} holds the files of two runs" in one_error_line(capsys)


def test_report_notices_a_deleted_model(finished, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    (out / MODEL).unlink()
    assert main(["report", str(out)]) == 2
    assert f"{out} has {RESULTS} but no {MODEL}" in one_error_line(capsys)
    (out / CHECKPOINT).unlink()
    assert main(["report", str(out)]) == 2
    assert f"neither {MODEL} nor {CHECKPOINT}: its trained weights are gone" in one_error_line(capsys)


def test_resume_writes_a_deleted_model_again_from_its_checkpoint(finished, data_dir, tmp_path, capsys):
    parent = tmp_path / "parent"
    shutil.copytree(finished, parent / "bn")
    (parent / "bn" / MODEL).unlink()
    argv = ["run", "--data-dir", str(data_dir), "--norms", "bn", *FINISHED, "--out", str(parent), "--resume", "--no-report"]
    assert main(argv) == 0
    assert f"resuming {parent / 'bn'} after epoch 2 of 2" in capsys.readouterr().out  # no epoch trained again
    assert (parent / "bn" / MODEL).read_bytes() == (finished / MODEL).read_bytes()
    assert (parent / "bn" / "predictions.csv").read_text() == (finished / "predictions.csv").read_text()
    (parent / "bn" / MODEL).unlink()
    (parent / "bn" / CHECKPOINT).unlink()
    assert main(argv) == 2
    assert "its trained weights are gone" in one_error_line(capsys)


def test_train_resume_writes_a_deleted_model_again(finished, data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    (out / MODEL).unlink()
    assert main(["train", "--resume", str(out), "--data-dir", str(data_dir), "--threads", "1"]) == 0
    assert "finished earlier" not in capsys.readouterr().out
    assert (out / MODEL).read_bytes() == (finished / MODEL).read_bytes()
