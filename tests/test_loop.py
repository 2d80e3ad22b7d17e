"""loop.py: the loss falls, a NaN loss stops the run, checkpoints after every epoch, Trainer (built by loop.build)
resumes bit for bit with every knob, whitening, compiled partial batches, precise BN, clean last epochs. The
optimizers: test_optim.py."""
import csv
import dataclasses
import types

import pytest
import torch
import torch.nn.functional as F

from conftest import one_error_line
from normlab import data as D
from normlab import loop as T
from normlab import optim as O
from normlab.cli import main
from normlab.config import Config, ConfigError
from normlab.device import Placement
from normlab.models import Net
from normlab.norms import NORMS
from normlab.rundir import CHECKPOINT, MODEL
from normlab import rundir as R

ALL_NORMS = list(NORMS)  # every norm of the registry


# Not instance norm: it removes each image's per-channel mean, all that tells these synthetic classes apart
# (conftest.py), and starts slowly on any data; tests/test_norms.py trains it longer on spatial patterns.
@pytest.mark.parametrize("norm", [n for n in ALL_NORMS if n != "in"])
def test_a_few_steps_lower_the_loss(cifar_dir, norm):
    images, labels = D.load_split(cifar_dir, train=True)
    cfg = Config(norm=norm, lr=0.05, batch_size=20, epochs=2)
    torch.manual_seed(0)
    model = Net(norm)
    opt = O.make_optimizer(model, cfg)
    place = Placement(torch.device("cpu"), "fp32", False)
    before = T.evaluate(model, images, labels, place)[1]
    batches = D.Batches(images, labels, cfg.batch_size, True, 4, True, False, torch.Generator().manual_seed(0))
    step, total = 0, cfg.epochs * len(batches)
    for _ in range(cfg.epochs):
        r = T.train_epoch(model, opt, batches, cfg, step, total, place, place.grad_scaler())
        assert r["bad_batch"] == -1 and r["step"] == step + len(batches)
        step = r["step"]
    after = T.evaluate(model, images, labels, place)[1]
    assert after < before - 0.3, (before, after)


def _nan_at(call: int):
    """A stand-in for torch.nn.functional whose ``call``-th training cross-entropy is NaN (the evaluations
    after each epoch, without label smoothing, are not counted)."""
    calls = [0]

    def cross_entropy(*args, **kwargs):
        loss = F.cross_entropy(*args, **kwargs)
        if "label_smoothing" not in kwargs:  # validation or test monitoring, not a training step
            return loss
        calls[0] += 1
        return loss * float("nan") if calls[0] == call else loss

    return types.SimpleNamespace(cross_entropy=cross_entropy)


def test_nan_loss_stops_and_keeps_last_good_epoch(cifar_dir, tmp_path, monkeypatch, capsys):
    # 200 images in batches of 50: 4 per epoch, so the 7th loss is epoch 2, batch 3.
    monkeypatch.setattr(T, "F", _nan_at(7))
    out = tmp_path / "run"
    rc = main(["train", "--data-dir", str(cifar_dir), "--norm", "gn", "--epochs", "3", "--batch-size", "50",
               "--threads", "1", "--out", str(out)])
    err = one_error_line(capsys)
    assert rc == 2
    assert "NaN" in err and "epoch 2, batch 3 of 4" in err and "last good epoch (1)" in err and "--lr" in err
    ck = torch.load(out / CHECKPOINT, weights_only=True)
    assert ck["epoch"] == 1 and all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1"]
    assert not (out / "results.json").exists() and not (out / MODEL).exists()


