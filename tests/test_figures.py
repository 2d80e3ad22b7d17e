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
