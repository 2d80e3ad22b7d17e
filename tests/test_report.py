"""normlab report: report.md and its figures from small synthetic runs; selection, receptive field
and error paths checked against hand-made cases."""
import json
import os
import re
import shlex
import shutil
from pathlib import Path

import matplotlib.image
import numpy as np

import normlab
import pytest
from torch import nn

from normlab.cli import build_parser, config_from, main
from normlab.config import Config
from normlab.models import Net, model_summary, receptive_field
from normlab.norms import DEFAULT_NORMS, NORMS
from normlab.errors import ReportError
from normlab.report import COMMAND_LEAD, select_misclassified, summary_table, write_report
from normlab.rundir import Results, find_runs, shown_path

TINY = ["--epochs", "1", "--batch-size", "32", "--threads", "1"]
# Results first: the table and the images it got wrong, then the curves, then the settings, then the rest.
SECTIONS = ["## Results", "## Misclassified test images", "## Training curves", "## Settings", "## Per-class test accuracy",
            "## Model summaries", "## Receptive field", "## Sample training images", "## Notes"]
FIGURES = [f"{kind}_{n}.png" for kind in ("misclassified", "curves", "confusion") for n in DEFAULT_NORMS] + ["curves_all.png", "samples.png"]


@pytest.fixture(scope="module")
def run_parent(data_dir, tmp_path_factory):
    """bn, gn and ln for one seed, one epoch each, as ``normlab run`` writes them."""
    parent = tmp_path_factory.mktemp("runs") / "x"
    assert main(["run", "--data-dir", str(data_dir), *TINY, "--out", str(parent), "--no-report"]) == 0
    return parent


