"""Small CIFAR-10 look-alikes in the official on-disk layout, made in a temporary folder."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from normlab.cli import main
from normlab.data import FOLDER, TEST_FILES, TRAIN_FILES

# The device of the tests that train: the CPU here and in CI; benchmarks/gpu_check.sh sets cuda.
DEVICE = os.environ.get("NORMLAB_TEST_DEVICE", "cpu")
# What a test that compares two runs bit for bit adds on a GPU: cuDNN's default backward is not deterministic
# (two default 1-epoch runs on an H100 shared 10 of 62 tensors, 2026-11-28).
EXACT = ["--deterministic"] if DEVICE != "cpu" else []
# The settings of the ``finished`` run folder: what a test passes to resume it or train it again.
FINISHED = ["--epochs", "2", "--batch-size", "100", "--threads", "1", "--device", DEVICE, *EXACT]


def make_cifar(root: Path, per_batch: int = 40, test: int = 50, seed: int = 0) -> Path:
    """Write ``root/cifar-10-batches-py`` with 5 x ``per_batch`` training and ``test`` test images.

    The images are learnable: each class has its own mean colour plus noise, so a few training
    steps visibly lower the loss.
    """
    rng = np.random.default_rng(seed)
    folder = root / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    palette = rng.integers(30, 225, size=(10, 3))

    def batch(n: int, name: str) -> None:
        labels = np.arange(n) % 10
        rng.shuffle(labels)
        img = palette[labels][:, :, None, None] + rng.normal(0, 25, size=(n, 3, 32, 32))
        data = np.clip(img, 0, 255).astype(np.uint8).reshape(n, 3072)
        d = {"batch_label": name, "labels": labels.tolist(), "data": data, "filenames": [f"{name}_{i}.png" for i in range(n)]}
        with open(folder / name, "wb") as f:
            pickle.dump(d, f)

    for name in TRAIN_FILES:
        batch(per_batch, name)
    for name in TEST_FILES:
        batch(test, name)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]}, f)
    return root


def error_line(err: str) -> str:
    """``err`` without its newline, after checking that it is one line "normlab: error: ..." and no traceback."""
    assert err.startswith("normlab: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err.rstrip("\n")


def one_error_line(capsys: pytest.CaptureFixture) -> str:
    """What the command under test wrote to stderr, checked by ``error_line``."""
    return error_line(capsys.readouterr().err)


@pytest.fixture(autouse=True)
def no_network_one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """Never download in a test (a missing data folder fails at once), and train on one thread.

    One thread: the tests' models are tiny, and two threads on a busy 2-core machine oversubscribe it
    and run many times slower. ``normlab.data.URL`` is read at call time, so this covers every path.
    """
    import torch

    import normlab.data

    monkeypatch.setattr(normlab.data, "URL", "http://127.0.0.1:9/cifar-10-python.tar.gz")  # discard port: refused
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small synthetic CIFAR-10 that tests read and never change (200 training, 50 test images)."""
    return make_cifar(tmp_path_factory.mktemp("cifar") / "data")


@pytest.fixture(scope="session")
def finished(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished batch-norm run folder trained with ``FINISHED``: tests copy it before they change it."""
    out = tmp_path_factory.mktemp("finished") / "bn"
    assert main(["train", "--data-dir", str(data_dir), "--norm", "bn", *FINISHED, "--out", str(out)]) == 0
    return out


@pytest.fixture
def cifar_dir(tmp_path: Path) -> Path:
    """A data directory holding a small synthetic CIFAR-10 (200 training, 50 test images)."""
    return make_cifar(tmp_path / "data")