def test_nan_loss_in_first_epoch(cifar_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(T, "F", _nan_at(1))
    out = tmp_path / "run"
    rc = main(["train", "--data-dir", str(cifar_dir), "--norm", "ln", "--epochs", "2", "--batch-size", "100",
               "--threads", "1", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "epoch 1, batch 1 of 2" in err
    assert not (out / CHECKPOINT).exists() and not (out / "results.json").exists()


def test_checkpoint_after_every_epoch(cifar_dir, tmp_path, monkeypatch):
    saved = []
    real_save = R.atomic_save

    def recording_save(obj, path):
        real_save(obj, path)
        saved.append((path.name, obj.get("epoch"), sorted(p.name for p in path.parent.glob("*.tmp"))))

    monkeypatch.setattr(R, "atomic_save", recording_save)
    out = tmp_path / "run"
    assert main(["train", "--data-dir", str(cifar_dir), "--norm", "ln", "--epochs", "3", "--batch-size", "200",
                 "--threads", "1", "--out", str(out)]) == 0
    assert saved == [(CHECKPOINT, 1, []), (CHECKPOINT, 2, []), (CHECKPOINT, 3, []), (MODEL, None, [])]


def _resumed_after_first_epoch(cfg, place, images, labels):
    """A Trainer cut after its first epoch, rebuilt from its state and run to the end of ``cfg.epochs``."""
    first = T.build(cfg, place, images, labels, progress=False)
    first.run_epoch()
    resumed = T.build(cfg, place, images, labels, progress=False)
    resumed.load_state_dict(first.state_dict())
    while not resumed.done:
        resumed.run_epoch()
    return resumed


def _same_weights(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))


def test_the_new_knobs_resume_bit_for_bit(cifar_dir):
    """A Trainer with --norm-bias-lr, --identity-init, --lookahead, --bn-momentum and --muon-lr, cut after its first epoch and rebuilt from its state,
    ends with the weights of the uninterrupted one (the third group's lr_scale travels in the optimizer state)."""
    images, labels = D.load_split(cifar_dir, train=True)
    cfg = Config(norm="bn", epochs=2, batch_size=50, norm_bias_lr=8.0, identity_init=True, lookahead=0.95, bn_momentum=0.4,
                 muon_lr=0.05)
    place = Placement(torch.device("cpu"), "fp32", False)
    whole = T.build(cfg, place, images, labels, progress=False)
    whole.run_epoch(), whole.run_epoch()
    resumed = _resumed_after_first_epoch(cfg, place, images, labels)
    assert resumed.opt.param_groups[2]["lr_scale"] == 8.0
    assert _same_weights(whole, resumed)


@pytest.mark.parametrize("whiten", ["frozen", "train"])
def test_a_whitened_c1_starts_from_the_training_patches(cifar_dir, whiten):
    """--whiten: C1 starts as whiten_() of the (normalized) training images and stays so when frozen; every
    other weight starts as without it (whitening draws nothing from the seed's stream)."""
    images, labels = D.load_split(cifar_dir, train=True)
    place = Placement(torch.device("cpu"), "fp32", False)
    plain = T.build(Config(norm="bn", epochs=1, batch_size=50), place, images, labels, progress=False)
    trainer = T.build(Config(norm="bn", epochs=1, batch_size=50, whiten=whiten), place, images, labels, progress=False)
    expected = torch.nn.Conv2d(3, 16, 3, bias=False)
    from normlab.models import whiten_

    whiten_(expected, D.normalize(images, channels_last=False))
    start = trainer.model.C1[0].weight.detach().clone()
    assert torch.equal(start, expected.weight)
    a, b = plain.model.state_dict(), trainer.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if k != "C1.0.weight")
    trainer.run_epoch()
    assert torch.equal(trainer.model.C1[0].weight, start) == (whiten == "frozen")


def test_a_compiled_network_leaves_the_last_partial_batch_to_the_plain_module(cifar_dir):
    """train_epoch(eager=...): full batches go to the (compiled) network, the epoch's last, smaller batch to the
    plain module it wraps, so that no second shape is ever compiled (Trainer passes its model when compiled)."""
    images, labels = D.load_split(cifar_dir, train=True)
    images, labels = images[:50], labels[:50]
    model = Net("bn")

    class Recorder(torch.nn.Module):  # stands in for torch.compile's wrapper: same parameters, records batch sizes
        def __init__(self, inner):
            super().__init__()
            self.inner, self.sizes = inner, []

        def forward(self, x):
            self.sizes.append(len(x))
            return self.inner(x)

    compiled, eager = Recorder(model), Recorder(model)
    cfg = Config(batch_size=20)
    place = Placement(torch.device("cpu"), "fp32", False)
    batches = D.Batches(images, labels, 20, True, 2, True, False, torch.Generator().manual_seed(0))
    T.train_epoch(compiled, O.make_optimizer(model, cfg), batches, cfg, 0, 3, place, place.grad_scaler(), eager=eager)
    assert compiled.sizes == [20, 20] and eager.sizes == [10]


def test_the_first_step_is_timed_only_when_asked(cifar_dir):
    images, labels = D.load_split(cifar_dir, train=True)
    model, cfg = Net("bn"), Config(batch_size=50)
    place = Placement(torch.device("cpu"), "fp32", False)
    batches = D.Batches(images[:100], labels[:100], 50, True, 2, True, False, torch.Generator().manual_seed(0))
    opt = O.make_optimizer(model, cfg)
    assert T.train_epoch(model, opt, batches, cfg, 0, 4, place, place.grad_scaler())["first_step_seconds"] is None
    r = T.train_epoch(model, opt, batches, cfg, 2, 4, place, place.grad_scaler(), time_first=True)
    assert 0 < r["first_step_seconds"] < 60


def test_precise_bn_averages_the_batch_statistics_of_full_training_batches(cifar_dir):
    """--precise-bn: the running statistics become the plain average of the batch statistics of full, augmented
    training batches at the present weights (the history they held is gone); the weights and the layers' momentum
    are untouched."""
    images, labels = D.load_split(cifar_dir, train=True)
    cfg = Config(norm="bn", batch_size=32, precise_bn=100)  # 100 images: three full batches of 32, the rest unused
    place = Placement(torch.device("cpu"), "fp32", False)
    torch.manual_seed(0)
    model = Net("bn")
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for m in bns:
            m.running_mean.fill_(5.0), m.running_var.fill_(7.0)
    weights = {k: v.clone() for k, v in model.named_parameters()}
    seen = []
    hook = bns[0].register_forward_hook(lambda m, inp, out: seen.append(inp[0].detach()) or graphs.append(out.requires_grad))
    graphs = []
    model.eval()
    T.recalibrate_bn(model, images, labels, cfg, place)
    hook.remove()
    assert graphs == [False] * 3  # no autograd graph is built (torch.no_grad)
    assert [len(x) for x in seen] == [32, 32, 32] and not model.training
    expected_mean = torch.stack([x.mean((0, 2, 3)) for x in seen]).mean(0)
    expected_var = torch.stack([x.var((0, 2, 3), unbiased=True) for x in seen]).mean(0)
    assert torch.allclose(bns[0].running_mean, expected_mean, atol=1e-5)
    assert torch.allclose(bns[0].running_var, expected_var, rtol=1e-4)
    assert all(m.momentum == cfg.bn_momentum for m in bns)
    assert all(torch.equal(v, weights[k]) for k, v in model.named_parameters())


def test_precise_bn_leaves_other_norms_and_its_off_switch_alone(cifar_dir):
    images, labels = D.load_split(cifar_dir, train=True)
    place = Placement(torch.device("cpu"), "fp32", False)
    for norm, n in (("gn", 100), ("bn", 0)):
        model = Net(norm)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        T.recalibrate_bn(model, images, labels, Config(norm=norm, batch_size=32, precise_bn=n), place)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), norm


