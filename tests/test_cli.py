"""The command line end to end on small synthetic data: the files a run writes, determinism,
evaluate, summary, the epoch limit, and one clear line for every kind of bad input."""
import csv
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import DEVICE, EXACT, error_line, make_cifar, one_error_line
from normlab import data as D
from normlab import loop as T
from normlab.cli import main
from normlab.config import Config
from normlab.data import FOLDER
from normlab.models import PARAM_BUDGET, Net, count_params
from normlab.norms import DEFAULT_NORMS
from normlab.rundir import CHECKPOINT, METRICS_FIELDS, MODEL

ALL_NORMS = list(DEFAULT_NORMS)  # what normlab run trains by default
EPOCHS, BATCH = 3, 50  # 200 training images: 4 steps per epoch
TRAIN_ARGS = ["--epochs", str(EPOCHS), "--batch-size", str(BATCH), "--threads", "1", "--device", DEVICE, *EXACT]


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory) -> tuple[Path, Path]:
    """Two ``normlab run``-style parents, each with bn/ gn/ ln/ trained by ``normlab train`` with seed 0."""
    parents = tmp_path_factory.mktemp("runs_a"), tmp_path_factory.mktemp("runs_b")
    for parent in parents:
        for norm in ALL_NORMS:
            rc = main(["train", "--data-dir", str(data_dir), "--norm", norm, *TRAIN_ARGS, "--seed", "0", "--out", str(parent / norm)])
            assert rc == 0
    return parents


def metrics_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def without_seconds(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in rows]  # seconds, test_seconds: timings


# ---------------------------------------------------------------- a run end to end
@pytest.mark.parametrize("norm", ALL_NORMS)
def test_train_writes_its_files(runs, data_dir, norm):
    out = runs[0] / norm
    cfg = Config.load(out / "config.json")
    assert cfg == Config(norm=norm, epochs=EPOCHS, batch_size=BATCH, seed=0)

    rows = metrics_rows(out / "metrics.csv")
    assert list(rows[0]) == METRICS_FIELDS
    assert [int(r["epoch"]) for r in rows] == list(range(1, EPOCHS + 1))
    assert all(math.isfinite(float(r["train_loss"])) and 0 <= float(r["train_acc"]) <= 1 and float(r["seconds"]) > 0 for r in rows)
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])

    ck = torch.load(out / CHECKPOINT, weights_only=True)
    assert ck["epoch"] == EPOCHS and ck["step"] == EPOCHS * 4
    model = torch.load(out / MODEL, weights_only=True)
    assert model["format"] == "normlab-model" and Config.from_dict(model["config"]) == cfg
    assert not list(out.glob("*.tmp"))

    test_images, test_labels = D.load_split(data_dir, train=False)
    with open(out / "predictions.csv", newline="") as f:
        preds = list(csv.DictReader(f))
    assert len(preds) == len(test_labels) == 50
    assert list(preds[0])[:3] == ["index", "label", "pred"] and len(preds[0]) == 13
    for i, p in enumerate(preds):
        probs = [float(p[f"p_{c}"]) for c in D.CLASSES]
        assert int(p["index"]) == i and int(p["label"]) == test_labels[i]
        assert abs(sum(probs) - 1) < 1e-3 and all(0 <= q <= 1 for q in probs)
        assert int(p["pred"]) == max(range(10), key=probs.__getitem__) or max(probs) - probs[int(p["pred"])] < 1e-4

    r = json.loads((out / "results.json").read_text())
    assert r["norm"] == norm and r["epochs"] == EPOCHS and r["seed"] == 0 and r["over_epoch_limit"] is False
    assert r["params"] == count_params(Net(norm)) < r["param_budget"] == PARAM_BUDGET
    assert r["test_acc"] == pytest.approx(sum(int(p["pred"]) == int(p["label"]) for p in preds) / 50)
    for key in ("train_acc_running", "train_acc_clean", "test_acc", "test_acc_flip_tta"):
        assert 0 <= r[key] <= 1
    assert r["train_acc_running"] == pytest.approx(float(rows[-1]["train_acc"]), abs=1e-5)
    assert r["val_acc"] is None and r["seconds_per_epoch"] > 0 and (r["threads"] == 1 if DEVICE == "cpu" else "threads" not in r)
    secs = sorted(float(row["seconds"]) for row in rows)
    assert r["seconds_per_epoch"] == pytest.approx(statistics.median(secs))  # the median epoch, not the mean
    assert r["wall_seconds"] >= sum(secs) and r["peak_rss_mib"] > 100  # torch alone takes more


