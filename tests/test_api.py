"""The Python API as a notebook uses it: keyword settings, result objects and their figures, the
same errors as the command line, test monitoring that leaves the training untouched, and predict
on images of your own (any size, folders, files that are not images)."""
import csv
import io
import json
import shutil

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image

import normlab
from conftest import make_cifar
from normlab import data as D
from normlab import images as I
from normlab import loop as T
from normlab.cli import main
from normlab.config import Config
from normlab.device import Placement
from normlab.errors import ConfigError, UsageError
from normlab.norms import DEFAULT_NORMS
from normlab.report import write_report
from normlab.rundir import METRICS_FIELDS, RunDir

TINY = {"epochs": 2, "batch_size": 50, "threads": 1, "device": "cpu"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_cifar(tmp_path_factory.mktemp("api") / "data")


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    """One group-norm model trained through ``normlab.train`` with keyword settings and no folder given."""
    cwd = tmp_path_factory.mktemp("notebook")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        first = normlab.train(norm="gn", data_dir=data_dir, **TINY)
        second = normlab.train(norm="gn", data_dir=data_dir, **{**TINY, "epochs": 1})  # at once: another folder
    return first, second, cwd


# ---------------------------------------------------------------- train and run from a notebook
def test_train_with_keywords_returns_its_result(trained):
    result, second, cwd = trained
    assert result.path.parent == second.path.parent == normlab.api.RUNS and result.path != second.path
    assert (cwd / result.path / "model.pt").is_file() and (cwd / second.path / "model.pt").is_file()  # nothing overwritten
    assert result.config == Config(norm="gn", epochs=2, batch_size=50)
    assert result.results == json.loads((cwd / result.path / "results.json").read_text())
    assert [r["epoch"] for r in result.metrics] == [1, 2] and set(METRICS_FIELDS) <= set(result.metrics[0])
    assert result.model_path == result.path / "model.pt"
    text = repr(result)
    assert text.startswith("TrainResult(norm='gn', epochs=2") and f"test_acc={result.results['test_acc']:.4f}" in text
    table = result._repr_markdown_()
    assert "| Group Normalization (gn) |" in table and f"**{100 * result.results['test_acc']:.2f}%**" in table


def test_result_figures_are_returned(trained, monkeypatch):
    result, _, cwd = trained
    monkeypatch.chdir(cwd)
    for fig in (result.plot_curves(), result.plot_misclassified(), result.plot_confusion()):
        assert isinstance(fig, Figure) and fig.axes
    curves = result.plot_curves()
    assert any("monitoring only" in t.get_text() for t in curves.findobj(lambda a: hasattr(a, "get_text")))
    assert len(result.plot_misclassified().axes) == 10  # 5 x 2


def test_run_returns_the_whole_parent(data_dir, tmp_path):
    result = normlab.run(data_dir=data_dir, out=tmp_path / "p", **{**TINY, "epochs": 1})
    assert list(result) == list(DEFAULT_NORMS) and len(result) == 3
    assert result.report == tmp_path / "p" / "report.md" and result.report.is_file()
    assert result["ln"].path == tmp_path / "p" / "ln" and result["ln"].results["norm"] == "ln"
    assert repr(result).startswith(f"RunResult(path='{tmp_path / 'p'}', seeds=1, test_acc: bn=")
    assert all(f"({n}) |" in result._repr_markdown_() for n in DEFAULT_NORMS)
    assert len(result.plot_misclassified().subfigs) == 3 and len(result.plot_confusion().subfigs) == 3
    assert isinstance(result.plot_curves(), Figure)
    again = normlab.load(tmp_path / "p")
    assert list(again) == list(result) and again["bn"].results == result["bn"].results
    assert isinstance(normlab.load(tmp_path / "p" / "gn"), normlab.TrainResult)
    with pytest.raises(KeyError, match="this run has bn, gn, ln"):
        result["xx"]


def test_unknown_setting_lists_the_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown setting 'lrr' \(did you mean 'lr'\?\); settings: norm, .*epochs.*runtime options: device, threads"):
        normlab.train(lrr=0.1)
    with pytest.raises(ConfigError, match="unknown option 'epochs'"):
        normlab.predict("model.pt", ["x.png"], epochs=3)


@pytest.mark.parametrize("settings", [{"epochs": 0}, {"norm": "xx"}, {"device": "tpu"}])
def test_same_errors_as_the_command_line(data_dir, tmp_path, capsys, settings):
    with pytest.raises(normlab.NormlabError) as raised:
        normlab.train(data_dir=data_dir, out=tmp_path / "r", **settings)
    flag, value = next(iter(settings.items()))
    assert main(["train", "--data-dir", str(data_dir), f"--{flag}", str(value), "--out", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err.strip() == f"normlab: error: {raised.value}"
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------- test monitoring
@pytest.mark.parametrize("norm, ema", [("bn", 0.0), ("gn", 0.0), ("ln", 0.0), ("bn", 0.9)])
def test_test_monitoring_leaves_the_training_untouched(data_dir, norm, ema):
    """Weights, running statistics, moving average and random state come out the same with and without it."""
    images, labels = D.load_split(data_dir, train=True)
    test_x, test_y = D.load_split(data_dir, train=False)
    cfg = Config(norm=norm, epochs=2, batch_size=50, ema=ema)
    place = Placement(torch.device("cpu"), "fp32", False)
    states = []
    for test in (None, (test_x, test_y)):
        trainer = T.build(cfg, place, images, labels, progress=False,
                            test_x=test[0] if test else None, test_y=test[1] if test else None)
        rows = [trainer.run_epoch() for _ in range(cfg.epochs)]
        assert all((r["test_acc"] is None) == (test is None) for r in rows)
        states.append((trainer.state_dict(), trainer.final.state_dict(), [r["train_loss"] for r in rows]))
    (a, fa, la), (b, fb, lb) = states
    assert la == lb
    for x, y in ((a["model"], b["model"]), (fa, fb)):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    assert torch.equal(a["torch_rng"], b["torch_rng"]) and torch.equal(a["generator"], b["generator"])


def test_no_test_turns_monitoring_off_and_trains_the_same_model(data_dir, tmp_path):
    args = ["train", "--data-dir", str(data_dir), "--epochs", "2", "--batch-size", "50", "--threads", "1", "--norm", "bn"]
    assert main([*args, "--out", str(tmp_path / "on")]) == 0
    assert main([*args, "--no-test", "--out", str(tmp_path / "off")]) == 0
    on, off = (torch.load(tmp_path / f / "model.pt", weights_only=True)["model"] for f in ("on", "off"))
    assert all(torch.equal(on[k], off[k]) for k in on)
    with open(tmp_path / "on" / "metrics.csv", newline="") as f:
        rows_on = list(csv.DictReader(f))
    with open(tmp_path / "off" / "metrics.csv", newline="") as f:
        rows_off = list(csv.DictReader(f))
    assert all(r["test_acc"] and r["test_loss"] and float(r["test_seconds"]) > 0 for r in rows_on)
    assert all(r["test_acc"] == r["test_loss"] == r["test_seconds"] == "" for r in rows_off)
    results = json.loads((tmp_path / "on" / "results.json").read_text())
    assert float(rows_on[-1]["test_acc"]) == pytest.approx(results["test_acc"], abs=1e-5)  # the last epoch's model is the model


def test_metrics_of_earlier_versions_still_report(trained, data_dir, tmp_path):
    """metrics.csv written before the test columns existed: read with None there, and the report is written."""
    old = tmp_path / "old"
    shutil.copytree(trained[2] / trained[0].path, old)
    with open(old / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    columns = ["epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "seconds"]
    with open(old / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    metrics = RunDir(old).read_metrics()
    assert [m["test_acc"] for m in metrics] == [None, None] and metrics[0]["train_acc"] == float(rows[0]["train_acc"])
    assert write_report(old, data_dir).is_file()
    assert isinstance(normlab.load(old).plot_curves(), Figure)


# ---------------------------------------------------------------- predict
def _png(array: np.ndarray, path, fmt: str = "PNG"):
    Image.fromarray(array).save(path, fmt)
    return path


@pytest.fixture
def pictures(tmp_path):
    """Good images of other sizes and formats, a folder, and two files that are not readable images."""
    rng = np.random.default_rng(0)
    good = [_png(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8), tmp_path / "wide.png"),
            _png(rng.integers(0, 256, (100, 70, 3), dtype=np.uint8), tmp_path / "photo.jpg", "JPEG")]
    folder = tmp_path / "folder"
    folder.mkdir()
    good += [_png(rng.integers(0, 256, (40, 40, 4), dtype=np.uint8), folder / "alpha.png"),
             _png(rng.integers(0, 256, (20, 30), dtype=np.uint8), folder / "grey.jpeg", "JPEG")]
    (folder / "notes.txt").write_text("not an image; a folder's non-image files are left alone\n")
    text = tmp_path / "text.png"
    text.write_text("not an image at all\n")
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return good, folder, text, truncated


def test_predict_command_skips_bad_files_and_predicts_the_rest(trained, pictures, tmp_path, capsys):
    model = trained[2] / trained[0].model_path
    good, folder, text, truncated = pictures
    js = tmp_path / "predictions.json"
    rc = main(["predict", str(model), str(good[0]), str(text), str(good[1]), str(folder), str(truncated), "--json", str(js), "--threads", "1"])
    assert rc == 0
    out, err = capsys.readouterr()
    assert err.splitlines() == [f"normlab: warning: {text}: not an image normlab can read ({I.DESCRIBED}); skipped",
                                f"normlab: warning: {truncated}: a damaged or truncated image (image file is truncated); skipped"]
    lines = out.splitlines()
    assert lines[0].split() == ["image", "1st", "2nd", "3rd"] and len(lines) == 1 + len(good)
    predicted = json.loads(js.read_text())
    assert [p["path"] for p in predicted] == [str(good[0]), str(good[1]), str(folder / "alpha.png"), str(folder / "grey.jpeg")]
    for p, line in zip(predicted, lines[1:]):
        probs = [t["prob"] for t in p["top"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and abs(sum(p["probs"].values()) - 1) < 1e-4
        assert p["top"][0]["prob"] == max(p["probs"].values()) and p["top"][0]["class"] in line


def test_predict_with_no_image_is_exit_status_2(trained, pictures, tmp_path, capsys):
    model = trained[2] / trained[0].model_path
    _, _, text, truncated = pictures
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no image here\n")
    assert main(["predict", str(model), str(text), str(truncated), str(tmp_path / "absent.png"), str(empty)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 5 and err[2] == f"normlab: warning: {tmp_path / 'absent.png'}: no such file or folder; skipped"
    assert err[3].startswith(f"normlab: warning: {empty}: the folder holds no image files (.png, .jpg")
    assert err[-1].startswith("normlab: error: no image to predict among the 4 path(s) given")
    assert main(["predict", str(text), str(pictures[0][0])]) == 2  # not a model: one error line
    assert "is not a PyTorch checkpoint that normlab can read safely" in capsys.readouterr().err


def test_predict_of_a_test_image_matches_its_predictions_csv(trained, data_dir, tmp_path):
    """A 32x32 PNG is read as it is, so the model gives it the probabilities it gave the test image."""
    result, cwd = trained[0], trained[2]
    model = cwd / result.model_path
    images, _ = D.load_split(data_dir, train=False)
    paths = [_png(images[i].numpy().transpose(1, 2, 0), tmp_path / f"test{i}.png") for i in range(5)]
    messages = []
    predictions = normlab.predict(model, paths, warn=messages.append)
    assert not messages and [p.path for p in predictions] == paths
    _, _, probs = RunDir(cwd / result.path).read_predictions()
    for i, p in enumerate(predictions):
        assert np.array_equal(p.image, images[i].numpy())
        # bf16 on a GPU: another batch size, other kernels (5e-4 apart on an H100, 2026-11-28)
        assert list(p.probs.values()) == pytest.approx(probs[i].tolist(), abs=1e-4 if not torch.cuda.is_available() else 2e-3)
    assert repr(predictions[0]).startswith(f"Prediction('{paths[0]}': ")
    with pytest.raises(UsageError, match="no image to predict"):
        normlab.predict(model, [tmp_path / "nothing"], warn=messages.append)


def test_images_are_centre_cropped_and_resized(tmp_path):
    wide = np.zeros((32, 96, 3), np.uint8)
    wide[:, :32] = (0, 0, 255)
    wide[:, 32:64] = (255, 0, 0)  # the centred square
    wide[:, 64:] = (0, 255, 0)
    red = I.read_image(_png(wide, tmp_path / "wide.png"))
    assert red.shape == (3, 32, 32) and red.dtype == np.uint8
    assert (red[0] == 255).all() and (red[1:] == 0).all()
    big = np.full((300, 200, 3), (10, 120, 240), np.uint8)
    flat = I.read_image(_png(big, tmp_path / "big.jpg", "JPEG"))
    assert np.abs(flat.astype(int) - np.array([10, 120, 240])[:, None, None]).max() <= 3  # JPEG's rounding
    clear = np.zeros((16, 16, 4), np.uint8)  # fully transparent: on white
    assert (I.read_image(_png(clear, tmp_path / "clear.png")) == 255).all()