def test_trainer_re_estimates_batch_norm_after_its_last_epoch_only(cifar_dir):
    """With --precise-bn (the default) the trainer recalibrates after the last epoch, before it evaluates: every
    weight is that of a run without it, and so are the running statistics until then."""
    images, labels = D.load_split(cifar_dir, train=True)
    place = Placement(torch.device("cpu"), "fp32", False)
    on, off = (T.build(Config(norm="bn", epochs=2, batch_size=50, precise_bn=n), place, images[:150], labels[:150],
                         images[150:], labels[150:], progress=False) for n in (10000, 0))
    for epoch in (1, 2):
        row_on, row_off = on.run_epoch(), off.run_epoch()
        same_buffers = all(torch.equal(a, b) for a, b in zip(on.model.buffers(), off.model.buffers()))
        assert same_buffers == (epoch == 1)
        assert (row_on["val_loss"] == row_off["val_loss"]) == (epoch == 1)  # the last row evaluates the recalibrated model
    assert all(torch.equal(a, b) for a, b in zip(on.model.parameters(), off.model.parameters()))


def test_frozen_norm_scales_stay_one_and_cutout_resumes_bit_for_bit(cifar_dir):
    """--no-norm-scale: every norm's scale is 1 after training, its bias has moved, the parameter count is
    unchanged; with --cutout too, a run cut after its first epoch ends with the uninterrupted run's weights."""
    images, labels = D.load_split(cifar_dir, train=True)
    cfg = Config(norm="bn", epochs=2, batch_size=50, norm_scale=False, cutout=8)
    place = Placement(torch.device("cpu"), "fp32", False)
    whole = T.build(cfg, place, images, labels, progress=False)
    whole.run_epoch(), whole.run_epoch()
    norms = [m for m in whole.model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert len(norms) == 10 and all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in norms)
    assert all(not m.weight.requires_grad for m in norms) and all(m.bias.abs().sum() > 0 for m in norms)
    assert sum(p.numel() for p in whole.model.parameters()) == 47_978
    assert _same_weights(whole, _resumed_after_first_epoch(cfg, place, images, labels))
    trained = T.build(dataclasses.replace(cfg, norm_scale=True), place, images, labels, progress=False)
    trained.run_epoch()
    assert any(not torch.equal(m.weight, torch.ones_like(m.weight))
               for m in trained.model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))