@pytest.mark.parametrize("norm", ALL_NORMS)
def test_same_seed_same_results(runs, norm):
    a, b = (parent / norm for parent in runs)
    assert without_seconds(metrics_rows(a / "metrics.csv")) == without_seconds(metrics_rows(b / "metrics.csv"))
    assert (a / "predictions.csv").read_text() == (b / "predictions.csv").read_text()


def test_evaluate_end_to_end(runs, data_dir, tmp_path, capsys):
    out = runs[0] / "gn"
    js = tmp_path / "eval.json"
    rc = main(["evaluate", str(out / MODEL), "--data-dir", str(data_dir), "--device", DEVICE, "--threads", "1", "--json", str(js)])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(js.read_text())
    r = json.loads((out / "results.json").read_text())
    assert printed["norm"] == "gn" and printed["images"] == 50 and printed["params"] == r["params"]
    assert printed["test_acc"] == pytest.approx(r["test_acc"]) and printed["test_acc_flip_tta"] == pytest.approx(r["test_acc_flip_tta"])


@pytest.mark.parametrize("norm", ALL_NORMS)
def test_summary_prints_parameter_counts(norm, capsys):
    assert main(["summary", "--norm", norm]) == 0
    text = capsys.readouterr().out
    n = count_params(Net(norm))
    assert f"{n:,}" in text or str(n) in text
    assert "C1" in text and "C10" in text


def test_more_than_20_epochs_allowed_but_flagged(tmp_path, capsys):
    data = make_cifar(tmp_path / "data", per_batch=10, test=10)  # 50 images: one step per epoch
    out = tmp_path / "run"
    rc = main(["train", "--data-dir", str(data), "--norm", "ln", "--epochs", "21", "--batch-size", "50", "--threads", "1", "--out", str(out)])
    assert rc == 0
    assert "[21 epochs: outside the prescribed limit of 20]" in capsys.readouterr().out
    r = json.loads((out / "results.json").read_text())
    assert r["epochs"] == 21 and r["over_epoch_limit"] is True
    assert len(metrics_rows(out / "metrics.csv")) == 21


@pytest.mark.parametrize("norm_batch, layer", [("16", "BatchNorm2d, statistics over groups of 16 images (ghost batches)"),
                                               ("0", "BatchNorm2d)")])
def test_train_header_names_the_layer_it_trains(tmp_path, capsys, norm_batch, layer):
    data = make_cifar(tmp_path / "data", per_batch=10, test=10)  # 50 images: one step per epoch
    rc = main(["train", "--data-dir", str(data), "--norm", "bn", "--norm-batch", norm_batch, "--epochs", "1",
               "--batch-size", "50", "--threads", "1", "--no-test", "--out", str(tmp_path / "run")])
    assert rc == 0
    assert f"Batch Normalization (bn; {layer}" in capsys.readouterr().out


# ---------------------------------------------------------------- finished work is never overwritten
def _snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.rglob("*")) if p.is_file()}


def test_train_refuses_a_finished_folder(runs, data_dir, capsys):
    out = runs[1] / "ln"
    before = _snapshot(out)
    rc = main(["train", "--data-dir", str(data_dir), "--norm", "ln", *TRAIN_ARGS, "--out", str(out)])
    assert rc == 2
    err = one_error_line(capsys)
    assert "already holds a finished run" in err and "--resume" in err
    assert _snapshot(out) == before


