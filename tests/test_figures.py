"""figures.py: every figure is drawn from plain arrays and rows, saved as a PNG of its own size."""
import matplotlib.image
import numpy as np
import pytest

from normlab import figures
from normlab.data import CLASSES


@pytest.fixture
def images():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (40, 3, 32, 32), dtype=np.uint8), np.arange(40) % 10


def test_save_writes_a_png_of_the_figure(tmp_path, images):
    fig = figures.sample_grid(*images, per_class=2)
    path = figures.save(fig, tmp_path / "samples.png")
    assert path == tmp_path / "samples.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _ = matplotlib.image.imread(path).shape  # cut to what is drawn (bbox tight): 10 rows of 2 images
    assert height > width > 100


def test_misclassified_grid_has_one_panel_per_mistake(images):
    pixels, labels = images
    preds = (labels + 1) % 10
    probs = np.full((40, 10), 0.1)
    fig = figures.misclassified_grid(pixels, labels, preds, probs, list(range(10)), "ten mistakes")
    assert len(fig.axes) == 10
    titles = [ax.get_title() for ax in fig.axes]
    assert all(CLASSES[labels[i]] in t and CLASSES[preds[i]] in t for i, t in zip(range(10), titles))


def test_training_curves_draw_loss_and_accuracy_and_mark_the_test_as_monitoring(images):
    rows = [{"epoch": e, "train_loss": 2.0 / e, "train_acc": 0.3 * e, "val_loss": None, "val_acc": None,
             "test_loss": 2.1 / e, "test_acc": 0.28 * e} for e in (1, 2, 3)]
    fig = figures.training_curves({"bn": rows}, "bn")
    assert len(fig.axes) == 2 and all(ax.lines for ax in fig.axes)
    assert any(figures.MONITORING_NOTE in t.get_text() for t in fig.findobj(lambda a: hasattr(a, "get_text")))


def test_confusion_matrix_counts_each_true_and_predicted_pair():
    labels, preds = np.array([0, 0, 1, 2]), np.array([0, 1, 1, 2])
    fig = figures.confusion_matrix(labels, preds, "three classes")
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts.count("1") == 4 and fig.axes[0].get_title() == "three classes"


# ---------------------------------------------------------------- the sweep figure, for readers: its data, then its drawing
def study_rows(manifest, shown="test_acc"):
    """Finished rows of every model of ``manifest``: accuracy 0.5 + 0.01 x seed (+ 0.001 x norm_batch), clean train 0.1 more."""
    from pathlib import Path

    rows = []
    for norm, cell, seed, _ in manifest.models(Path("s")):
        acc = 0.5 + 0.01 * seed + 0.001 * cell.get("norm_batch", 0)
        rows.append({"norm": norm, "seed": seed, "status": "finished", "cell": cell, "test_acc": None, "val_acc": None,
                     shown: acc, "train_acc_clean": acc + 0.1})
    return rows