def test_clean_epochs_train_the_last_epochs_uncropped_and_resume_bit_for_bit(cifar_dir, monkeypatch):
    """--clean-epochs 1 of 2: the first epoch's batches are cropped (and cut out), the last one's and precise BN's are
    whole images, flipped as before; a run cut after its first epoch ends with the uninterrupted run's weights."""
    images, labels = D.load_split(cifar_dir, train=True)
    cfg = Config(norm="bn", epochs=2, batch_size=50, clean_epochs=1, cutout=8, precise_bn=100)
    place = Placement(torch.device("cpu"), "fp32", False)
    seen, augment, cut_out = [], D.augment, D.cut_out
    monkeypatch.setattr(D, "augment", lambda x, pad, *a: seen.append(("crop", pad)) or augment(x, pad, *a))
    monkeypatch.setattr(D, "cut_out", lambda x, size, corners: seen.append(("cutout", size)) or cut_out(x, size, corners))
    whole = T.build(cfg, place, images, labels, progress=False)
    whole.run_epoch()
    assert set(seen) == {("crop", 2), ("cutout", 8)}
    seen.clear()
    whole.run_epoch()  # 4 batches of training, then 2 of precise BN
    assert seen == [("crop", 0)] * 6
    assert _same_weights(whole, _resumed_after_first_epoch(cfg, place, images, labels))
    assert T.crops(cfg, 1) == (2, 8) and T.crops(cfg, 2) == (0, 0)
    assert [T.crops(Config(), e) for e in (1, 18, 19, 20)] == [(2, 0), (2, 0), (0, 0), (0, 0)]  # the default: the last 2
    assert T.crops(Config(epochs=1), 1) == (0, 0)  # fewer epochs than --clean-epochs: all of them whole images
    with pytest.raises(ConfigError, match="--clean-epochs must be 0"):
        Config(clean_epochs=-1).validate()
