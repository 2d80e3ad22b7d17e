"""--compile capture (capture.py): the whole training step recorded once as a CUDA graph and replayed.

A CPU has no CUDA graphs, so these tests stand a recording in for the capture that has its semantics: the step
is recorded without changing anything, and each replay runs it again into the same output tensors. Against
that, a captured run must train exactly as the same run that never captures (its warm-up path throughout);
what only a GPU shows (that the recording is whole) is step (c) of benchmarks/gpu_check.sh."""
import copy
import dataclasses
import json

import pytest
import torch

from normlab import capture as C
from normlab import data as D
from normlab import loop as T
from normlab import optim as O
from normlab.cli import main
from normlab.config import Config
from normlab.device import Placement, Runtime, setup
from normlab.errors import TrainingError
from normlab.models import Net


def recording(t):
    """A stand-in for capture.cuda_capture in trainer ``t``: the step recorded without taking effect; replays run it again."""

    def capture(body):
        saved = copy.deepcopy(t.model.state_dict()), copy.deepcopy(t.opt.state_dict()), t.scaler.state_dict()
        loss, logits = (v.detach().clone() for v in body())
        t.model.load_state_dict(saved[0])
        t.opt.load_state_dict(saved[1])
        if t.scaler.is_enabled():  # fp16: the loss scale and its growth count, in their own tensors
            t.scaler.load_state_dict(saved[2])
        C.use_device_lr(t.opt)  # as it stood when recorded

        def replay():
            new_loss, new_logits = body()
            loss.copy_(new_loss.detach())
            logits.copy_(new_logits.detach())

        return replay, (loss, logits)

    return capture


def graphed(t, x, y, lr):
    """A full batch's step in trainer ``t``, as train_epoch takes it."""
    O.set_lr(t.opt, lr)
    return t.graphed(x, y)


def trainer(cifar_dir, place, epochs=2, **settings):
    images, labels = D.load_split(cifar_dir, train=True)
    cfg = Config(**{"norm": "bn", "batch_size": 30, "epochs": epochs, **settings})  # 200 images: 6 full batches and 20 left
    return T.build(cfg, place, images, labels, progress=False)


CPU = Placement(torch.device("cpu"), "fp32", False)


@pytest.mark.parametrize("settings, precision", [({}, "fp32"), ({"ema": 0.9, "lookahead": 0.5}, "fp32"), ({"norm_bias_lr": 3.0}, "fp32"),
                                                 ({"muon_lr": 0}, "fp32"), ({"norm": "brn", "norm_batch": 10}, "fp32"),
                                                 ({}, "fp16")])
def test_a_captured_run_trains_as_the_same_run_never_captured(cifar_dir, monkeypatch, settings, precision):
    """Warm-up steps, then one recording and replays (the partial batch eager) = every step eager, bit for bit;
    in fp16 with the loss scaler on the device."""
    place = dataclasses.replace(CPU, precision=precision, capture=True)
    captured = trainer(cifar_dir, place, **settings)
    captured.graphed.capture = recording(captured)
    rows = [captured.run_epoch() for _ in range(2)]
    assert captured.graphed.replay is not None and captured.graphed.warm == C.WARMUP_STEPS

    monkeypatch.setattr(C, "WARMUP_STEPS", 10**9)  # never records: the eager path of the same step throughout
    eager = trainer(cifar_dir, place, **settings)
    eager.graphed.capture = None
    ref = [eager.run_epoch() for _ in range(2)]
    assert eager.graphed.replay is None
    for a, b in zip(rows, ref):
        assert {k: v for k, v in a.items() if "seconds" not in k} == {k: v for k, v in b.items() if "seconds" not in k}
    for k, v in eager.model.state_dict().items():
        assert torch.equal(captured.model.state_dict()[k], v), k


def test_a_captured_step_follows_the_schedule(cifar_dir):
    """Each replay reads the learning rate that the step sets in the device tensors (Muon's group too). Muon's
    filters not renormalized here (the default renormalizes them; a captured run of the defaults is checked above):
    a renormalization rescales them even at lr 0, their function unchanged."""
    t = trainer(cifar_dir, dataclasses.replace(CPU, capture=True), norm_bias_lr=2.0, muon_lr=0.05, muon_norm=False)
    t.graphed.capture = recording(t)
    x, y = torch.randn(30, 3, 32, 32), torch.randint(0, 10, (30,))
    for lr in (0.1, 0.2, 0.05, 0.3, 0.0):
        graphed(t, x, y, lr)
        assert [g["lr"].item() for g in t.opt.param_groups] == pytest.approx([lr, lr, 2 * lr, lr * 0.05 / 0.2])
    T.train_step(t.model, t.opt, x[:10], y[:10], 0.07, 0.0, t.place, t.scaler)  # a partial batch, eager: the same tensors
    assert all(isinstance(g["lr"], torch.Tensor) for g in t.opt.param_groups)
    assert [g["lr"].item() for g in t.opt.param_groups] == pytest.approx([0.07, 0.07, 0.14, 0.0175])
    before = [p.detach().clone() for p in t.model.parameters()]
    graphed(t, x, y, 0.0)  # a replay at lr 0 moves nothing (the momentum buffers are applied at lr 0 too)
    assert all(torch.equal(a, b) for a, b in zip(before, t.model.parameters()))