def test_train_resume_of_a_finished_folder_changes_nothing(runs, data_dir, capsys):
    out = runs[1] / "gn"
    before = _snapshot(out)
    assert main(["train", "--resume", str(out), "--data-dir", str(data_dir), "--threads", "1"]) == 0
    assert "finished earlier, nothing to resume" in capsys.readouterr().out
    assert _snapshot(out) == before


def test_run_refuses_an_existing_parent_without_resume(runs, data_dir, capsys):
    parent = runs[1]
    before = _snapshot(parent)
    rc = main(["run", "--data-dir", str(data_dir), "--norms", "bn,ln", *TRAIN_ARGS, "--out", str(parent), "--no-report"])
    assert rc == 2
    err = one_error_line(capsys)
    assert "already holds a finished run" in err and "--resume" in err
    assert _snapshot(parent) == before


def test_run_resume_skips_finished_models(runs, data_dir, capsys):
    parent = runs[1]
    before = _snapshot(parent)
    rc = main(["run", "--data-dir", str(data_dir), *TRAIN_ARGS, "--out", str(parent), "--resume", "--no-report"])
    assert rc == 0
    out = capsys.readouterr().out
    assert all(f"{parent / n}: finished earlier, skipped" in out for n in ALL_NORMS)
    assert _snapshot(parent) == before


def test_run_resume_refuses_a_finished_model_of_other_settings(runs, data_dir, capsys):
    """--resume skips a finished model only if it was trained with the settings asked for now."""
    parent = runs[1]
    before = _snapshot(parent)
    argv = ["run", "--data-dir", str(data_dir), "--norms", "bn", *TRAIN_ARGS, "--lr", "0.1", "--out", str(parent), "--resume", "--no-report"]
    fails(capsys, argv, f"{parent / 'bn'} was trained with other settings", "lr 0.2 (asked: 0.1)")
    assert _snapshot(parent) == before


def test_run_resume_refuses_an_unfinished_model_of_other_settings(runs, data_dir, tmp_path, capsys):
    """--resume continues an unfinished model only if it was started with the settings asked for now: else one report
    would mix models trained differently (an old run's SGD model beside Muon ones after the default changed)."""
    parent = tmp_path / "parent"
    (parent / "ln").mkdir(parents=True)
    for name in ("config.json", CHECKPOINT, "metrics.csv"):
        (parent / "ln" / name).write_bytes((runs[0] / "ln" / name).read_bytes())
    before = _snapshot(parent)
    argv = ["run", "--data-dir", str(data_dir), "--norms", "ln", *TRAIN_ARGS, "--lr", "0.1", "--out", str(parent), "--resume", "--no-report"]
    fails(capsys, argv, f"{parent / 'ln'} was trained with other settings", "lr 0.2 (asked: 0.1)")
    assert _snapshot(parent) == before


def test_run_resume_keeps_new_models_on_the_finished_ones_data(runs, data_dir, tmp_path, monkeypatch, capsys):
    """A resumed run's new models train on its earlier models' data: other data named by --data-dir is refused before
    anything trains; without --data-dir they take the recorded folder, not $NORMLAB_DATA's."""
    parent = tmp_path / "p"
    shutil.copytree(runs[1] / "bn", parent / "bn")
    other = make_cifar(tmp_path / "other", seed=1)
    argv = ["run", *TRAIN_ARGS, "--norms", "bn,ln", "--out", str(parent), "--resume", "--no-report"]
    fails(capsys, [*argv, "--data-dir", str(other)], f"{other} holds other training data", f"{parent / 'bn'} was trained on")
    assert sorted(p.name for p in parent.iterdir()) == ["bn"]
    monkeypatch.setenv("NORMLAB_DATA", str(other))
    assert main(argv) == 0
    assert json.loads((parent / "ln" / "data.json").read_text())["data_dir"] == str(data_dir.resolve())


