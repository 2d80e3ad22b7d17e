"""normlab sweep on a Ray cluster: one local Ray head on loopback with 2 CPUs and token authentication on
(Ray's own default), started once for this module. The models trained as Ray tasks are the ones a local
sweep makes; a worker killed mid-model (SIGKILL) costs that model's work only (it is run again and resumes
from its node-local checkpoint); a wrong address, an unreachable cluster, a refused token and a cluster
without the resources asked for each give one clear line. Skipped where Ray is not installed (it is an
optional extra; CI installs it with the dev extra)."""
import csv
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

# Read when ray is imported, so set before it; this module's head, its workers and its drivers (this process and
# the normlab subprocesses) all run with them. Ray's single-machine mode: every address it advertises is 127.0.0.1,
# so nothing leaves the loopback interface. Token authentication on, with a token of this run's own (not the
# user's ~/.ray/auth_token, which stays untouched).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_AUTH_MODE"] = "token"
os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
ray = pytest.importorskip("ray", reason="Ray is an optional extra (pip install 'normlab[ray]'); CI installs it with the dev extra")

from conftest import make_cifar  # noqa: E402
from normlab.cli import main  # noqa: E402
from normlab.cluster import WORKER  # noqa: E402
from normlab.config import Config  # noqa: E402
from normlab.sweepdir import TABLE  # noqa: E402

