"""studies.py and normlab study: the study's cells (a union of rectangles no --grid can express), their order
(seed 0 of every cell first), the command that trains it again, and the study end to end on small data."""
import shlex

from conftest import DEVICE, EXACT
from normlab import studies
from normlab.cli import build_parser, config_from, main
from normlab.config import Config
from normlab.plan import NEW, plan_cells
from normlab.manifest import MANIFEST, Manifest, read_manifest
from normlab.sweepdir import REPORT


def test_the_study_has_its_cells_once_each_seed_by_seed(tmp_path):
    manifest = Manifest(Config(), studies.parts(), studies.SEEDS, 0)
    cells = manifest.cells()
    by_norm = {n: [c for m, c in cells if m == n] for n in dict.fromkeys(m for m, _ in cells)}
    assert [c["norm_batch"] for c in by_norm["bn"] if "precise_bn" not in c] == [0, 2, 4, 8, 16, 32]
    assert [c for c in by_norm["bn"] if "precise_bn" in c] == [{"norm_batch": 2, "precise_bn": 0}, {"norm_batch": 4, "precise_bn": 0}]
    assert [c["norm_batch"] for c in by_norm["brn"]] == [2, 4, 8, 32]
    assert all(by_norm[n] == [{}] for n in ("gn", "ln", "in", "none", "frn"))
    jobs = plan_cells(manifest.base, cells, manifest.seeds, 0, tmp_path, False, "hint")  # every cell's settings are valid
    assert len(jobs) == 51 and all(j.action == NEW for j in jobs)
    assert [j.cfg.seed for j in jobs] == [0] * 17 + [1] * 17 + [2] * 17  # seed 0 of every cell first: partial results compare
    assert jobs[-1].out == tmp_path / "bn" / "norm_batch=4" / "precise_bn=0" / "seed2" and jobs[-1].cfg.precise_bn == 0
    assert jobs[0].cfg == Config(norm="bn")  # bn at the whole batch is the default model


def test_the_study_command_gives_the_study_again(tmp_path):
    manifest = Manifest(Config(epochs=10), studies.parts(), 3, 0)
    command = manifest.command(tmp_path / "v2", tmp_path / "data")
    assert command == f"normlab study --data-dir {tmp_path / 'data'} --epochs 10 --out {tmp_path / 'v2'}"  # 3 seeds: the default
    args = build_parser().parse_args(shlex.split(command)[1:])
    assert config_from(args) == Config(epochs=10) and args.seeds == 3
    assert "--seeds 1 --seed 1" in Manifest(Config(), studies.parts(), 1, 1).command(tmp_path)


def test_normlab_study_trains_every_cell_into_one_sweep_and_resumes(cifar_dir, tmp_path, capsys):
    out = tmp_path / "study"
    argv = ["study", "--data-dir", str(cifar_dir), "--epochs", "1", "--batch-size", "100", "--precise-bn", "100", "--seeds", "1",
            "--threads", "1", "--device", DEVICE, *EXACT, "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"sweep into {out}: 17 models, 0 finished earlier, 17 to train" in printed
    assert read_manifest(out).parts == studies.parts() and (out / MANIFEST).is_file()
    report = (out / REPORT).read_text()
    assert "normlab study --data-dir" in report and "--seeds 1" in report and "17 finished" in report
    assert (out / "figures" / "sweep_norm_batch.png").is_file() and not (out / "figures" / "sweep_precise_bn.png").exists()
    assert "images per normalization statistic" in report
    assert main([*argv, "--resume"]) == 0
    assert "17 models, 17 finished earlier, 0 to train" in capsys.readouterr().out