def test_study_figure_data_lines_bands_points_error_bars_and_words():
    from normlab import studies
    from normlab.config import Config
    from normlab.manifest import Manifest
    from normlab.sweeptables import sweep_series

    manifest = Manifest(Config(), studies.parts(), 3, 0)
    spec = sweep_series(manifest, study_rows(manifest), "norm_batch")
    assert spec["xlabel"] == "images per normalization statistic" and spec["log_x"]
    assert spec["ticks"] == [2, 4, 8, 16, 32, 128] and spec["tick_labels"][-1] == "128\n(whole batch)"  # 0 drawn at the batch size
    assert "norm_batch" not in spec["title"] and "mean ± std over 3 seeds" in spec["title"]
    test, train = spec["panels"]
    assert (test["ylabel"], train["ylabel"]) == ("test accuracy (%)", "clean train accuracy (%)")
    lines = {line["label"]: line for line in test["lines"]}
    assert list(lines) == ["Batch Normalization (bn)", "Batch Normalization (bn), without precise BN", "Batch Renormalization (brn)",
                           "Group Normalization (gn)", "Layer Normalization (ln)", "Instance Normalization (in)",
                           "No normalization (none)", "Filter Response Normalization + TLU (frn)"]  # the lines, then the bands
    bn = lines["Batch Normalization (bn)"]
    assert bn["x"] == [2, 4, 8, 16, 32, 128] and not bn["band"] and bn["seeds"] == [3] * 6
    assert bn["mean"][0] == pytest.approx(100 * (0.5 + 0.01 + 0.002)) and bn["std"][0] == pytest.approx(1.0)  # seeds 0, 1, 2
    assert bn["mean"][-1] == pytest.approx(51.0)  # the whole batch: norm_batch 0
    assert lines["Batch Normalization (bn), without precise BN"]["x"] == [2, 4]
    assert lines["Batch Renormalization (brn)"]["x"] == [2, 4, 8, 32]
    gn = lines["Group Normalization (gn)"]
    assert gn["band"] and gn["x"] == [None] and gn["mean"] == [pytest.approx(51.0)] and gn["std"] == [pytest.approx(1.0)]
    assert [line["mean"] for line in train["lines"]][0][0] == pytest.approx(bn["mean"][0] + 10)
    assert "read no batch statistics" in spec["note"]


def test_study_figure_draws_error_bars_a_log_axis_and_a_legend_in_words():
    from normlab import studies
    from normlab.config import Config
    from normlab.manifest import Manifest
    from normlab.sweeptables import sweep_figure

    manifest = Manifest(Config(), studies.parts(), 2, 0)
    fig = sweep_figure(manifest, study_rows(manifest), "norm_batch")
    test, train = fig.axes
    assert test.get_xscale() == "log" and test.get_xlabel() == "images per normalization statistic"
    assert (test.get_ylabel(), train.get_ylabel()) == ("test accuracy (%)", "clean train accuracy (%)")
    assert len(test.containers) == 3  # error bars: bn, bn without precise BN, brn
    assert [t.get_text() for t in test.get_xticklabels()][-1] == "128\n(whole batch)"
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "Filter Response Normalization + TLU (frn)" in legend and not any("_" in t for t in legend)


def test_a_sweep_without_the_test_set_draws_validation_accuracy_and_says_so():
    from normlab.config import Config
    from normlab.plan import parse_grid
    from normlab.manifest import Manifest
    from normlab.sweeptables import sweep_series

    manifest = Manifest.sweep(Config(eval_test=False), ("bn", "ln"), parse_grid(["norm_batch=4,16"]), 1, 0)
    spec = sweep_series(manifest, study_rows(manifest, shown="val_acc"), "norm_batch")
    assert spec["panels"][0]["ylabel"] == "validation accuracy (%)" and spec["title"].startswith("Validation accuracy")
    assert "over" not in spec["title"]  # one seed: no error bars to speak of
    assert spec["ticks"] == [4, 16] and not spec["log_x"]  # a span under 8 times: a linear axis


def test_the_sweep_figure_title_counts_the_seeds_finished_so_far():
    """A study cut short says how many seeds lie behind its points, not how many it will have."""
    from normlab import studies
    from normlab.config import Config
    from normlab.manifest import Manifest
    from normlab.sweeptables import sweep_series

    manifest = Manifest(Config(), studies.parts(), 3, 0)
    rows = study_rows(manifest)
    only_seed_0 = [r for r in rows if r["seed"] == 0]
    assert sweep_series(manifest, only_seed_0, "norm_batch")["title"].endswith("(mean ± std over the seeds finished so far: 1 of 3)")
    some_seed_1 = only_seed_0 + [r for r in rows if r["seed"] == 1 and r["norm"] == "gn"]
    assert sweep_series(manifest, some_seed_1, "norm_batch")["title"].endswith("(mean ± std over the seeds finished so far: 1 to 2 of 3)")
    assert sweep_series(manifest, rows, "norm_batch")["title"].endswith("(mean ± std over 3 seeds)")