def test_run_refuses_an_unfinished_model_without_resume(runs, data_dir, tmp_path, capsys):
    parent = tmp_path / "parent"
    (parent / "ln").mkdir(parents=True)
    for name in ("config.json", CHECKPOINT, "metrics.csv"):
        (parent / "ln" / name).write_bytes((runs[0] / "ln" / name).read_bytes())
    before = _snapshot(parent)
    argv = ["run", "--data-dir", str(data_dir), "--norms", "ln", *TRAIN_ARGS, "--out", str(parent), "--no-report"]
    err = fails(capsys, argv, "holds an unfinished run", "continue it with: normlab run ")
    assert err.rstrip().endswith("--resume")
    assert _snapshot(parent) == before


def test_run_checks_every_model_before_training(runs, data_dir, tmp_path, capsys):
    # ln is finished in this parent and bn is not: nothing may be trained before the refusal.
    parent = tmp_path / "parent"
    (parent / "ln").mkdir(parents=True)
    (parent / "ln" / "results.json").write_text((runs[0] / "ln" / "results.json").read_text())
    rc = main(["run", "--data-dir", str(data_dir), "--norms", "bn,ln", *TRAIN_ARGS, "--out", str(parent), "--no-report"])
    assert rc == 2 and "already holds a finished run" in one_error_line(capsys)
    assert not (parent / "bn").exists()


def test_run_jobs_2_gives_the_same_models_as_one_at_a_time(runs, data_dir, tmp_path, capfd):
    # Two models trained at once, each in its own process, match the ones trained one after another.
    parent = tmp_path / "parallel"
    rc = main(["run", "--data-dir", str(data_dir), "--norms", "bn,ln", *TRAIN_ARGS, "--out", str(parent), "--jobs", "2", "--no-report"])
    assert rc == 0
    out = capfd.readouterr().out
    assert "2 models, 2 at a time, 1 thread(s) each" in out
    assert f"[{parent / 'bn'}] done in" in out and f"[{parent / 'ln'}] done in" in out  # each line says whose it is
    for norm in ("bn", "ln"):
        assert without_seconds(metrics_rows(parent / norm / "metrics.csv")) == without_seconds(metrics_rows(runs[0] / norm / "metrics.csv"))
        assert (parent / norm / "predictions.csv").read_text() == (runs[0] / norm / "predictions.csv").read_text()


def test_run_jobs_a_failed_model_keeps_the_others(data_dir, tmp_path, capfd):
    parent = tmp_path / "parallel"
    parent.mkdir()
    (parent / "ln").write_text("a file where ln's folder should be")
    rc = main(["run", "--data-dir", str(data_dir), "--norms", "bn,ln", *TRAIN_ARGS, "--out", str(parent), "--jobs", "2", "--no-report"])
    assert rc == 2
    err = capfd.readouterr().err
    assert err.strip().splitlines()[-1].startswith("normlab: error: cannot write to output folder") and "Traceback" not in err, err
    assert (parent / "bn" / "results.json").is_file()  # the other model finished


def test_run_jobs_must_be_positive(data_dir, tmp_path, capsys):
    fails(capsys, ["run", "--data-dir", str(data_dir), *TRAIN_ARGS, "--out", str(tmp_path / "p"), "--jobs", "0"], "--jobs must be at least 1")


def test_run_jobs_without_data_fetches_it_once_before_any_worker(tmp_path, capfd):
    # Not once per worker process, all into the same partial file: one download (here refused: conftest's closed
    # port), one error, and no worker started.
    rc = main(["run", "--data-dir", str(tmp_path / "nodata"), "--norms", "bn,ln", *TRAIN_ARGS, "--out", str(tmp_path / "p"),
               "--jobs", "2", "--no-report"])
    out, err = capfd.readouterr()
    assert rc == 2 and (out + err).count("downloading CIFAR-10") == 1 and err.count("the download from") == 1
    assert "at a time" not in out and not (tmp_path / "p" / "bn").exists()


# ---------------------------------------------------------------- bad input: one line, exit 2, nothing damaged
def fails(capsys, argv: list[str], *needles: str) -> str:
    rc = main(argv)
    assert rc == 2
    err = one_error_line(capsys)
    for needle in needles:
        assert needle in err, err
    return err