@pytest.fixture(scope="module")
def report(run_parent):
    """report.md of ``run_parent``; the test images are found through results.json's data_dir alone."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NORMLAB_DATA", str(run_parent / "no-data-here"))
        mp.chdir(run_parent)  # and not ./data
        assert main(["report", str(run_parent)]) == 0
    return run_parent / "report.md"


def results(folder):
    return json.loads((folder / "results.json").read_text())


def test_report_writes_markdown_and_every_figure(report):
    text = report.read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    for name in FIGURES:
        assert f"figures/{name}" in links, name
    for link in links:
        assert (report.parent / link).is_file(), link  # relative links that resolve
    assert [line for line in text.splitlines() if line.startswith("## ")] == SECTIONS
    for norm in DEFAULT_NORMS:  # 5 rows x 2 columns of square tiles: a tall figure
        h, w, _ = matplotlib.image.imread(report.parent / "figures" / f"misclassified_{norm}.png").shape
        assert h > 2 * w


def test_report_states_the_accuracies_of_results_json(report, run_parent):
    text = report.read_text()
    for norm in DEFAULT_NORMS:
        r = results(run_parent / norm)
        row = next(line for line in text.splitlines() if line.startswith(f"| {NORMS[norm].label} ({norm}) |"))
        assert f"**{100 * r['test_acc']:.2f}%**" in row
        assert f"{100 * r['test_acc_flip_tta']:.2f}%" in row
        assert f"{r['params']:,}" in row
        assert "test acc < 70%" in row  # one epoch on noise is far below the prescribed floor
    assert "10 test images it got wrong with the highest predicted-class probability" in text


def test_report_leads_with_the_results_table_and_grids(report):
    """Before any heading: the title, what was trained, the versions and the command; then the results table, the
    three misclassified grids, the curves, and only then the settings table."""
    text = report.read_text()
    at = lambda s: text.index(s)
    assert at("Trained by normlab") < at(COMMAND_LEAD) < at("## Results") < at("| model | norm layer |")
    assert at("| model | norm layer |") < at("figures/misclassified_bn.png") < at("figures/misclassified_ln.png")
    assert at("figures/misclassified_ln.png") < at("figures/curves_all.png") < at("## Settings") < at("| setting | value |")
    assert at("| setting | value |") < at("## Per-class test accuracy")


def test_results_json_and_the_report_name_the_normlab_version(report, run_parent):
    for norm in DEFAULT_NORMS:
        assert results(run_parent / norm)["version"] == normlab.__version__
    assert f"Trained by normlab {normlab.__version__}; this report written by normlab {normlab.__version__}." in report.read_text()


def test_models_without_a_recorded_version_were_trained_before_1_0_0(tmp_path):
    """results.json of earlier versions names none: "before 1.0.0"; a mix names each version with its models."""
    from normlab.report import _header, trained_by
    from normlab.rundir import Run

    def run(seed, version):
        results = Results(norm="bn", params=1, epochs=1, version=version)
        return Run(tmp_path / f"seed{seed}", Config(norm="bn", seed=seed), results, [], None, None, None)

    assert trained_by([run(0, None), run(1, None)]) == "before 1.0.0"
    assert trained_by([run(0, "1.0.0"), run(1, None), run(2, "1.0.0")]) == "1.0.0 (bn seed 0, bn seed 2), before 1.0.0 (bn seed 1)"
    text = _header({"bn": [run(0, None)]}, tmp_path, False, tmp_path)
    assert f"Trained by normlab before 1.0.0; this report written by normlab {normlab.__version__}." in text


def test_report_command_reads_the_same_data_and_settings_again(report, run_parent, data_dir):
    """The report's "trains it again" line, parsed by normlab's own parser: the data folder the run read, its
    folder, and every model's settings but norm and seed (run_parent's settings differ from the defaults)."""
    text = report.read_text()
    line = text.split(f"{COMMAND_LEAD}\n\n```sh\n", 1)[1].split("\n```", 1)[0]
    argv = shlex.split(line)
    assert argv[:2] == ["normlab", "run"]
    args = build_parser().parse_args(argv[1:])
    assert Path(args.data_dir).resolve() == Path(data_dir).resolve()
    assert Path(args.out) == run_parent
    for norm in DEFAULT_NORMS:
        saved = Config.load(run_parent / norm / "config.json")
        assert config_from(args, norm=norm, seed=saved.seed) == saved


def test_select_misclassified_takes_the_most_confident_mistakes():
    rng = np.random.default_rng(0)
    n = 40
    probs = rng.dirichlet(np.ones(10), size=n)
    preds = probs.argmax(1)
    labels = preds.copy()
    wrong = np.arange(0, n, 2)  # every other image is a mistake
    labels[wrong] = (preds[wrong] + 1) % 10
    probs[3, preds[3]] = 0.999  # a confident correct answer must not be picked
    probs[[10, 4], preds[[10, 4]]] = 0.95  # a tie: the lower index comes first
    got = select_misclassified(labels, preds, probs, k=10)
    assert len(got) == 10 and len(set(got)) == 10
    assert all(labels[i] != preds[i] for i in got)
    conf = probs[np.arange(n), preds]
    expected = sorted(wrong, key=lambda i: (-conf[i], i))[:10]
    assert got == expected
    assert got[:2] == [4, 10]
    assert min(conf[got]) >= max(np.delete(conf[wrong], np.searchsorted(wrong, got)))
    assert select_misclassified(labels, preds, conf, k=10) == got  # (N,) confidences work too
    assert select_misclassified(labels[:4], preds[:4], probs[:4]) == [0, 2]  # fewer mistakes than k: all of them


def test_receptive_field_of_the_net_matches_hand_calculation():
    rows = {r["layer"]: r for r in receptive_field(Net("gn"))}
    expected = {"C1": (3, 1, 32), "C2": (5, 1, 32), "c3": (5, 1, 32), "P1": (6, 2, 16), "C3": (10, 2, 16), "C4": (14, 2, 16),
                "C5": (18, 2, 16), "c6": (18, 2, 16), "P2": (20, 4, 8), "C7": (28, 4, 8), "C8": (36, 4, 8), "C9": (44, 4, 8)}
    for name, (rf, jump, size) in expected.items():
        assert (rows[name]["rf"], rows[name]["jump"], rows[name]["size"]) == (rf, jump, size), name
    assert rows["GAP"]["global"] and rows["GAP"]["size"] == 1 and rows["GAP"]["kernel"] == 8
    assert rows["C10"]["global"]


def test_receptive_field_of_a_small_network():
    # conv3 p1 -> pool2 -> conv5 s2 p2 -> conv3 p0 on 32x32, by hand:
    # r: 1 -> 3 -> 3+1*1=4 -> 4+4*2=12 -> 12+2*4=20;  j: 1 -> 1 -> 2 -> 4 -> 4;  size: 32 -> 32 -> 16 -> 8 -> 6
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.MaxPool2d(2), nn.Conv2d(4, 4, 5, stride=2, padding=2), nn.Conv2d(4, 4, 3))
    got = [(r["rf"], r["jump"], r["size"]) for r in receptive_field(net)]
    assert got == [(3, 1, 32), (4, 2, 16), (12, 4, 8), (20, 4, 6)]


def test_model_summary_names_the_layers_as_the_spec():
    text = model_summary(Config(norm="gn"))
    for name in ("(C1)", "(C2)", "(c3)", "(P1)", "(c6)", "(P2)", "(C9)", "(GAP)", "(C10)", "GroupNorm"):
        assert name in text
    assert f"Trainable params: {sum(p.numel() for p in Net('gn').parameters()):,}" in text


def test_summary_table_has_one_row_per_model(run_parent):
    lines = summary_table(find_runs(run_parent)[0]).splitlines()
    assert [line.split()[0] for line in lines[1:]] == list(DEFAULT_NORMS)
    for line, norm in zip(lines[1:], DEFAULT_NORMS):
        assert f"{100 * results(run_parent / norm)['test_acc']:.2f}%" in line


def test_single_train_folder(run_parent, data_dir):
    path = write_report(run_parent / "bn", data_dir)  # a normlab run's bn/ is a normlab train folder
    text = path.read_text()
    assert f"normlab train --data-dir {data_dir} --norm bn" in text and "figures/misclassified_bn.png" in text
    assert (path.parent / "figures" / "misclassified_bn.png").is_file()


def test_the_data_folder_is_shown_relative_to_the_working_directory_when_near(run_parent, data_dir, tmp_path, monkeypatch):
    # The README runs from the project root with --data-dir ../shared/cifar10: a report says so, not the
    # absolute path of the machine that made it; a folder far away stays absolute.
    project = data_dir.parent / "project"  # beside the data folder
    project.mkdir(exist_ok=True)
    monkeypatch.chdir(project)
    assert shown_path(data_dir) == os.path.join(os.pardir, data_dir.name)
    text = write_report(run_parent / "bn", data_dir).read_text()
    assert f"normlab train --data-dir {os.path.join(os.pardir, data_dir.name)} --norm bn" in text
    assert f"the CIFAR-10 images in `{os.path.join(os.pardir, data_dir.name)}`" in text
    monkeypatch.chdir(data_dir.parent)
    assert shown_path(data_dir) == data_dir.name
    far = tmp_path / "a" / "b" / "c"
    far.mkdir(parents=True)
    monkeypatch.chdir(far)
    assert shown_path(data_dir) == str(data_dir)


def test_partial_run_is_an_error_that_names_what_is_missing(run_parent, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(run_parent, broken, ignore=shutil.ignore_patterns("figures", "report.md"))
    (broken / "gn" / "results.json").unlink()
    with pytest.raises(ReportError, match=r"gn has no results.json: the run did not finish; resume it with normlab run --out .*--resume"):
        find_runs(broken)
    assert main(["report", str(broken)]) == 2
    err = capsys.readouterr().err
    assert "gn has no results.json" in err and len(err.strip().splitlines()) == 1

    (broken / "gn" / "results.json").write_text((run_parent / "gn" / "results.json").read_text())
    (broken / "ln" / "predictions.csv").unlink()
    with pytest.raises(ReportError, match=r"ln has a test accuracy but no predictions.csv"):
        write_report(broken)


def test_missing_folder_or_data_is_exit_code_2(run_parent, tmp_path, capsys):
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "holds no normlab run" in capsys.readouterr().err
    assert main(["report", str(run_parent), "--data-dir", str(tmp_path / "empty")]) == 2
    assert "CIFAR-10" in capsys.readouterr().err


def test_several_seeds_give_mean_and_std(data_dir, tmp_path):
    parent = tmp_path / "seeds"
    assert main(["run", "--data-dir", str(data_dir), *TINY, "--norms", "bn", "--seeds", "2", "--out", str(parent), "--no-report"]) == 0
    accs = [results(parent / "bn" / f"seed{s}")["test_acc"] for s in (0, 1)]
    cell = f"{100 * np.mean(accs):.2f} ± {100 * np.std(accs, ddof=1):.2f}%"
    assert cell in normlab.load(parent).table()
    assert main(["report", str(parent), "--data-dir", str(data_dir)]) == 0
    text = (parent / "report.md").read_text()
    assert f"**{cell}**" in text
    for acc in accs:  # and the per-seed values
        assert f"{100 * acc:.2f}%" in text
    assert "--seeds 2" in text and "first seed" in text


def test_a_compiled_runs_first_step_is_stated_apart(tmp_path):
    """results.json's compile_seconds (a compiled network's first step, compilation included) gets its own note;
    a run without it (CPU, eager) gets none."""
    from normlab.report import _notes_section
    from normlab.rundir import Run

    def run(norm, compile_seconds):
        results = {"norm": norm, "params": 47_978, "epochs": 20, "train_acc_running": 0.9, "train_acc_clean": 0.9, "test_acc": 0.8,
                   "test_acc_flip_tta": 0.81, "seconds_per_epoch": 2.0, "device": "GPU", "precision": "bf16",
                   "compile_seconds": compile_seconds}
        return Run(tmp_path / norm, Config(norm=norm), Results.from_dict(results), [], None, None, None)

    text = _notes_section({"bn": [run("bn", 31.5)], "gn": [run("gn", 40.25)]}, tmp_path, tmp_path)
    assert "first training step, compilation included, took 31.5 s (bn), 40.2 s (gn)" in text
    assert "compilation" not in _notes_section({"bn": [run("bn", None)]}, tmp_path, tmp_path)


def test_the_settings_table_shows_seeds_that_differ(tmp_path):
    """A norm whose seeds were trained with different settings (or on different devices) shows each value with its
    seeds, not its first seed's value alone; settings all models share are shown once."""
    from normlab.report import _settings_section
    from normlab.rundir import Run

    def run(seed, muon_lr, precision):
        results = Results(norm="bn", params=1, epochs=1, device="cpu", precision=precision, threads=2, torch="2.14.1")
        return Run(tmp_path / f"seed{seed}", Config(norm="bn", seed=seed, muon_lr=muon_lr), results, [], None, None, None)

    text = _settings_section({"bn": [run(0, 0.05, "fp32"), run(1, 0.05, "fp32"), run(2, 0.0, "bf16")]})
    row = lambda label: next(line for line in text.splitlines() if line.startswith(f"| {label}"))
    assert "0.05 (seed 0, seed 1), 0.0 (seed 2)" in row("Muon's peak learning rate")
    assert "cpu, fp32, 2 threads (bn seed 0, bn seed 1), cpu, bf16, 2 threads (bn seed 2)" in row("device, precision")
    assert row("torch").split("|")[2].strip() == "2.14.1"
    assert row("batch size").split("|")[2].strip() == "128"


def test_the_settings_table_names_the_norms_that_do_not_read_a_setting(tmp_path):
    """A setting some norms ignore shows the value of those that read it and names the others: frn's TLU takes the
    activation's place, gn alone reads its groups; a setting no norm of the report reads says so."""
    from normlab.report import _settings_section
    from normlab.rundir import Run

    def run(norm, **settings):
        results = Results(norm=norm, params=1, epochs=1, device="cpu", precision="fp32", threads=1, torch="2.14.1")
        return Run(tmp_path / norm, Config(norm=norm, **settings), results, [], None, None, None)

    text = _settings_section({"gn": [run("gn", groups=4, act="relu")], "frn": [run("frn", groups=4, act="gelu")]})
    value = lambda label: next(line for line in text.splitlines() if line.startswith(f"| {label}")).split("|")[2].strip()
    assert value("activation") == "relu (not read by frn)"
    assert value("groups") == "4 (not read by frn)"
    assert value("images per batch-norm statistics") == "not read"
    assert value("batch size") == "128"
