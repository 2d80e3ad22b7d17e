"""sweepdir.py, manifest.py, sweeptables.py and normlab sweep without Ray: the folders, sweep.csv / sweep.md / the
figure and their rebuild by normlab report, paired differences, the manifest's command, resume, and a failed model that
leaves the others finished. The grid and the plan: test_plan.py; on Ray: test_cluster.py."""
import csv
import json
import shlex
import shutil
import sys
from pathlib import Path

import pytest

import normlab
from conftest import DEVICE, EXACT, make_cifar, one_error_line
from normlab.cli import build_parser, config_from, main
from normlab.config import Config
from normlab.manifest import MANIFEST, Manifest, read_manifest, write_manifest
from normlab.plan import parse_grid
from normlab.rundir import shown_path
from normlab.sweepdir import COLUMNS, REPORT, TABLE, SweepResult
from normlab.sweeptables import log_x, paired_differences, paired_table, results_table, sweep_figure

TRAIN_ARGS = ["--epochs", "1", "--batch-size", "50", "--threads", "1", "--device", DEVICE, *EXACT]
GRID = ["--norms", "bn,gn", "--grid", "lr=0.05,0.1", "--grid", "groups=4,8", "--seeds", "2"]


def sweep_argv(data_dir: Path, out: Path, *extra: str, grid=GRID) -> list[str]:
    return ["sweep", "--data-dir", str(data_dir), *grid, *TRAIN_ARGS, "--out", str(out), *extra]


@pytest.fixture(scope="module")
def swept(data_dir, tmp_path_factory) -> Path:
    """bn and gn x lr 0.05, 0.1 x groups 4, 8 x seeds 0, 1: bn does not read groups, so 4 bn models and 8 gn ones."""
    out = tmp_path_factory.mktemp("swept") / "sweep"
    assert main(sweep_argv(data_dir, out)) == 0
    return out


# ---------------------------------------------------------------- the grid