pytestmark = [pytest.mark.slow,  # a Ray head per module, killed workers: minutes (make test-quick leaves them out)
              pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals, a Ray head started with ray start")]

TRAIN_ARGS = ["--batch-size", "50", "--threads", "1", "--device", "cpu"]  # Ray tasks train on the CPU here, as in CI


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    """A Ray head on 127.0.0.1 with 2 CPUs and no GPU, token authentication on. Yields its address; stopped by ending
    the one process this fixture started."""
    root = Path(tempfile.mkdtemp(prefix="nlray-"))  # short: Ray's socket paths live under it
    env = {"RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    port = free_port()
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)  # the driver (this process, and the normlab subprocesses) joins with the same token
        mp.delenv("RAY_ADDRESS", raising=False)
        log = open(root / "head.log", "w")
        head = subprocess.Popen([str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", "--port", str(port),
                                 "--node-ip-address", "127.0.0.1", "--num-cpus", "2", "--num-gpus", "0",
                                 "--object-store-memory", str(200 * 2**20), "--include-dashboard", "false",
                                 "--disable-usage-stats", "--temp-dir", str(root / "t")],
                                stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy(), start_new_session=True)
        try:
            deadline = time.monotonic() + 90
            while "Ray runtime started" not in (root / "head.log").read_text():
                assert head.poll() is None, (root / "head.log").read_text()
                assert time.monotonic() < deadline, "the Ray head did not start in 90 s"
                time.sleep(0.2)
            yield {"address": f"127.0.0.1:{port}", "root": root}
        finally:
            head.terminate()  # --block: the head stops its own processes (GCS, raylet, workers) when it ends
            try:
                head.wait(timeout=30)
            except subprocess.TimeoutExpired:
                head.kill()
                head.wait()
            log.close()
            shutil.rmtree(root, ignore_errors=True)


def rows(out: Path) -> dict[str, dict[str, str]]:
    with open(out / TABLE, newline="") as f:
        return {r["folder"]: r for r in csv.DictReader(f)}


def strip_seconds(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in csv.DictReader(f)]


def test_a_sweep_on_ray_trains_the_models_a_local_sweep_does_and_reports_a_failed_one(cluster, data_dir, tmp_path, capsys):
    grid = ["--norms", "bn,gn", "--grid", "groups=4,8", "--epochs", "2", *TRAIN_ARGS]
    local, remote, scratch = tmp_path / "local", tmp_path / "ray", tmp_path / "scratch"
    assert main(["sweep", "--data-dir", str(data_dir), *grid, "--out", str(local)]) == 0
    broken = remote / "gn" / "groups=8" / "seed0"  # an interrupted model whose checkpoint is damaged: it fails on its node
    broken.mkdir(parents=True)
    (broken / "config.json").write_text(json.dumps(Config(norm="gn", groups=8, epochs=2, batch_size=50).to_dict()))
    (broken / "checkpoint.pt").write_bytes(b"not a checkpoint")
    capsys.readouterr()
    assert main(["sweep", "--data-dir", str(data_dir), *grid, "--out", str(remote), "--resume",
                 "--ray", cluster["address"], "--ray-scratch", str(scratch)]) == 2
    printed, err = capsys.readouterr()
    assert "Ray: 3 models submitted, each with 1 CPU(s) and 1 thread(s); cluster: 2 CPUs, 0 GPUs" in printed
    assert "Traceback" not in err
    # The failed model is named with its folder at the driver (where the user deletes the checkpoint), not the node's
    assert err.strip().splitlines()[-1].startswith(f"normlab: error: 1 of the 3 models of the sweep failed: gn/groups=8/seed0 "
                                                   f"({broken / 'checkpoint.pt'} is not a readable normlab checkpoint")
    assert not ray.is_initialized()  # the sweep disconnected
    assert {f: r["status"] for f, r in rows(remote).items()} == {"bn/seed0": "finished", "gn/groups=4/seed0": "finished",
                                                                  "gn/groups=8/seed0": "unfinished"}
    for folder in ("bn/seed0", "gn/groups=4/seed0"):  # the others finished, the models a local sweep makes
        assert rows(remote)[folder]["test_acc"] == rows(local)[folder]["test_acc"]
        assert (remote / folder / "predictions.csv").read_text() == (local / folder / "predictions.csv").read_text()
        assert strip_seconds(remote / folder / "metrics.csv") == strip_seconds(local / folder / "metrics.csv")
        assert not list((remote / folder).glob(".*")) and not list((remote / folder).glob("*.tmp"))
    # The files came back: the nodes keep nothing of a finished model (the failed one's folder stays for --resume)
    assert not (scratch / next(p.name for p in scratch.iterdir() if not p.name.startswith("cifar10-")) / "bn").exists()
    assert (remote / "sweep.md").is_file() and (remote / "figures" / "sweep_groups.png").is_file()


def test_a_killed_worker_costs_only_its_own_model(cluster, tmp_path):
    data = make_cifar(tmp_path / "data", per_batch=100, test=50)  # 500 images in batches of 50: 10 steps an epoch
    out, scratch, epochs = tmp_path / "ray", tmp_path / "scratch", 4
    argv = ["sweep", "--data-dir", str(data), "--norms", "bn,ln", "--epochs", str(epochs), *TRAIN_ARGS, "--out", str(out),
            "--ray", cluster["address"], "--ray-scratch", str(scratch)]
    driver = subprocess.Popen([sys.executable, "-m", "normlab.cli", *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (ck := list(scratch.glob("*/bn/seed0/checkpoint.pt"))):  # bn's worker has saved its first epoch
            assert driver.poll() is None, driver.communicate()[0]
            assert time.monotonic() < deadline, "no epoch saved in 120 s"
            time.sleep(0.02)
        folder = ck[0].parent
        pid = json.loads((folder / WORKER).read_text())["pid"]
        epochs_done = len((folder / "metrics.csv").read_text().splitlines()) - 1
        os.kill(pid, signal.SIGKILL)
        assert epochs_done < epochs, "bn finished before it could be killed"
        printed, _ = driver.communicate(timeout=240)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    assert driver.returncode == 0, printed
    # bn was run again and resumed from the checkpoint its killed worker left on the node; ln was untouched
    resumed = [line for line in printed.splitlines() if line.startswith(f"{out / 'bn' / 'seed0'}: finished on ")]
    assert resumed and "(run again after its worker died: resumed after epoch " in resumed[0], printed
    assert f"{out / 'ln' / 'seed0'}: finished on " in printed and "ln/seed0: finished on " in printed
    assert "worker died" not in next(line for line in printed.splitlines() if line.startswith(f"{out / 'ln' / 'seed0'}:"))
    for norm in ("bn", "ln"):
        metrics = strip_seconds(out / norm / "seed0" / "metrics.csv")
        assert [int(r["epoch"]) for r in metrics] == list(range(1, epochs + 1))
        assert (out / norm / "seed0" / "results.json").is_file()
    assert {r["status"] for r in rows(out).values()} == {"finished"}
    # Resuming gave the model an uninterrupted training makes (CPU, same threads)
    reference = tmp_path / "reference"
    assert main(["train", "--data-dir", str(data), "--norm", "bn", "--epochs", str(epochs), *TRAIN_ARGS, "--out", str(reference)]) == 0
    assert strip_seconds(out / "bn" / "seed0" / "metrics.csv") == strip_seconds(reference / "metrics.csv")
    assert (out / "bn" / "seed0" / "predictions.csv").read_text() == (reference / "predictions.csv").read_text()


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return err.strip().splitlines()[-1]


def test_a_cluster_without_the_resources_asked_for_is_one_line(cluster, data_dir, tmp_path, capsys):
    argv = ["sweep", "--data-dir", str(data_dir), "--norms", "bn", "--epochs", "1", *TRAIN_ARGS, "--out", str(tmp_path / "s"),
            "--ray", cluster["address"]]
    assert main([*argv, "--ray-gpus", "0.5"]) == 2
    assert error_line(capsys).startswith(f"normlab: error: no node of the Ray cluster at {cluster['address']} has 1 CPU(s) and "
                                         "0.5 GPU(s) for a model (its nodes: 2 CPUs, 0 GPUs)")
    assert main([*argv, "--ray-cpus", "3"]) == 2
    assert "has 3 CPU(s) and 0 GPU(s)" in error_line(capsys)
    assert not ray.is_initialized() and not (tmp_path / "s" / "bn").exists()


def test_an_unreachable_cluster_is_one_line_at_once(data_dir, tmp_path, capsys):
    port = free_port()  # nothing listens there
    started = time.monotonic()
    assert main(["sweep", "--data-dir", str(data_dir), "--norms", "bn", "--out", str(tmp_path / "s"), "--ray", f"127.0.0.1:{port}"]) == 2
    assert error_line(capsys).startswith(f"normlab: error: cannot reach a Ray cluster at 127.0.0.1:{port} (Connection refused); "
                                         "start one there with `ray start --head`")
    assert time.monotonic() - started < 15


def test_a_driver_without_the_token_is_refused_in_one_line(cluster, data_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}  # Ray's default mode, no token
    env.update(HOME=str(tmp_path), RAY_gcs_server_port_wait_time_s="2")  # no ~/.ray/auth_token; Ray's connect tries 2 s, not 20
    done = subprocess.run([sys.executable, "-m", "normlab.cli", "sweep", "--data-dir", str(data_dir), "--norms", "bn", "--out",
                           str(tmp_path / "s"), "--ray", cluster["address"]], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(
        f"normlab: error: the Ray cluster at {cluster['address']} refused normlab's connection: it uses token authentication")
