"""One writer per run folder: a second writer (train, run, sweep) is refused in one line naming the folder and the
process holding it, and writes nothing; report says a folder is being written; a killed writer leaves no stale lock."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import DEVICE, one_error_line
from normlab.cli import main
from normlab.lock import LOCK, Busy, FolderLock, holder
from normlab.rundir import CHECKPOINT, CONFIG

TRAIN = ["--epochs", "1", "--batch-size", "100", "--threads", "1", "--device", DEVICE]
# Another writer as the OS sees it: a process holding an exclusive flock on the folder's lock file, its pid inside
HOLD = ("import fcntl, os, sys, time; fd = os.open(os.path.join(sys.argv[1], sys.argv[2]), os.O_RDWR | os.O_CREAT); "
        "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'%d\\n' % os.getpid()); print('held', flush=True); time.sleep(600)")


@pytest.fixture
def hold():
    """hold(folder): another process takes the folder's lock and keeps it until the test ends (or kills it)."""
    started = []

    def start(folder: Path) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), LOCK], stdout=subprocess.PIPE, text=True)
        started.append(p)
        assert p.stdout.readline().strip() == "held"
        return p

    yield start
    for p in started:
        p.kill()
        p.wait()


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_lock_is_taken_once_and_names_its_holder(tmp_path):
    with FolderLock(tmp_path):
        assert holder(tmp_path) == os.getpid()
        with pytest.raises(Busy, match=rf"{tmp_path} is being written by process {os.getpid()}"):
            FolderLock(tmp_path).acquire()  # flock: another open file of the same process is another writer
    assert holder(tmp_path) is None and not (tmp_path / LOCK).exists()


def test_a_second_train_into_a_folder_being_written_is_refused_and_writes_nothing(data_dir, tmp_path, hold, capsys):
    out = tmp_path / "run"
    out.mkdir()
    pid = hold(out).pid
    before = snapshot(out)
    assert main(["train", "--data-dir", str(data_dir), "--norm", "gn", *TRAIN, "--out", str(out)]) == 2
    err = one_error_line(capsys)
    assert f"{out} is being written by process {pid}" in err and "--out" in err
    assert snapshot(out) == before and sorted(p.name for p in out.iterdir()) == [LOCK]


def test_resume_of_a_folder_being_written_is_refused(finished, data_dir, tmp_path, hold, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    (out / "results.json").unlink()  # an unfinished run that another process is continuing
    pid = hold(out).pid
    before = snapshot(out)
    assert main(["train", "--resume", str(out), "--data-dir", str(data_dir), "--threads", "1"]) == 2
    assert f"being written by process {pid}" in one_error_line(capsys)
    assert snapshot(out) == before


def test_report_of_a_folder_being_written_says_so(finished, tmp_path, hold, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    pid = hold(out).pid
    assert main(["report", str(out)]) == 2
    assert f"{out} is being written by process {pid}" in one_error_line(capsys)
    assert not (out / "report.md").exists()


def test_a_killed_writer_leaves_no_stale_lock(data_dir, tmp_path, hold):
    out = tmp_path / "run"
    out.mkdir()
    p = hold(out)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert (out / LOCK).exists() and holder(out) is None  # the file stays, the lock went with its process
    assert main(["train", "--data-dir", str(data_dir), "--norm", "bn", *TRAIN, "--out", str(out)]) == 0
    assert (out / CHECKPOINT).is_file() and not (out / LOCK).exists()


def test_a_failure_before_the_first_epoch_takes_the_lock_and_the_folder_back(tmp_path, capsys):
    out = tmp_path / "new" / "run"
    assert main(["train", "--data-dir", str(tmp_path / "nowhere"), *TRAIN, "--out", str(out)]) == 2
    one_error_line(capsys)
    assert not (tmp_path / "new").exists()


def test_a_sweep_leaves_a_model_being_written_elsewhere_to_its_writer(data_dir, tmp_path, hold, capfd):
    """Two sweeps into one --out: a model folder held by the other one is refused in its line, the others train."""
    out = tmp_path / "sweep"
    held = out / "gn" / "seed0"
    held.mkdir(parents=True)
    pid = hold(held).pid
    rc = main(["sweep", "--data-dir", str(data_dir), "--norms", "bn,gn", *TRAIN, "--out", str(out)])
    printed, err = capfd.readouterr()
    assert rc == 2 and "Traceback" not in err
    assert f"{held}: FAILED: {held} is being written by process {pid}" in printed
    assert err.strip().splitlines()[-1].startswith("normlab: error: 1 of the 2 models of the sweep failed: gn/seed0 (")
    assert (out / "bn" / "seed0" / "results.json").is_file()
    assert sorted(p.name for p in held.iterdir()) == [LOCK]  # nothing written beside the holder's lock
    assert f"`gn/seed0` (being trained by process {pid})" in (out / "sweep.md").read_text()


@pytest.mark.slow
def test_two_trains_started_at_once_never_mix(data_dir, tmp_path):
    """Whichever takes the folder first trains; the other is refused (or, if it comes after, finds a finished run)."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = lambda norm: [sys.executable, "-m", "normlab.cli", "train", "--data-dir", str(data_dir), "--norm", norm,  # noqa: E731
                         "--epochs", "2", "--batch-size", "50", "--threads", "1", "--device", DEVICE, "--out", str(out)]
    procs = [subprocess.Popen(argv(norm), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for norm in ("bn", "gn")]
    results = [(p.wait(timeout=300), p.communicate()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results
    loser = next(err for rc, (_, err) in results if rc == 2)
    assert "being written by process" in loser or "already holds a run" in loser, loser
    winner = "bn" if results[0][0] == 0 else "gn"
    assert main(["report", str(out)]) == 0  # one run's files only: config.json and results.json agree
    assert f'"norm": "{winner}"' in (out / CONFIG).read_text() and f'"norm": "{winner}"' in (out / "results.json").read_text()