def test_a_checkpoint_of_a_captured_run_is_plain(cifar_dir):
    """Learning rates saved as numbers, no fused/foreach choice: it resumes on any device and path."""
    t = trainer(cifar_dir, dataclasses.replace(CPU, capture=True), epochs=1)
    t.graphed.capture = recording(t)
    t.run_epoch()
    groups = t.state_dict()["optimizer"]["param_groups"]
    assert all(type(g["lr"]) is float and g["fused"] is None and g["foreach"] is None for g in groups)
    assert all(isinstance(g["lr"], torch.Tensor) and g["fused"] for g in t.opt.param_groups)  # the live ones untouched
    plain = trainer(cifar_dir, CPU, epochs=2)
    plain.load_state_dict(t.state_dict())
    plain.run_epoch()


def test_capture_is_cuda_only_and_takes_every_precision():
    assert not setup(Runtime("cpu", compile="capture"), "bn").capture  # a CPU: the plain eager step
    place = dataclasses.replace(CPU, capture=True)
    assert type(dataclasses.replace(place, precision="fp16").grad_scaler()) is C.DeviceScaler
    assert type(dataclasses.replace(CPU, precision="fp16").grad_scaler()) is torch.amp.GradScaler  # not captured: torch's
    assert not dataclasses.replace(place, precision="bf16").grad_scaler().is_enabled() and not place.grad_scaler().is_enabled()


def no_host_reads(monkeypatch):
    """Any read of a tensor's value by the host (what a CUDA graph cannot record, and a sync on a GPU) raises."""
    def refuse(*args, **kwargs):
        raise AssertionError("a tensor's value was read on the host")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)


def test_a_captured_fp16_step_with_an_overflow_is_skipped_on_the_device(cifar_dir, monkeypatch):
    """fp16 captured: a replayed step whose scaled gradients overflow leaves the weights and the optimizer's state as
    they were and halves the loss scale, reading nothing on the host; the next replay steps again, at the new scale."""
    t = trainer(cifar_dir, dataclasses.replace(CPU, precision="fp16", capture=True), epochs=1, lookahead=0)
    t.graphed.capture = recording(t)
    x, y = torch.randn(30, 3, 32, 32), torch.randint(0, 10, (30,))
    for _ in range(C.WARMUP_STEPS + 1):  # warm-up, then the recording
        graphed(t, x, y, 0.1)
    assert t.graphed.replay is not None
    t.scaler._scale.fill_(2.0 ** 40)  # the scaled loss's gradients overflow fp16
    weights = copy.deepcopy(t.model.state_dict())
    state = copy.deepcopy(t.opt.state_dict()["state"])
    with monkeypatch.context() as m:
        no_host_reads(m)
        graphed(t, x, y, 0.1)
    assert t.scaler.get_scale() == 2.0 ** 39
    assert all(torch.equal(v, t.model.state_dict()[k]) for k, v in weights.items() if "running" not in k and "batches" not in k)
    after = t.opt.state_dict()["state"]
    assert all(torch.equal(v, after[i][k]) for i, s in state.items() for k, v in s.items())
    t.scaler._scale.fill_(1024.0)  # no overflow at this scale
    with monkeypatch.context() as m:
        no_host_reads(m)
        graphed(t, x, y, 0.1)
    assert t.scaler.get_scale() == 1024.0 and not torch.equal(weights["C2.0.weight"], t.model.state_dict()["C2.0.weight"])


def test_the_device_scaler_steps_and_skips_as_torchs_grad_scaler():
    """Eager, step by step, with an overflow in the middle: DeviceScaler's weights, buffers and scale are GradScaler's."""
    torch.manual_seed(0)
    cfg = Config(norm="bn")
    fp16 = dataclasses.replace(CPU, precision="fp16")
    models = [Net.from_config(cfg) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [O.make_optimizer(m, cfg, "fp16") for m in models]
    scalers = [torch.amp.GradScaler("cpu"), C.DeviceScaler("cpu")]
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    for step in range(4):
        for model, opt, scaler in zip(models, opts, scalers):
            if step >= 2:  # an overflow, then a smaller scale again
                scaler._scale.fill_(2.0 ** 40 if step == 2 else 1024.0)
            O.set_lr(opt, 0.1)
            T.update_on_batch(model, opt, x, y, 0.1, fp16, scaler)
        assert scalers[0].get_scale() == scalers[1].get_scale() == {2: 2.0 ** 39, 3: 1024.0}.get(step, 2.0 ** 16)
        a, b = (m.state_dict() for m in models)
        assert all(torch.equal(a[k], b[k]) for k in a), step
        sa, sb = (o.state_dict()["state"] for o in opts)
        assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i]), step


def test_train_with_compile_capture_on_a_cpu_is_the_plain_run(cifar_dir, tmp_path):
    args = ["train", "--data-dir", str(cifar_dir), "--norm", "bn", "--epochs", "1", "--batch-size", "50", "--threads", "1",
            "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "a"), "--compile", "capture"]) == 0
    assert main([*args, "--out", str(tmp_path / "b"), "--compile", "off"]) == 0
    for f in ("predictions.csv",):
        assert (tmp_path / "a" / f).read_text() == (tmp_path / "b" / f).read_text()
    assert "captured_step" not in json.loads((tmp_path / "a" / "results.json").read_text())


def test_a_step_that_cannot_be_recorded_is_one_clear_error(cifar_dir):
    t = trainer(cifar_dir, dataclasses.replace(CPU, capture=True), epochs=1)

    def refuses(body):
        raise RuntimeError("operation not permitted when stream is capturing\nCUDA kernel errors might be ...")

    t.graphed.capture = refuses
    with pytest.raises(TrainingError, match=r"could not record .* \(operation not permitted when stream is capturing\); "
                                            r"train it with --compile graphs"):
        t.run_epoch()
