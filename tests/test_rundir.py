"""rundir.py: atomic writes, the typed results.json record (this version's and earlier ones'), the folder
layout and the command that trains a folder again."""
import json
import shlex
from pathlib import Path

import pytest
import torch

from normlab import rundir as R
from normlab.cli import build_parser, config_from
from normlab.config import Config
from normlab.device import Runtime
from normlab.errors import ReportError, UsageError


def test_atomic_save_keeps_old_file_on_a_crash(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    R.atomic_save({"epoch": 1}, path)

    def dying_save(obj, f):
        open(f, "wb").write(b"half a checkp")  # killed while writing
        raise KeyboardInterrupt

    monkeypatch.setattr(R.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        R.atomic_save({"epoch": 2}, path)
    monkeypatch.undo()
    assert torch.load(path)["epoch"] == 1


# ---------------------------------------------------------------- results.json: the typed record
def _results(**changes) -> R.Results:
    fields = dict(norm="gn", norm_name="Group Normalization", params=47_978, param_budget=50_000, epochs=2, over_epoch_limit=False,
                  seed=0, train_acc_running=0.5, train_acc_clean=0.55, val_acc=None, seconds_per_epoch=3.0, compile_seconds=None,
                  version="1.0.0", torch="2.14.1", data_dir="/data", test_acc=0.5, test_acc_flip_tta=0.52, device="cpu", precision="fp32",
                  channels_last=False, compile=False, threads=2, wall_seconds=9.0, peak_rss_mib=800.0)
    return R.Results(**{**fields, **changes})


def _metrics(seconds) -> list[dict]:
    return [{"epoch": i + 1, "lr": 0.1, "train_loss": 1.0, "train_acc": 0.5, "seconds": s} for i, s in enumerate(seconds)]


def test_results_are_written_as_results_json_always_was_and_read_back(tmp_path):
    """The keys in results.json's order; the ones that only some runs have (test, CUDA, threads) only where they hold a
    value, the others as null; read back the same record."""
    rd = R.RunDir(tmp_path)
    rd.write_metrics(_metrics([2.0, 3.0, 9.0]))
    results = _results()
    rd.write_results(results)
    saved = json.loads((tmp_path / R.RESULTS).read_text())
    assert list(saved) == ["norm", "norm_name", "params", "param_budget", "epochs", "over_epoch_limit", "seed", "train_acc_running",
                           "train_acc_clean", "val_acc", "seconds_per_epoch", "compile_seconds", "version", "torch", "data_dir", "test_acc",
                           "test_acc_flip_tta", "device", "precision", "channels_last", "compile", "threads", "wall_seconds", "peak_rss_mib"]
    assert saved["val_acc"] is None and "gpu_peak_mib" not in saved and "cuda_graphs" not in saved
    assert rd.read_results() == results
    assert "test_acc" not in _results(test_acc=None, test_acc_flip_tta=None).to_dict()


def test_results_json_of_an_earlier_version_is_read(tmp_path):
    """An old folder: no normlab version, compile_seconds, wall time, torch or data folder, a key this version does not
    know, the mean seconds per epoch: read with None there, the unknown key kept, the median of metrics.csv's seconds."""
    rd = R.RunDir(tmp_path)
    rd.write_metrics(_metrics([2.0, 3.0, 9.0]))
    old = {"norm": "bn", "params": 47_978, "epochs": 3, "train_acc_running": 0.6, "train_acc_clean": 0.7, "test_acc": 0.65,
           "seconds_per_epoch": 4.6667, "device": "cpu", "precision": "fp32", "mean_seconds": 4.6667}
    (tmp_path / R.RESULTS).write_text(json.dumps(old))
    results = rd.read_results()
    assert (results.norm, results.params, results.epochs, results.test_acc) == ("bn", 47_978, 3, 0.65)
    assert results.version is results.wall_seconds is results.compile_seconds is results.torch is results.data_dir is None
    assert results.seconds_per_epoch == 3.0 and results.extra == {"mean_seconds": 4.6667}
    assert results.to_dict()["mean_seconds"] == 4.6667


def test_a_results_json_that_is_not_a_record_is_one_report_error(tmp_path):
    rd = R.RunDir(tmp_path)
    rd.write_metrics(_metrics([1.0]))
    (tmp_path / R.RESULTS).write_text(json.dumps({"accuracy": 0.9}))
    with pytest.raises(ReportError, match="is not a normlab results.json"):
        rd.read_results()


# ---------------------------------------------------------------- a folder in the way
def test_a_folder_that_holds_a_run_is_refused_with_one_error_type(tmp_path):
    rd = R.RunDir(tmp_path / "m")
    rd.check_free("normlab train --out m --resume")  # empty: free
    rd.path.mkdir()
    R.atomic_save({"epoch": 1}, rd / R.CHECKPOINT)
    with pytest.raises(UsageError, match="holds an unfinished run; continue it with: normlab train --out m --resume$"):
        rd.check_free("normlab train --out m --resume")
    rd.write_results(_results())
    with pytest.raises(UsageError, match="already holds a finished run; use --resume"):
        rd.check_free("")


def test_an_unwritable_output_folder_is_a_usage_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(UsageError, match="cannot write to output folder .*; choose another with --out"):
        R.check_writable(tmp_path / "file" / "run")


# ---------------------------------------------------------------- the command that trains it again
def test_the_command_gives_the_settings_data_and_runtime_back(tmp_path):
    cfg = Config(norm="gn", epochs=3, lr=0.1, flip=False)
    line = R.command("train", tmp_path / "my run", cfg, data_dir=tmp_path / "data", runtime=Runtime(threads=1, precision="bf16"),
                     resume=True)
    assert line.startswith("normlab train --data-dir ") and line.endswith(f"--out '{tmp_path / 'my run'}' --resume")
    args = build_parser().parse_args(shlex.split(line)[1:])
    assert config_from(args) == cfg and (args.threads, args.precision, args.out, args.resume) == (1, "bf16", str(tmp_path / "my run"), "")
    run = R.command("run", tmp_path, cfg, ("bn", "ln"), seeds=3, first_seed=2)
    args = build_parser().parse_args(shlex.split(run)[1:])
    assert (args.norms, args.seeds, args.seed, args.data_dir, args.resume) == ("bn,ln", 3, 2, None, False)


def test_model_and_cell_folders():
    assert R.model_folder(Path("p"), "bn", 3, 1) == Path("p/bn") and R.model_folder(Path("p"), "bn", 3, 2) == Path("p/bn/seed3")
    assert R.cell_folder(Path("p"), "gn", {"lr": 0.1, "widths": (8, 16, 8)}, 0) == Path("p/gn/lr=0.1/widths=8x16x8/seed0")