# ---------------------------------------------------------------- a sweep end to end
def test_sweep_writes_a_folder_per_model_and_the_table(swept):
    manifest = read_manifest(swept)
    assert manifest.norms == ("bn", "gn") and manifest.grid == {"lr": (0.05, 0.1), "groups": (4, 8)} and manifest.seeds == 2
    models = manifest.models(swept)
    assert len(models) == 2 * (2 + 4)
    assert {f.relative_to(swept).as_posix() for *_, f in models} >= {"bn/lr=0.05/seed0", "gn/lr=0.1/groups=8/seed1"}
    assert all((f / "results.json").is_file() for *_, f in models)
    assert not (swept / "bn" / "lr=0.05" / "groups=4").exists()  # bn does not read groups: no folder per value

    with open(swept / TABLE, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == COLUMNS and len(rows) == len(models)
    settings = [f for f in Config.__dataclass_fields__ if f not in ("norm", "seed")]
    assert set(settings) <= set(COLUMNS)  # every setting is a column
    for row, (norm, cell, seed, folder) in zip(rows, models):
        cfg = Config.load(folder / "config.json")
        results = json.loads((folder / "results.json").read_text())
        assert row["folder"] == folder.relative_to(swept).as_posix() and row["status"] == "finished"
        assert (row["norm"], int(row["seed"]), float(row["lr"]), int(row["groups"])) == (norm, seed, cfg.lr, cfg.groups)
        assert all(getattr(cfg, k) == v for k, v in cell.items())
        assert float(row["test_acc"]) == pytest.approx(results["test_acc"], abs=1e-6)
        assert float(row["wall_seconds"]) > 0 and float(row["seconds_per_epoch"]) > 0 and row["device"] == results["device"]
    assert {r["groups"] for r in rows if r["norm"] == "bn"} == {"8"}  # the base value


def test_sweep_report_table_figures_and_command(swept, data_dir):
    text = (swept / REPORT).read_text()
    assert "| model | lr | groups | seeds |" in text
    assert "| Batch Normalization (bn) | 0.05 | 8 (not read) | 2/2 |" in text
    assert "Batch Normalization (bn) does not read groups: trained once at groups=8." in text
    assert "## Paired differences" in text and "| Group Normalization (gn) | groups 8 vs 4, at lr=0.05 | 0, 1 |" in text
    for key in ("lr", "groups"):
        assert f"(figures/sweep_{key}.png)" in text and (swept / "figures" / f"sweep_{key}.png").stat().st_size > 5000
    command = text.split("```sh\n", 1)[1].split("\n", 1)[0]
    assert command == (f"normlab sweep --data-dir {shown_path(data_dir.resolve())} --norms bn,gn --grid lr=0.05,0.1 --grid groups=4,8 "
                       f"--epochs 1 --batch-size 50 --seeds 2 --out {swept}")
    args = build_parser().parse_args(shlex.split(command)[1:])  # the command gives the same settings and grid
    assert config_from(args) == Config(epochs=1, batch_size=50) and parse_grid(args.grid) == read_manifest(swept).grid


def test_sweep_report_names_the_versions_that_trained_it_and_wrote_it(swept, tmp_path):
    """sweep.md names this normlab and the one(s) in the models' results.json; a model without it ("before 1.0.0")
    shows beside the others, with the number of models of each, in the order of the models."""
    assert f"Trained by normlab {normlab.__version__}; this page written by normlab {normlab.__version__}." in (swept / REPORT).read_text()
    copy = tmp_path / "copy"
    shutil.copytree(swept, copy)
    old = copy / "bn" / "lr=0.05" / "seed0" / "results.json"
    old.write_text(json.dumps({k: v for k, v in json.loads(old.read_text()).items() if k != "version"}))
    assert main(["report", str(copy)]) == 0
    text = (copy / REPORT).read_text()
    assert f"Trained by normlab before 1.0.0 (1 model), {normlab.__version__} (11 models); this page written by" in text


def test_report_rebuilds_the_sweep_files(swept, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(swept, copy)
    table = (copy / TABLE).read_text()
    for name in (TABLE, REPORT):
        (copy / name).unlink()
    shutil.rmtree(copy / "figures")
    assert main(["report", str(copy)]) == 0  # no data folder needed: a sweep's report is from its files only
    assert (copy / TABLE).read_text() == table
    assert (copy / REPORT).is_file() and (copy / "figures" / "sweep_lr.png").is_file()
    result = normlab.load(copy)
    assert isinstance(result, SweepResult) and result.unfinished == [] and len(result.rows) == 12
    assert result.plot("groups").axes[0].get_xlabel() == "groups (group norm)"  # the setting's label, in words


def test_a_sweep_model_is_the_model_train_makes(swept, data_dir, tmp_path):
    out = tmp_path / "one"
    assert main(["train", "--data-dir", str(data_dir), "--norm", "gn", "--lr", "0.1", "--groups", "4", "--seed", "1", *TRAIN_ARGS,
                 "--out", str(out)]) == 0
    cell = swept / "gn" / "lr=0.1" / "groups=4" / "seed1"
    assert (cell / "predictions.csv").read_text() == (out / "predictions.csv").read_text()


def test_figure_log_axis_and_flat_band_for_a_norm_that_does_not_read_the_setting():
    assert log_x([2, 4, 8, 16, 32, 128]) and log_x([1e-3, 1e-2]) and not log_x([0.05, 0.1]) and not log_x([0, 8, 32])
    assert not log_x(["relu", "gelu"]) and not log_x([True, False])
    manifest = Manifest.sweep(Config(), ("bn", "gn"), parse_grid(["norm_batch=2,8,32"]), 2, 0)
    rows = []
    for norm, cell, seed, folder in manifest.models(Path("s")):
        rows.append({"norm": norm, "seed": seed, "status": "finished", "cell": cell, "test_acc": 0.5 + 0.01 * seed,
                     "val_acc": None, **{k: v for k, v in cell.items()}})
    fig = sweep_figure(manifest, rows, "norm_batch")
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["Batch Normalization (bn)", "Group Normalization (gn)"]
    flat = [line for line in ax.get_lines() if line.get_label().startswith("Group")][0]
    assert list(flat.get_ydata()) == [pytest.approx(50.5)] * 2  # a horizontal line at gn's mean over seeds


def test_paired_differences_pair_each_value_with_the_first_seed_by_seed():
    manifest = Manifest.sweep(Config(), ("bn", "gn"), parse_grid(["identity_init=False,True", "norm_batch=0,8"]), 3, 0)
    acc = {  # (norm, identity_init, norm_batch) -> validation accuracy per seed
        ("bn", False, 0): [0.80, 0.81, 0.79], ("bn", True, 0): [0.82, 0.83, 0.80],
        ("bn", False, 8): [0.78, 0.79, 0.77], ("bn", True, 8): [0.77, 0.80, 0.77],
        ("gn", False, None): [0.70, 0.72, 0.71], ("gn", True, None): [0.71, None, 0.70]}
    rows = []
    for norm, cell, seed, folder in manifest.models(Path("s")):
        v = acc[(norm, cell["identity_init"], cell.get("norm_batch"))][seed]
        rows.append({"norm": norm, "seed": seed, "status": "finished" if v is not None else "unfinished", "cell": cell,
                     "val_acc": v, "test_acc": None})
    by = {(d["norm"], d["setting"], d["other"]): d for d in paired_differences(manifest, rows)}
    assert set(by) == {("gn", "norm", "identity_init=False, norm_batch=0"), ("gn", "norm", "identity_init=True, norm_batch=0"),
                       ("bn", "identity_init", "norm_batch=0"), ("bn", "identity_init", "norm_batch=8"),
                       ("bn", "norm_batch", "identity_init=False"), ("bn", "norm_batch", "identity_init=True"), ("gn", "identity_init", "")}
    # each norm against the first (bn) at the settings both read, bn at its own base value of the rest (norm_batch 0)
    d = by[("gn", "norm", "identity_init=False, norm_batch=0")]
    assert d["value"] == "gn" and d["baseline"] == "bn" and d["diffs"] == pytest.approx([-10, -9, -8]) and d["spread"] == pytest.approx(1)
    assert by[("gn", "norm", "identity_init=True, norm_batch=0")]["seeds"] == [0, 2]
    d = by[("bn", "identity_init", "norm_batch=0")]
    assert d["seeds"] == [0, 1, 2] and d["diffs"] == pytest.approx([2, 2, 1]) and d["mean"] == pytest.approx(5 / 3)
    assert d["spread"] == pytest.approx(0.57735, abs=1e-4)
    assert by[("gn", "identity_init", "")]["seeds"] == [0, 2]  # seed 1 unfinished on one side: not paired
    assert by[("bn", "norm_batch", "identity_init=True")]["diffs"] == pytest.approx([-5, -3, -3])
    table = paired_table(paired_differences(manifest, rows), "val_acc").splitlines()
    assert "validation acc difference" in table[0]
    row = next(line for line in table if "identity_init True vs False, at norm_batch=0" in line)
    assert "+2.00, +2.00, +1.00" in row and "+1.67" in row and row.rstrip(" |").endswith("better")
    row = next(line for line in table if "identity_init True vs False, at norm_batch=8" in line)
    assert row.rstrip(" |").endswith("no")  # -1, +1, 0: no mean gain
    row = next(line for line in table if "norm_batch 8 vs 0 (whole batch), at identity_init=True" in line)
    assert "-5.00, -3.00, -3.00" in row and row.rstrip(" |").endswith("worse")  # a mean loss beyond the spread
    assert any("| gn vs bn, at identity_init=False, norm_batch=0 | 0, 1, 2 | -10.00, -9.00, -8.00 |" in line for line in table)


def test_paired_differences_name_each_cell_of_a_norm_compared_with_a_first_norm_that_reads_less():
    """gn first: each bn cell against gn, one row per bn cell, told apart by the settings only bn reads."""
    manifest = Manifest.sweep(Config(), ("gn", "bn"), parse_grid(["norm_batch=0,8"]), 2, 0)
    acc = {("gn", None): [0.70, 0.71], ("bn", 0): [0.75, 0.77], ("bn", 8): [0.74, 0.73]}
    rows = [{"norm": norm, "seed": seed, "status": "finished", "cell": cell, "test_acc": acc[(norm, cell.get("norm_batch"))][seed],
             "val_acc": None} for norm, cell, seed, _ in manifest.models(Path("s"))]
    by = {d["other"]: d for d in paired_differences(manifest, rows) if d["setting"] == "norm"}
    assert set(by) == {"norm_batch=0", "norm_batch=8"} and all(d["norm"] == "bn" and d["baseline"] == "gn" for d in by.values())
    assert by["norm_batch=0"]["diffs"] == pytest.approx([5, 6]) and by["norm_batch=8"]["diffs"] == pytest.approx([4, 2])


def test_results_table_gives_each_seed_beside_the_mean():
    manifest = Manifest.sweep(Config(), ("bn",), parse_grid(["norm_batch=2,8"]), 3, 0)
    acc = {2: [0.8012, None, 0.7950], 8: [0.85, 0.86, 0.8725]}  # norm_batch -> test accuracy per seed (None: unfinished)
    rows = [{"norm": norm, "seed": seed, "cell": cell, "norm_batch": cell["norm_batch"], "test_acc": acc[cell["norm_batch"]][seed],
             "status": "finished" if acc[cell["norm_batch"]][seed] is not None else "unfinished", "val_acc": None,
             "train_acc_clean": 0.9, "seconds_per_epoch": 30.0, "wall_seconds": 600.0, "device": "cpu", "precision": "fp32"}
            for norm, cell, seed, folder in manifest.models(Path("s"))]
    table = results_table(manifest, rows).splitlines()
    assert "test acc per seed (0, 1, 2)" in table[0]
    row2, row8 = (next(line for line in table if line.startswith(f"| Batch Normalization (bn) | {n} |")) for n in (2, 8))
    assert "| 80.12%, –, 79.50% |" in row2 and "2/3" in row2 and "79.81 ± 0.44%" in row2
    assert "| 85.00%, 86.00%, 87.25% |" in row8 and "86.08 ± 1.13%" in row8
    one_seed = Manifest.sweep(Config(), ("bn",), parse_grid(["norm_batch=2,8"]), 1, 0)
    assert "acc per seed" not in results_table(one_seed, [r for r in rows if r["seed"] == 0])  # one seed: the mean is the seed


# ---------------------------------------------------------------- resume, refusal, failures
def test_sweep_refuses_finished_models_without_resume_and_skips_them_with_it(swept, data_dir, capsys):
    before = {p: p.stat().st_mtime_ns for p in swept.rglob("results.json")}
    assert main(sweep_argv(data_dir, swept)) == 2
    assert "already holds a finished run; use --resume" in one_error_line(capsys)
    assert main(sweep_argv(data_dir, swept, "--resume")) == 0
    assert "12 models, 12 finished earlier, 0 to train" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in swept.rglob("results.json")} == before  # nothing trained again
    assert main(sweep_argv(data_dir, swept, "--resume", "--label-smoothing", "0.2")) == 2
    assert "was trained with other settings: label_smoothing 0.1 (asked: 0.2)" in one_error_line(capsys)


def test_an_interrupted_model_resumes_and_another_sweep_is_refused(swept, data_dir, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(swept, out)
    cell = out / "gn" / "lr=0.05" / "groups=8" / "seed0"
    (cell / "results.json").unlink()  # as if it stopped after its last epoch's checkpoint
    alone = tmp_path / "alone" / cell.relative_to(out)
    shutil.copytree(cell, alone)
    assert main(sweep_argv(data_dir, tmp_path / "alone")) == 2
    err = one_error_line(capsys)
    assert f"{alone} holds an unfinished run; continue it with: normlab sweep" in err and err.endswith("--resume")
    assert main(sweep_argv(data_dir, out, "--resume")) == 0
    printed = capsys.readouterr().out
    assert "11 finished earlier, 1 to train" in printed and f"resuming {cell} after epoch 1 of 1" in printed
    assert (cell / "results.json").is_file()
    # A different grid into the same folder without --resume: another sweep, refused before anything trains
    assert main(sweep_argv(data_dir, out, grid=["--norms", "ln", "--grid", "lr=0.2"])) == 2
    assert "already holds another sweep (sweep.json); use --resume" in one_error_line(capsys)
    assert not (out / "ln").exists()


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_a_failed_model_is_reported_and_the_others_finish(data_dir, tmp_path, capfd, jobs):
    out = tmp_path / "s"
    (out / "gn" / "groups=4").mkdir(parents=True)
    (out / "gn" / "groups=4" / "seed0").write_text("a file where a model's folder should be")
    rc = main(sweep_argv(data_dir, out, "--jobs", jobs, grid=["--norms", "bn,gn", "--grid", "groups=4,8"]))
    assert rc == 2
    err = capfd.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("normlab: error: 1 of the 3 models of the sweep failed: gn/groups=4/seed0 (cannot write to output folder")
    assert "once the cause is fixed, train the failed ones with: normlab sweep" in err and "--resume" in err
    assert (out / "bn" / "seed0" / "results.json").is_file() and (out / "gn" / "groups=8" / "seed0" / "results.json").is_file()
    with open(out / TABLE, newline="") as f:
        status = {r["folder"]: r["status"] for r in csv.DictReader(f)}
    assert status == {"bn/seed0": "finished", "gn/groups=4/seed0": "not started", "gn/groups=8/seed0": "finished"}
    assert "**Not finished (1):** `gn/groups=4/seed0`" in (out / REPORT).read_text()


def test_sweep_api_takes_a_grid_dict_and_returns_the_result(data_dir, tmp_path):
    result = normlab.sweep(data_dir=data_dir, out=tmp_path / "api", norms=["ln"], grid={"label_smoothing": [0.0, 0.1]},
                           epochs=1, batch_size=50, threads=1, device=DEVICE, log=lambda m: None)
    assert [r["folder"] for r in result.rows] == ["ln/label_smoothing=0.0/seed0", "ln/label_smoothing=0.1/seed0"]
    assert result.report == tmp_path / "api" / REPORT and "| Layer Normalization (ln) | 0.0 |" in result.table()


# ---------------------------------------------------------------- bad input: one line, exit 2, nothing written
@pytest.mark.parametrize("extra, needle", [
    (["--grid", "nope=1"], "--grid: unknown setting 'nope'"),
    (["--grid", "groups=four"], "'four' is not a value of groups"),
    (["--norms", "bn,xn"], "unknown norm 'xn'"),
    (["--seeds", "0"], "--seeds must be at least 1"),
    (["--ray", "not an address"], "--ray must be auto, local or HOST:PORT"),
    (["--ray", "ray://head:10001"], "--ray must be auto, local or HOST:PORT"),
    (["--ray", "auto", "--jobs", "2"], "--jobs is for local runs"),
    (["--ray", "auto", "--ray-gpus", "1.5"], "--ray-gpus must be 0, a fraction of one GPU"),
    (["--ray", "auto", "--ray-cpus", "0"], "--ray-cpus must be above 0"),
])
def test_bad_sweep_input_is_one_line(data_dir, tmp_path, capsys, extra, needle):
    out = tmp_path / "s"
    assert main(sweep_argv(data_dir, out, *extra, grid=["--norms", "bn"])) == 2
    assert needle in one_error_line(capsys)
    assert not out.exists()


def test_ray_without_the_extra_names_it(data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError, as where it is not installed
    out = tmp_path / "s"
    assert main(sweep_argv(data_dir, out, "--ray", "auto", grid=["--norms", "bn"])) == 2
    assert one_error_line(capsys) == "normlab: error: --ray needs Ray, an optional extra of normlab: pip install 'normlab[ray]'"
    assert not (out / MANIFEST).exists()


def test_manifest_command_names_the_data_and_quotes_the_folders(tmp_path):
    manifest = Manifest.sweep(Config(epochs=2), ("bn",), {"lr": (0.05, 0.1)}, 1, 0)
    out, data = tmp_path / "my sweep", tmp_path / "cifar data"
    command = manifest.command(out, data)
    assert command == f"normlab sweep --data-dir '{data}' --norms bn --grid lr=0.05,0.1 --epochs 2 --out '{out}'"
    args = build_parser().parse_args(shlex.split(command)[1:])
    assert (args.data_dir, args.out) == (str(data), str(out))
    assert "--data-dir" not in manifest.command(out)  # not known: the command leaves it to $NORMLAB_DATA or ./data


# ---------------------------------------------------------------- records are enough: resume and report without heavy files
HEAVY = ("checkpoint.pt", "model.pt", "predictions.csv")


def strip_heavy(folder: Path) -> None:
    for name in HEAVY:
        for p in folder.rglob(name):
            p.unlink()


def test_a_sweep_of_records_only_resumes_training_nothing_and_reports_the_same_table(swept, data_dir, tmp_path, capsys):
    copy = tmp_path / "records"
    shutil.copytree(swept, copy)
    strip_heavy(copy)
    table = (copy / TABLE).read_text()
    before = {p: p.stat().st_mtime_ns for p in copy.rglob("results.json")}
    assert main(sweep_argv(data_dir, copy, "--resume")) == 0
    assert "12 models, 12 finished earlier, 0 to train" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in copy.rglob("results.json")} == before and not list(copy.rglob("model.pt"))
    for name in (TABLE, REPORT):
        (copy / name).unlink()
    shutil.rmtree(copy / "figures")
    assert main(["report", str(copy)]) == 0
    assert (copy / TABLE).read_text() == table
    assert (copy / "figures" / "sweep_lr.png").is_file() and "| Group Normalization (gn) | 0.05 | 4 | 2/2 |" in (copy / REPORT).read_text()


def test_an_unfinished_model_without_its_checkpoint_trains_afresh_and_the_data_may_lie_elsewhere(swept, data_dir, tmp_path, capsys):
    copy = tmp_path / "records"
    shutil.copytree(swept, copy)
    strip_heavy(copy)
    cell = copy / "gn" / "lr=0.1" / "groups=8" / "seed1"
    (cell / "results.json").unlink()  # config.json and metrics.csv stay: an unfinished model whose checkpoint was not kept
    for p in copy.rglob("data.json"):  # trained on another machine: its data folder is not here
        p.write_text(p.read_text().replace(str(data_dir.resolve()), "/elsewhere/cifar10"))
    resume = ["sweep", *GRID, *TRAIN_ARGS, "--out", str(copy), "--resume"]
    assert main(resume) == 2
    assert "trained on the CIFAR-10 of /elsewhere/cifar10, which this machine does not have; pass --data-dir" in one_error_line(capsys)
    moved = tmp_path / "here" / "cifar10"
    shutil.copytree(data_dir, moved)  # the same data at another path: its fingerprint is what counts
    assert main(["sweep", "--data-dir", str(moved), *resume[1:]]) == 0
    printed = capsys.readouterr().out
    assert "11 finished earlier, 1 to train" in printed
    assert f"{cell}: unfinished, with no checkpoint.pt to continue from: training it afresh" in printed
    assert (cell / "results.json").is_file()


def sweep_of(data_dir: Path, out: Path, *extra: str) -> Path:
    assert main(sweep_argv(data_dir, out, *extra, grid=["--norms", "bn,ln", "--grid", "norm_batch=4,0"])) == 0
    return out


def test_merge_two_folders_of_other_seeds_reports_them_as_one(data_dir, tmp_path, capsys):
    a = sweep_of(data_dir, tmp_path / "a")
    b = sweep_of(data_dir, tmp_path / "b", "--seed", "1")
    strip_heavy(b)  # records are enough to merge
    assert main(["merge", str(a), str(b), "--out", str(tmp_path / "ab")]) == 0
    assert "6 model folders copied" in capsys.readouterr().out
    merged = read_manifest(tmp_path / "ab")
    assert (merged.seeds, merged.first_seed) == (2, 0) and merged.parts == read_manifest(a).parts
    with open(tmp_path / "ab" / TABLE, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["folder"], r["status"]) for r in rows] == [(f, "finished") for f in
                                                          ("bn/norm_batch=4/seed0", "bn/norm_batch=0/seed0", "ln/seed0",
                                                           "bn/norm_batch=4/seed1", "bn/norm_batch=0/seed1", "ln/seed1")]
    assert "| Layer Normalization (ln) | 0 (not read) | 2/2 |" in (tmp_path / "ab" / REPORT).read_text()
    # Into one of them, in place: the other's models join it
    assert main(["merge", str(b), "--out", str(a)]) == 0
    assert read_manifest(a) == merged and (a / "ln" / "seed1" / "results.json").is_file()


def test_merge_refuses_other_base_settings_other_data_and_a_gap_in_the_seeds(data_dir, tmp_path, capsys):
    a = sweep_of(data_dir, tmp_path / "a")
    other = tmp_path / "other"
    shutil.copytree(a, other)
    manifest = read_manifest(a)
    (other / MANIFEST).write_text(json.dumps(Manifest(Config(epochs=1, batch_size=50, label_smoothing=0.2), manifest.parts, 1, 0).to_dict()))
    assert main(["merge", str(a), str(other), "--out", str(tmp_path / "m")]) == 2
    assert "holds a sweep of other base settings: label_smoothing 0.1 (and 0.2)" in one_error_line(capsys)
    (other / MANIFEST).write_text(json.dumps(Manifest(manifest.base, manifest.parts, 1, 2).to_dict()))
    assert main(["merge", str(a), str(other), "--out", str(tmp_path / "m")]) == 2
    assert "seeds 0, 2 leave a gap" in one_error_line(capsys)
    c = sweep_of(make_cifar(tmp_path / "data2", seed=1), tmp_path / "c", "--seed", "1")
    assert main(["merge", str(a), str(c), "--out", str(tmp_path / "m")]) == 2
    assert "was trained on other data than" in one_error_line(capsys)
    assert not (tmp_path / "m").exists()


def test_a_resumed_sweep_with_more_cells_grows_into_the_union(tmp_path):
    from normlab.errors import UsageError

    first = Manifest.sweep(Config(epochs=1), ("bn",), parse_grid(["norm_batch=2,8"]), 1, 0)
    more = Manifest.sweep(Config(epochs=1), ("frn",), {}, 2, 0)
    write_manifest(tmp_path, first, resume=False)
    with pytest.raises(UsageError, match="already holds another sweep"):
        write_manifest(tmp_path, more, resume=False)
    write_manifest(tmp_path, more, resume=True)
    grown = read_manifest(tmp_path)
    assert grown.cells() == [("bn", {"norm_batch": 2}), ("bn", {"norm_batch": 8}), ("frn", {})] and grown.seeds == 2
    assert grown.command(Path("out")).splitlines() == [
        "normlab sweep --norms bn --grid norm_batch=2,8 --epochs 1 --seeds 2 --out out --resume",
        "normlab sweep --norms frn --epochs 1 --seeds 2 --out out --resume"]
    with pytest.raises(UsageError, match="other base settings: epochs 1 \\(and 2\\)"):
        write_manifest(tmp_path, Manifest.sweep(Config(epochs=2), ("bn",), {}, 1, 0), resume=True)