def train_argv(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data-dir", str(data), "--norm", "ln", "--epochs", "1", "--batch-size", "50", "--threads", "1", "--out", str(out), *extra]


def assert_no_run(out: Path) -> None:
    assert not out.exists() or not any(out.iterdir()), list(out.iterdir())


@pytest.fixture
def own_data(tmp_path) -> Path:
    """A data folder of this test alone, free to damage."""
    return make_cifar(tmp_path / "data", per_batch=10, test=10)


def test_missing_data_and_no_network(tmp_path, capsys):
    out = tmp_path / "run"
    fails(capsys, train_argv(tmp_path / "nowhere", out), "download", "failed", "--data-dir")
    assert_no_run(out)
    assert not list((tmp_path / "nowhere").rglob("*.part"))


def test_data_dir_is_a_file(tmp_path, capsys):
    (tmp_path / "file.txt").write_text("x")
    fails(capsys, train_argv(tmp_path / "file.txt", tmp_path / "run"), f"the data folder {tmp_path / 'file.txt'} is a file, not a folder", "--data-dir")


def test_empty_data_folder(tmp_path, capsys):
    (tmp_path / "data" / FOLDER).mkdir(parents=True)
    out = tmp_path / "run"
    fails(capsys, train_argv(tmp_path / "data", out), "data_batch_1 is missing", "copy")
    assert_no_run(out)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "wrong shape", "labels out of range"])
def test_bad_batch_file(own_data, tmp_path, capsys, damage):
    from test_data import BAD_BATCHES

    path = own_data / FOLDER / "data_batch_2"
    BAD_BATCHES[damage](path)
    damaged = path.read_bytes()
    out = tmp_path / "run"
    err = fails(capsys, train_argv(own_data, out), str(path))
    assert {"truncated": "truncated or corrupt", "garbage": "truncated or corrupt", "wrong shape": "expected (N, 3072) uint8",
            "labels out of range": "labels outside 0-9"}[damage] in err
    assert path.read_bytes() == damaged  # the data is left as it was
    assert_no_run(out)


def test_bad_test_batch_fails_before_training(own_data, tmp_path, capsys):
    path = own_data / FOLDER / "test_batch"
    path.write_bytes(path.read_bytes()[:1000])
    out = tmp_path / "run"
    fails(capsys, train_argv(own_data, out), str(path), "truncated")
    assert_no_run(out)  # not one epoch spent before finding out


def test_bad_test_batch_for_evaluate(runs, own_data, capsys):
    path = own_data / FOLDER / "test_batch"
    path.write_bytes(path.read_bytes()[:1000])
    fails(capsys, ["evaluate", str(runs[0] / "ln" / MODEL), "--data-dir", str(own_data), "--threads", "1"], str(path), "truncated")


