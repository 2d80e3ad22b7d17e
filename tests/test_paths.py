"""Paths that are not what they seem get one clear line: a loop of symbolic links is named as such (not "no such
file"), a data folder that is a file is named as a file, and an image too large to decode safely (Pillow's guard
against decompression bombs, its warning as well as its error) is skipped with one warning line."""
from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from conftest import DEVICE, make_cifar, one_error_line
from normlab.cli import main

LOOP = "a loop of symbolic links"


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("paths")
    data = make_cifar(root / "data", per_batch=10, test=10)
    out = root / "run"
    assert main(["train", "--data-dir", str(data), "--epochs", "1", "--batch-size", "50", "--threads", "1", "--device", DEVICE,
                 "--out", str(out)]) == 0
    return out / "model.pt"


@pytest.fixture
def loop(tmp_path) -> Path:
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    return tmp_path / "a"


def test_predict_names_a_symlink_loop(model, loop, capsys):
    assert main(["predict", str(model), str(loop), "--threads", "1"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"normlab: warning: {loop}: {LOOP} (it points back to itself); skipped"


@pytest.mark.parametrize("command", ["report", "evaluate", "train"])
def test_report_evaluate_and_data_dir_name_a_symlink_loop(loop, tmp_path, capsys, command):
    argv = {"report": ["report", str(loop)], "evaluate": ["evaluate", str(loop), "--threads", "1"],
            "train": ["train", "--data-dir", str(loop), "--epochs", "1", "--threads", "1", "--out", str(tmp_path / "run")]}[command]
    assert main(argv) == 2
    err = one_error_line(capsys)
    assert str(loop) in err and LOOP in err and "no such file" not in err and "exists" not in err


def test_a_data_folder_that_is_a_file_is_named_so(tmp_path, capsys):
    (tmp_path / "cifar.tar.gz").write_bytes(b"x")
    assert main(["train", "--data-dir", str(tmp_path / "cifar.tar.gz"), "--epochs", "1", "--out", str(tmp_path / "run")]) == 2
    assert f"the data folder {tmp_path / 'cifar.tar.gz'} is a file, not a folder" in one_error_line(capsys)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("side", [40, 60], ids=["over-the-warning", "over-the-error"])
def test_an_image_too_large_to_read_safely_is_one_warning_line(model, tmp_path, monkeypatch, capsys, side):
    """Pillow warns above MAX_IMAGE_PIXELS and refuses above twice that (a 9,500 x 9,500 photo is over the first);
    the limit is lowered here so that a small file stands for the huge one."""
    big, small = tmp_path / "big.png", tmp_path / "small.png"
    Image.new("RGB", (side, side)).save(big)
    Image.new("RGB", (20, 20)).save(small)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 40 x 40 = 1,600 warns; 60 x 60 = 3,600 > 2,000 errs
    with _no_warning():
        assert main(["predict", str(model), str(big), str(small), "--threads", "1"]) == 0
    out, err = capsys.readouterr()
    assert err.splitlines() == [err.splitlines()[0]] and err.startswith(f"normlab: warning: {big}: too large to read safely (")
    assert "shrink it first; skipped" in err and "DecompressionBomb" not in err
    assert str(small) in out and str(big) not in out


class _no_warning:
    """No Python warning may reach the user's terminal."""

    def __enter__(self):
        import warnings

        self._catch = warnings.catch_warnings(record=True)
        self.caught = self._catch.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self._catch.__exit__(*exc)
        assert not [w for w in self.caught if "Decompression" in type(w.message).__name__], [str(w.message) for w in self.caught]
