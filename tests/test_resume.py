"""Interrupted runs: a kill (SIGKILL) or Ctrl-C (SIGINT) in the middle of an epoch loses at most that
epoch, and resuming gives exactly the files of a run that was never interrupted (CPU, same threads)."""
import csv
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import DEVICE, EXACT, make_cifar
from normlab.cli import main
from normlab.rundir import CHECKPOINT


# 1000 training images in batches of 32: an epoch is 32 steps, long enough to be hit in its middle.
EPOCHS = 3
ARGS = ["--norm", "bn", "--epochs", str(EPOCHS), "--batch-size", "32", "--threads", "1", "--device", DEVICE, *EXACT, "--seed", "0"]

pytestmark = [pytest.mark.slow,  # training subprocesses killed and resumed (make test-quick leaves them out)
              pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_cifar(tmp_path_factory.mktemp("resume") / "data", per_batch=200, test=50)


@pytest.fixture(scope="module")
def reference(data_dir) -> Path:
    """The same run, never interrupted."""
    out = data_dir.parent / "reference"
    assert main(["train", "--data-dir", str(data_dir), *ARGS, "--out", str(out)]) == 0
    return out


def metrics_without_seconds(out: Path) -> list[dict[str, str]]:
    with open(out / "metrics.csv", newline="") as f:
        return [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in csv.DictReader(f)]  # seconds, test_seconds


def assert_same_run(out: Path, reference: Path) -> None:
    assert metrics_without_seconds(out) == metrics_without_seconds(reference)
    assert (out / "predictions.csv").read_text() == (reference / "predictions.csv").read_text()
    a, b = (torch.load(p / "model.pt", weights_only=True)["model"] for p in (out, reference))
    assert all(torch.equal(a[k], b[k]) for k in b)


def normlab(*args: str) -> list[str]:
    return [sys.executable, "-m", "normlab.cli", *args]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def start_and_hit(data_dir: Path, out: Path, sig: int) -> subprocess.Popen:
    """Start a training subprocess; once epoch 1 is saved, send ``sig`` part way into epoch 2."""
    p = subprocess.Popen(normlab("train", "--data-dir", str(data_dir), *ARGS, "--out", str(out)),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.monotonic() + 120
    while not (out / "metrics.csv").exists():  # written right after the checkpoint
        assert p.poll() is None, p.communicate()
        assert time.monotonic() < deadline, "no epoch finished in 120 s"
        time.sleep(0.02)
    with open(out / "metrics.csv", newline="") as f:
        first = float(next(csv.DictReader(f))["seconds"])
    # a GPU's first epoch includes its start-up (3.1 s against 0.4 s for the next ones on an H100, 2026-11-28)
    time.sleep(0.4 * first if DEVICE == "cpu" else 0.05)
    assert p.poll() is None, "the run ended before it could be interrupted"
    p.send_signal(sig)
    p.wait(timeout=60)
    return p


def test_sigkill_mid_epoch_then_resume(data_dir, reference, tmp_path):
    out = tmp_path / "run"
    p = start_and_hit(data_dir, out, signal.SIGKILL)
    assert p.returncode == -signal.SIGKILL
    assert not (out / "results.json").exists()
    ck = torch.load(out / CHECKPOINT, weights_only=True)  # the last checkpoint is whole
    assert 1 <= ck["epoch"] < EPOCHS
    done = subprocess.run(normlab("train", "--resume", str(out), "--data-dir", str(data_dir), "--threads", "1"),
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"resuming {out} after epoch {ck['epoch']} of {EPOCHS}" in done.stdout
    assert_same_run(out, reference)


def test_ctrl_c_stops_prints_resume_command_and_resumes(data_dir, reference, tmp_path):
    out = tmp_path / "run"
    p = start_and_hit(data_dir, out, signal.SIGINT)
    _, err = p.communicate()
    assert p.returncode != 0 and p.returncode == 130
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("normlab: interrupted; the last complete epoch is kept. Resume with: normlab train ")
    assert not (out / "results.json").exists()
    ck = torch.load(out / CHECKPOINT, weights_only=True)
    assert 1 <= ck["epoch"] < EPOCHS
    # Run the printed command as it is: it repeats the data folder, the threads and the run folder.
    command = shlex.split(err.split("Resume with: ", 1)[1])
    assert command[:2] == ["normlab", "train"] and "--resume" in command
    done = subprocess.run(normlab(*command[1:]), capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr
    assert_same_run(out, reference)
