import json

from normlab.cli import main


def test_train_end_to_end(cifar_dir, tmp_path):
    out = tmp_path / "run"
    rc = main(["train", "--data-dir", str(cifar_dir), "--norm", "bn", "--epochs", "2", "--batch-size", "32", "--threads", "1", "--out", str(out)])
    assert rc == 0
    r = json.loads((out / "results.json").read_text())
    assert r["epochs"] == 2 and 0 <= r["test_acc"] <= 1