SETTINGS = [
    (["--norm", "batch"], "unknown norm 'batch'; choose one of: bn, gn, ln"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--epochs", "-3"], "--epochs must be at least 1"),
    (["--batch-size", "0"], "--batch-size must be between 1 and 8192"),
    (["--batch-size", "100000"], "--batch-size must be between 1 and 8192"),
    (["--lr", "0"], "--lr must be above 0"),
    (["--lr", "-0.1"], "--lr must be above 0"),
    (["--lr", "50"], "--lr must be above 0 and at most 10"),
    (["--lr", "nan"], "--lr must be above 0"),
    (["--val-size", "-1"], "--val-size must be 0 or more"),
    (["--muon-momentum", "1"], "--muon-momentum must be in [0, 1)"),
    (["--warmup", "0.5", "--hold", "0.5"], "--hold must be 0 or more, and --warmup + --hold below 1"),
    (["--widths", "64,64,64"], "--widths 64,64,64"),
    (["--widths", "0,24,32"], "--widths must be three positive"),
    (["--norm", "gn", "--groups", "5"], "--groups 5 must divide every width"),
    (["--threads", "-1"], "--threads must be"),
]


@pytest.mark.parametrize("flags,message", SETTINGS, ids=[" ".join(f) for f, _ in SETTINGS])
def test_settings_out_of_range(cifar_dir, tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    fails(capsys, train_argv(cifar_dir, out) + flags, message)
    assert not out.exists()  # refused before any folder is made


def test_val_size_not_below_training_images(cifar_dir, tmp_path, capsys):
    out = tmp_path / "run"
    fails(capsys, train_argv(cifar_dir, out, "--val-size", "200"), "--val-size 200 leaves no training images", "200")
    assert_no_run(out)


def test_run_bad_norm_list(cifar_dir, tmp_path, capsys):
    fails(capsys, ["run", "--data-dir", str(cifar_dir), "--norms", "bn,xx", "--out", str(tmp_path / "p")], "unknown norm 'xx'")
    fails(capsys, ["run", "--data-dir", str(cifar_dir), "--seeds", "0", "--out", str(tmp_path / "p")], "--seeds must be at least 1")
    assert not (tmp_path / "p").exists()


def test_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--epochs", "many"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("normlab train: error:") and "Traceback" not in err


def test_output_folder_cannot_be_written(cifar_dir, tmp_path, capsys):
    (tmp_path / "file.txt").write_text("keep me")
    fails(capsys, train_argv(cifar_dir, tmp_path / "file.txt" / "run"), "cannot write to output folder", "--out")
    assert (tmp_path / "file.txt").read_text() == "keep me"
    fails(capsys, ["run", "--data-dir", str(cifar_dir), "--norms", "ln", "--epochs", "1", "--threads", "1",
                   "--out", str(tmp_path / "file.txt" / "p"), "--no-report"], "cannot write to output folder")


def test_report_of_a_folder_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    fails(capsys, ["report", str(tmp_path / "empty")], str(tmp_path / "empty"), "no normlab run")
    fails(capsys, ["report", str(tmp_path / "missing")], str(tmp_path / "missing"), "does not exist")
    assert not (tmp_path / "missing").exists() and list((tmp_path / "empty").iterdir()) == []


def test_resume_of_a_folder_that_is_not_a_run(cifar_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    fails(capsys, train_argv(cifar_dir, tmp_path / "x", "--resume", str(tmp_path / "empty")), "is not a normlab run that can be resumed")
    assert list((tmp_path / "empty").iterdir()) == []
    fails(capsys, train_argv(cifar_dir, tmp_path / "missing", "--resume"), "is not a normlab run that can be resumed")
    assert not (tmp_path / "missing").exists()


@pytest.mark.parametrize("broken", ["config.json", CHECKPOINT])
def test_resume_of_a_damaged_run(runs, cifar_dir, tmp_path, capsys, broken):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("config.json", CHECKPOINT, "metrics.csv"):
        (out / name).write_bytes((runs[0] / "ln" / name).read_bytes())
    (out / broken).write_text("{ not what it should be")
    before = _snapshot(out)
    fails(capsys, train_argv(cifar_dir, out, "--resume"), str(out), "cannot be resumed" if broken == "config.json" else "not a readable normlab checkpoint")
    assert _snapshot(out) == before


def test_resume_with_a_checkpoint_of_another_run(runs, cifar_dir, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_bytes((runs[0] / "ln" / "config.json").read_bytes())
    torch.save({"model": nn.Linear(3, 2).state_dict()}, out / CHECKPOINT)
    fails(capsys, train_argv(cifar_dir, out, "--resume"), "is not a checkpoint of this run")


def test_evaluate_a_checkpoint_that_is_not_normlab(cifar_dir, tmp_path, capsys):
    other = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.LazyLinear(10))
    other(torch.zeros(1, 3, 32, 32))
    cases = {
        "state_dict.pt": (lambda p: torch.save(other.state_dict(), p), "is not a normlab checkpoint"),
        "foreign.pt": (lambda p: torch.save({"config": Config().to_dict(), "model": other.state_dict()}, p), "holds weights of another network"),
        "notes.txt": (lambda p: p.write_text("these are my notes\n"), "is not a PyTorch checkpoint"),
        "empty.pt": (lambda p: p.write_bytes(b""), "is not a PyTorch checkpoint"),
    }
    for name, (write, message) in cases.items():
        path = tmp_path / name
        write(path)
        before = path.read_bytes()
        fails(capsys, ["evaluate", str(path), "--data-dir", str(cifar_dir), "--threads", "1"], str(path), message)
        assert path.read_bytes() == before
    fails(capsys, ["evaluate", str(tmp_path / "none.pt"), "--threads", "1"], "no checkpoint at")


def test_downloaded_archive_with_wrong_checksum(tmp_path, monkeypatch, capsys):
    from test_data import _tar_gz

    src = tmp_path / "srv" / "cifar-10-python.tar.gz"
    src.parent.mkdir()
    _tar_gz(src, {f"{FOLDER}/data_batch_1": b"whatever"})
    monkeypatch.setattr(D, "URL", src.as_uri())
    monkeypatch.setattr(D, "MD5", "0" * 32)
    data, out = tmp_path / "data", tmp_path / "run"
    fails(capsys, train_argv(data, out), "MD5", "partial file was removed")
    assert not data.exists()
    assert_no_run(out)


def test_archive_member_outside_target(tmp_path, monkeypatch, capsys):
    from test_data import _tar_gz

    src = tmp_path / "srv" / "cifar-10-python.tar.gz"
    src.parent.mkdir()
    md5 = _tar_gz(src, {f"{FOLDER}/data_batch_1": b"whatever", "../evil": b"evil"})
    monkeypatch.setattr(D, "URL", src.as_uri())
    monkeypatch.setattr(D, "MD5", md5)
    data, out = tmp_path / "data", tmp_path / "run"
    fails(capsys, train_argv(data, out), "'../evil'", "outside", "refusing")
    assert not (tmp_path / "evil").exists() and not (data / FOLDER).exists()
    assert_no_run(out)


# ---------------------------------------------------------------- the real command line, in a subprocess
def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "normlab.cli", *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_python_m_cli_bad_inputs(tmp_path, own_data):
    """The installed command as a user meets it: `python -m normlab.cli`, one line on stderr, exit 2."""
    path = own_data / FOLDER / "data_batch_5"
    path.write_bytes(path.read_bytes()[:5000])
    (tmp_path / "notes.txt").write_text("not a model\n")
    for args, needle in [
        (train_argv(own_data, tmp_path / "run", "--norm", "xx"), "unknown norm 'xx'"),
        (train_argv(own_data, tmp_path / "run"), "data_batch_5 is truncated or corrupt"),
        (["evaluate", str(tmp_path / "notes.txt"), "--data-dir", str(own_data), "--threads", "1"], "is not a PyTorch checkpoint"),
    ]:
        p = cli(*args)
        assert p.returncode == 2, p.stderr
        assert needle in error_line(p.stderr)
    assert_no_run(tmp_path / "run")


# ---------------------------------------------------------------- Ctrl-C in process, then the printed command
def ctrl_c_in(epoch_desc: str):
    """A train_epoch that stops with Ctrl-C after two batches of the epoch whose description starts so."""
    real_epoch = T.train_epoch

    def train_epoch(model, opt, batches, *args, desc="", **kwargs):
        if not desc.startswith(epoch_desc):
            return real_epoch(model, opt, batches, *args, desc=desc, **kwargs)

        class Cut(list):  # the batches of the epoch, then Ctrl-C after two of them
            labels, batch_size = batches.labels, batches.batch_size

            def __iter__(self):
                for i, b in enumerate(batches):
                    if i == 2:
                        raise KeyboardInterrupt
                    yield b

        return real_epoch(model, opt, Cut(range(len(batches))), *args, desc=desc, **kwargs)

    return train_epoch


def test_run_interrupted_then_resumed(runs, data_dir, tmp_path, monkeypatch, capsys):
    """Ctrl-C in epoch 2 of ln (bn finished): the printed command skips bn and ends ln as if never stopped."""
    real_epoch = T.train_epoch
    parent = tmp_path / "parent"
    argv = ["run", "--data-dir", str(data_dir), "--norms", "bn,ln", *TRAIN_ARGS, "--out", str(parent), "--no-report"]
    monkeypatch.setattr(T, "train_epoch", ctrl_c_in("ln epoch 2/"))
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("normlab: interrupted; the last complete epoch is kept. Resume with: normlab run ")
    assert (parent / "bn" / "results.json").is_file() and not (parent / "ln" / "results.json").exists()
    assert torch.load(parent / "ln" / CHECKPOINT, weights_only=True)["epoch"] == 1
    bn_before = _snapshot(parent / "bn")

    monkeypatch.setattr(T, "train_epoch", real_epoch)
    command = shlex.split(err.split("Resume with: ", 1)[1])
    assert command[:2] == ["normlab", "run"] and "--resume" in command
    assert main(command[1:]) == 0
    out = capsys.readouterr().out
    assert f"{parent / 'bn'}: finished earlier, skipped" in out and f"resuming {parent / 'ln'} after epoch 1 of {EPOCHS}" in out
    assert _snapshot(parent / "bn") == bn_before
    for norm in ("bn", "ln"):  # the same as the uninterrupted runs of the same settings
        assert without_seconds(metrics_rows(parent / norm / "metrics.csv")) == without_seconds(metrics_rows(runs[0] / norm / "metrics.csv"))
        assert (parent / norm / "predictions.csv").read_text() == (runs[0] / norm / "predictions.csv").read_text()


def test_train_interrupted_in_its_first_epoch_then_resumed(runs, data_dir, tmp_path, monkeypatch, capsys):
    """No epoch was complete: the printed command starts the run again with its saved settings."""
    real_epoch = T.train_epoch
    out = tmp_path / "run"
    monkeypatch.setattr(T, "train_epoch", ctrl_c_in("gn epoch 1/"))
    assert main(["train", "--data-dir", str(data_dir), "--norm", "gn", *TRAIN_ARGS, "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Resume with: normlab train " in err
    assert (out / "config.json").is_file() and not (out / CHECKPOINT).exists()
    monkeypatch.setattr(T, "train_epoch", real_epoch)
    assert main(shlex.split(err.split("Resume with: ", 1)[1])[1:]) == 0
    assert "starting it again" in capsys.readouterr().out
    assert without_seconds(metrics_rows(out / "metrics.csv")) == without_seconds(metrics_rows(runs[0] / "gn" / "metrics.csv"))
    assert (out / "predictions.csv").read_text() == (runs[0] / "gn" / "predictions.csv").read_text()


def test_alternating_flips_and_ema_resume_as_if_never_stopped(data_dir, tmp_path, monkeypatch, capsys):
    """The flips' parity and the moving average carry over a Ctrl-C: the resumed run equals the uninterrupted one."""
    flags = ["--data-dir", str(data_dir), "--norm", "bn", *TRAIN_ARGS, "--ema", "0.9"]  # alternating flips are the default
    assert main(["train", *flags, "--out", str(tmp_path / "whole")]) == 0
    real_epoch = T.train_epoch
    monkeypatch.setattr(T, "train_epoch", ctrl_c_in("bn epoch 2/"))
    assert main(["train", *flags, "--out", str(tmp_path / "cut")]) == 130
    err = capsys.readouterr().err
    monkeypatch.setattr(T, "train_epoch", real_epoch)
    assert main(shlex.split(err.split("Resume with: ", 1)[1])[1:]) == 0
    assert without_seconds(metrics_rows(tmp_path / "cut" / "metrics.csv")) == without_seconds(metrics_rows(tmp_path / "whole" / "metrics.csv"))
    assert (tmp_path / "cut" / "predictions.csv").read_text() == (tmp_path / "whole" / "predictions.csv").read_text()
    saved = torch.load(tmp_path / "cut" / MODEL, weights_only=True)["model"]
    assert set(saved) == set(Net("bn").state_dict())  # model.pt holds the average, loadable as a plain Net
