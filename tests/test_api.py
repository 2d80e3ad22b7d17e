"""api.py as a notebook uses it: keyword settings, the same errors as the command line, test monitoring that
leaves the training untouched, and images of your own cut and resized as the network reads them. The result
objects and predict: test_result.py."""
import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

import normlab
from normlab import data as D
from normlab import images as I
from normlab import loop as T
from normlab.cli import main
from normlab.config import Config
from normlab.device import Placement
from normlab.errors import ConfigError

TINY = {"epochs": 2, "batch_size": 50, "threads": 1, "device": "cpu"}


# ---------------------------------------------------------------- train and run from a notebook


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


# ---------------------------------------------------------------- predict


def _png(array: np.ndarray, path, fmt: str = "PNG"):
    Image.fromarray(array).save(path, fmt)
    return path


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
