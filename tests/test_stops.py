"""Stops that stop: SIGTERM or SIGINT, to the main process or to its whole process group (Ctrl-C at a terminal), end a
sweep's worker processes at once, start none of its queued models, keep each cut model's last checkpoint, print the
resume line once with no traceback and exit 130 (SIGINT) or 143 (SIGTERM); the printed --resume then finishes."""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import make_cifar
from normlab.lock import LOCK

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not sys.platform.startswith("linux"), reason="POSIX signals, /proc")]

# 500 images in batches of 50: 10 steps an epoch; bn and gn train at once (--jobs 2), ln waits for one of them
SWEEP = ["--norms", "bn,gn,ln", "--epochs", "3", "--batch-size", "50", "--threads", "1", "--device", "cpu"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_cifar(tmp_path_factory.mktemp("stops") / "data", per_batch=100, test=50)


def normlab(*args: str) -> list[str]:
    return [sys.executable, "-m", "normlab.cli", *args]


def workers_of(pid: int) -> list[int]:
    """The worker processes of ``pid`` (not multiprocessing's resource tracker, which ends just after its parent)."""
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        kids = [int(c) for c in f.read().split()]
    return [k for k in kids if b"spawn_main" in _cmdline(k)]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # it has just ended
        return b""


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie has ended
    except FileNotFoundError:
        return True


def start_and_stop(argv: list[str], out: Path, sig: int, group: bool, early: bool = False) -> tuple[subprocess.Popen, str, list[int]]:
    """Start ``argv`` in its own process group; once a model has saved an epoch (``early``: once its worker processes
    are starting up), send ``sig`` to it or to the group."""
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, start_new_session=True)
    deadline = time.monotonic() + 180
    while not (len(workers_of(p.pid)) == 2 if early else list(out.rglob("checkpoint.pt"))):
        assert p.poll() is None, p.communicate()
        assert time.monotonic() < deadline, "no epoch saved in 180 s"
        time.sleep(0.02)
    workers = workers_of(p.pid)
    os.killpg(p.pid, sig) if group else p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    return p, err, workers


@pytest.mark.parametrize("sig, group, early", [(signal.SIGTERM, False, False), (signal.SIGINT, False, False), (signal.SIGINT, True, False),
                                               (signal.SIGINT, True, True)],
                         ids=["sigterm-main", "sigint-main", "ctrl-c-group", "ctrl-c-group-in-start-up"])
def test_a_stopped_sweep_stops_its_workers_and_resumes(data_dir, tmp_path, sig, group, early):
    out = tmp_path / "sweep"
    p, err, workers = start_and_stop(normlab("sweep", "--data-dir", str(data_dir), *SWEEP, "--jobs", "2", "--out", str(out)),
                                     out, sig, group, early)
    assert p.returncode == STATUS[sig]
    what = "interrupted" if sig == signal.SIGINT else "stopped (SIGTERM)"
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"normlab: {what}; the last complete epoch is kept. Resume with: normlab sweep ")
    assert workers and all(gone(w) for w in workers)  # no worker outlives the command
    assert not (out / "ln").exists()  # the queued model never started
    assert not list(out.rglob("results.json")) and not list(out.rglob("*.tmp")) and not list(out.rglob(LOCK))
    if group and not early:  # the printed command, at once: the workers' folders are free
        command = shlex.split(err.split("Resume with: ", 1)[1])
        done = subprocess.run(normlab(*command[1:]), capture_output=True, text=True, env=ENV, timeout=300)
        assert done.returncode == 0, done.stderr
        assert len(list(out.rglob("results.json"))) == 3


def test_sigterm_stops_a_training_as_ctrl_c_does(data_dir, tmp_path):
    out = tmp_path / "run"
    p, err, _ = start_and_stop(normlab("train", "--data-dir", str(data_dir), "--norm", "bn", *SWEEP[2:], "--out", str(out)),
                               out, signal.SIGTERM, group=False)
    assert p.returncode == 143 and err.count("\n") == 1, err
    assert err.startswith("normlab: stopped (SIGTERM); the last complete epoch is kept. Resume with: normlab train ")
    assert (out / "checkpoint.pt").is_file() and not (out / "results.json").exists() and not (out / LOCK).exists()


def ray_tasks() -> set[int]:
    """The processes running normlab's Ray tasks (Ray names them after the task: ray::normlab bn/seed0)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and _cmdline(int(entry.name)).startswith(b"ray::normlab"):
            found.add(int(entry.name))
    return found


def test_sigterm_cancels_a_sweep_on_a_local_ray_instance(data_dir, tmp_path):
    pytest.importorskip("ray", reason="Ray is an optional extra")
    out, scratch = tmp_path / "sweep", tmp_path / "scratch"
    env = {**ENV, "RAY_USAGE_STATS_ENABLED": "0"}
    p = subprocess.Popen(normlab("sweep", "--data-dir", str(data_dir), *SWEEP, "--ray", "local", "--ray-scratch", str(scratch),
                                 "--out", str(out)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         start_new_session=True)
    deadline = time.monotonic() + 300
    while not list(scratch.rglob("checkpoint.pt")):  # the models train in the node's scratch folder
        assert p.poll() is None, p.communicate()
        assert time.monotonic() < deadline, "no epoch saved in 300 s"
        time.sleep(0.05)
    tasks = ray_tasks()
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 143 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("normlab: stopped (SIGTERM); the last complete epoch is kept. Resume with: ")
    assert tasks and not (tasks & ray_tasks())  # cancelled, and the instance shut down
    assert list(scratch.rglob("checkpoint.pt")) and not list(out.rglob("results.json"))  # kept on the node for --resume
