"""examples/normlab.ipynb runs top to bottom on small data the test makes (one epoch per model), and
the stored notebook holds the outputs of a real run, its own defaults and nothing injected."""
import importlib.util
import json
import time
from pathlib import Path

import pytest

from conftest import make_cifar

pytest.importorskip("nbclient", reason="the dev extra (nbclient, nbformat, ipykernel) executes the notebook")
pytestmark = pytest.mark.slow  # a kernel executing every cell (make test-quick leaves it out)
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NOTEBOOK = EXAMPLES / "normlab.ipynb"


def _executor():
    spec = importlib.util.spec_from_file_location("execute_notebook", EXAMPLES / "execute_notebook.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _images(cell) -> int:
    return sum("image/png" in o.get("data", {}) for o in cell.get("outputs", []))


def test_notebook_runs_on_small_data(tmp_path):
    data = make_cifar(tmp_path / "data")
    started = time.perf_counter()
    nb = _executor().execute(NOTEBOOK, {"DATA_DIR": str(data), "EPOCHS": 1, "THREADS": 1, "OUT": str(tmp_path / "out")}, tmp_path)
    assert time.perf_counter() - started < 60
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert not any(o.output_type == "error" for c in code for o in c.outputs)
    text = "".join(o.get("text", "") for c in code for o in c.outputs)
    assert f"data {data}, 1 epochs" in text and "Trainable params: 47,978" in text
    figures = {c.source.strip(): _images(c) for c in code if _images(c)}
    assert set(figures) >= {"result.plot_curves()", "result.plot_misclassified()", "result.plot_confusion()"}
    assert len(figures) == 4  # and the predictions on images of your own
    for norm in ("bn", "gn", "ln"):
        results = json.loads((tmp_path / "out" / norm / "results.json").read_text())
        assert results["epochs"] == 1 and f"test {results['test_acc']:.2%}" in text
    assert (tmp_path / "out" / "report.md").is_file() and not (tmp_path / "runs").exists()


def test_stored_notebook_shows_a_real_run():
    import nbformat

    assert NOTEBOOK.stat().st_size < 2_000_000
    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    assert "DATA_DIR = None" in params.source and "EPOCHS = 20" in params.source
    assert not any("injected-parameters" in c.metadata.get("tags", []) for c in nb.cells)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert sum(_images(c) for c in code) >= 4
    text = "".join(o.get("text", "") for c in code for o in c.outputs)
    assert ", 20 epochs" in text and "5,000 training" in text  # the subset the first cell names
    intro = " ".join(nb.cells[0].source.replace(">", " ").split())
    assert "5,000 training and 1,000 test images" in intro and "`EPOCHS = 20`" in intro and "README's accuracies" in intro
