"""result.py: the result objects a notebook gets (TrainResult, RunResult) and their figures, read back from the
run folders (also those of earlier versions), and predict on images of your own (any size, folders, files that are
not images)."""
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
from normlab import data as D
from normlab import images as I
from normlab.cli import main
from normlab.config import Config
from normlab.errors import UsageError
from normlab.norms import DEFAULT_NORMS
from normlab.report import write_report
from normlab.rundir import METRICS_FIELDS, RunDir

TINY = {"epochs": 2, "batch_size": 50, "threads": 1, "device": "cpu"}


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    """One group-norm model trained through ``normlab.train`` with keyword settings and no folder given."""
    cwd = tmp_path_factory.mktemp("notebook")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        first = normlab.train(norm="gn", data_dir=data_dir, **TINY)
        second = normlab.train(norm="gn", data_dir=data_dir, **{**TINY, "epochs": 1})  # at once: another folder
    return first, second, cwd


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
