"""The trainer: the loss falls, the schedule, atomic checkpoints, and a NaN loss stops the run."""
import csv
import dataclasses
import types

import pytest
import torch
import torch.nn.functional as F

from normlab import data as D
from normlab import loop as T
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
    opt = T.make_optimizer(model, cfg)
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


def test_lr_schedule_one_cycle():
    lrs = [T.lr_at(s, 100, 0.2, 0.2) for s in range(101)]
    assert lrs[0] == pytest.approx(0.02) and max(lrs) == pytest.approx(0.2) == lrs[20]
    assert lrs[-1] == 0 and all(a <= b for a, b in zip(lrs[:20], lrs[1:21])) and all(a >= b for a, b in zip(lrs[20:], lrs[21:]))
    assert lrs[21] < 0.2


def test_lr_schedule_holds_the_peak():
    """--hold 0.3: the same rise, the peak from step 20 to 49, then linear down to 0 over the last 50 steps."""
    lrs = [T.lr_at(s, 100, 0.2, 0.2, 0.3) for s in range(101)]
    assert lrs[:20] == [T.lr_at(s, 100, 0.2, 0.2) for s in range(20)]
    assert all(lr == pytest.approx(0.2) for lr in lrs[20:50]) and lrs[50] == pytest.approx(0.2) and lrs[51] < 0.2
    assert lrs[75] == pytest.approx(0.1) and lrs[-1] == 0 and all(a >= b for a, b in zip(lrs[50:], lrs[51:]))


def test_weight_decay_on_conv_weights_only():
    model = Net("bn")
    decay, no_decay = T.make_optimizer(model, Config(muon_lr=0)).param_groups
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0
    assert all(p.ndim == 4 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    decay, no_decay, muon = T.make_optimizer(model, Config()).param_groups  # the default: Muon for the filters but C10's
    assert decay["params"] == [model.C10.weight] and decay["weight_decay"] == 5e-4 and muon["weight_decay"] == 0


@pytest.mark.parametrize("norm", ALL_NORMS)
def test_norm_biases_train_at_their_own_learning_rate(norm):
    """--norm-bias-lr: the norms' biases (every bias but C10's) in a third group at that multiple of the
    schedule's lr; at the default 1 the optimizer keeps its two groups (old checkpoints still load)."""
    model = Net(norm)
    assert len(T.make_optimizer(model, Config(norm=norm, muon_lr=0)).param_groups) == 2
    biases = T.norm_biases(model)
    assert len(biases) == 10 and all(b is not model.C10.bias for b in biases)  # C1-C5, C7-C9, and P1, P2 (c3, c6)
    opt = T.make_optimizer(model, Config(norm=norm, norm_bias_lr=64.0, muon_lr=0))
    decay, rest, fast = opt.param_groups
    assert {id(p) for p in fast["params"]} == {id(b) for b in biases} and fast["weight_decay"] == 0
    assert any(p is model.C10.bias for p in rest["params"]) and len(decay["params"]) + len(rest["params"]) + len(fast["params"]) == len(list(model.parameters()))
    place = Placement(torch.device("cpu"), "fp32", False)
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8)
    before = [b.detach().clone() for b in biases]
    T.train_step(model, opt, x, y, 0.01, 0.0, place, place.grad_scaler())
    assert decay["lr"] == rest["lr"] == 0.01 and fast["lr"] == pytest.approx(0.64)
    # plain SGD's first step moves a parameter by lr * (1 + momentum) * grad (Nesterov): 64x for the biases
    for b, b0 in zip(biases, before):
        assert torch.allclose(b0 - b.detach(), 0.64 * 1.9 * b.grad, atol=1e-6)


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
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("normlab: error: ") and "Traceback" not in err
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
    first = T.Trainer(cfg, place, images, labels, progress=False)
    first.run_epoch()
    resumed = T.Trainer(cfg, place, images, labels, progress=False)
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
    whole = T.Trainer(cfg, place, images, labels, progress=False)
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
    plain = T.Trainer(Config(norm="bn", epochs=1, batch_size=50), place, images, labels, progress=False)
    trainer = T.Trainer(Config(norm="bn", epochs=1, batch_size=50, whiten=whiten), place, images, labels, progress=False)
    expected = torch.nn.Conv2d(3, 16, 3, bias=False)
    from normlab.models import whiten_

    whiten_(expected, D.normalize(images, channels_last=False))
    start = trainer.model.C1[0].weight.detach().clone()
    assert torch.equal(start, expected.weight)
    a, b = plain.model.state_dict(), trainer.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if k != "C1.0.weight")
    trainer.run_epoch()
    assert torch.equal(trainer.model.C1[0].weight, start) == (whiten == "frozen")



def test_lookahead_pulls_every_fifth_step_and_ends_on_the_slow_weights():
    model = Net("bn")
    la = T.Lookahead(model, 0.95)
    assert len(la.live) == len([t for t in model.state_dict().values() if t.is_floating_point()])  # params + running stats
    w = model.C1[0].weight
    slow0 = w.detach().clone()
    with torch.no_grad():
        w.add_(1.0)
    la.step(4, 10)  # not a fifth step: nothing moves
    assert torch.equal(w, slow0 + 1.0)
    la.step(5, 10)
    decay = 0.95 ** 5 * 0.5 ** 3
    expected = slow0 + (1 - decay) * 1.0
    slow = la.slow[next(i for i, t in enumerate(la.live) if t is w)]
    assert torch.allclose(w, expected) and torch.equal(slow, w)  # the slow copy moved, the network jumped to it
    with torch.no_grad():
        w.add_(1.0)
    la.finish()
    assert torch.allclose(w, expected)  # back to the slow copy
    with torch.no_grad():
        w.add_(1.0)
    la.step(7, 7)  # the last step of a run pulls too: no step is lost (a 1-step run ends trained, not at its start)
    assert torch.allclose(w, expected + (1 - 0.95 ** 5) * 1.0)



@pytest.mark.parametrize("momentum", [None, 0.6])
def test_muon_steps_the_conv_filters_and_sgd_the_rest(momentum):
    """--muon-lr: the filters of C1-C9, c3 and c6 move by Muon's orthogonalized Nesterov step at muon_lr's share of
    the schedule, with --muon-momentum's momentum (0.95 by default); every other parameter (C10's filters included)
    takes exactly the step plain SGD takes."""
    from torch.optim._muon import _zeropower_via_newtonschulz

    torch.manual_seed(0)
    a = Net("gn")
    b = Net("gn")
    b.load_state_dict(a.state_dict())
    opt_a = T.make_optimizer(a, Config(norm="gn", muon_lr=0))
    m = {} if momentum is None else {"muon_momentum": momentum}
    opt_b = T.make_optimizer(b, Config(norm="gn", muon_lr=0.05, muon_norm=False, **m))  # the step itself (renormalized: below)
    m = 0.95 if momentum is None else momentum
    assert type(opt_a) is torch.optim.SGD and type(opt_b) is T.SGDMuon
    muon = opt_b.param_groups[-1]
    assert muon["muon"] and len(muon["params"]) == 10 and all(p.ndim == 4 for p in muon["params"])
    assert all(p is not b.C10.weight for p in muon["params"])
    place = Placement(torch.device("cpu"), "fp32", False)
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8)
    before = {n: p.detach().clone() for n, p in b.named_parameters()}
    for model, opt in ((a, opt_a), (b, opt_b)):
        T.train_step(model, opt, x, y, 0.1, 0.0, place, place.grad_scaler())
    assert muon["lr"] == pytest.approx(0.1 * 0.05 / 0.2)
    in_muon = {id(p) for p in muon["params"]}
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        if id(pb) not in in_muon:
            assert torch.equal(pa, pb), name
            continue
        g = pb.grad
        update = g.lerp(g * (1 - m), m).reshape(g.shape[0], -1)  # Nesterov on the first step: buffer = (1 - m) g
        step = _zeropower_via_newtonschulz(update, (3.4445, -4.775, 2.0315), 5, 1e-7).reshape(g.shape).float()
        scale = max(1.0, update.shape[0] / update.shape[1]) ** 0.5
        assert torch.allclose(before[name] - pb.detach(), muon["lr"] * scale * step, atol=1e-6), name
        assert not torch.equal(pa, pb), name


def test_muon_step_calls_its_closure_and_returns_the_loss_as_torch_optimizers_do():
    torch.manual_seed(0)
    model = Net("bn")
    opt = T.make_optimizer(model, Config(norm="bn"), precision="fp32")
    x, y = torch.randn(4, 3, 32, 32), torch.arange(4)
    filters = opt.param_groups[-1]["params"][0]
    before = filters.detach().clone()

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.item() > 0
    assert not torch.equal(filters, before)  # the closure's gradients took a Muon step
    assert opt.step() is None


def test_muon_orthogonalizes_as_torch_does_in_bf16_and_in_fp32_where_the_run_is_fp32():
    """loop.orthogonalize is torch.optim.Muon's Newton-Schulz iteration, bit for bit in bf16 (wide and tall
    matrices), and leaves its input alone; in fp32 it lands on the same near-orthogonal matrix within bf16's
    rounding. make_optimizer runs it in bf16 only where the run is bf16 (elsewhere bf16 would be emulated)."""
    from torch.optim._muon import _zeropower_via_newtonschulz

    torch.manual_seed(0)
    for shape in ((16, 27), (32, 288), (40, 12)):
        g = torch.randn(shape)
        g0 = g.clone()
        bf16 = T.orthogonalize(g)
        assert torch.equal(g, g0) and bf16.dtype == torch.bfloat16
        assert torch.equal(bf16, _zeropower_via_newtonschulz(g, (3.4445, -4.775, 2.0315), 5, 1e-7))
        fp32 = T.orthogonalize(g, torch.float32)
        assert fp32.dtype == torch.float32 and (fp32 - bf16.float()).abs().max() < 0.05
        for m in (bf16.float(), fp32):  # about U V^T: every singular value near 1, none near 0
            s = torch.linalg.svdvals(m)
            assert len(s) == min(shape) and s.min() > 0.5 and s.max() < 1.3, s
    model, cfg = Net("bn"), Config(norm="bn", muon_lr=0.05)
    assert {p: T.make_optimizer(model, cfg, p).ns_dtype for p in ("bf16", "fp16", "fp32")} == {
        "bf16": torch.bfloat16, "fp16": torch.float32, "fp32": torch.float32}


@torch.no_grad()
def reference_muon_step(opt: T.SGDMuon) -> None:
    """SGDMuon's step as it was before its banks were batched: SGD, then Muon one filter bank at a time."""
    groups = opt.param_groups
    opt.param_groups = [g for g in groups if not g.get("muon")]
    try:
        torch.optim.SGD.step(opt)
    finally:
        opt.param_groups = groups
    for g in (g for g in groups if g.get("muon")):
        for p in g["params"]:
            buf = opt.state[p].setdefault("muon_buffer", torch.zeros_like(p.grad))
            if g.get("normalize"):
                p.mul_(p.shape[0] ** 0.5 / p.norm())
            buf.lerp_(p.grad, 1 - g["momentum"])
            update = p.grad.lerp(buf, g["momentum"]).reshape(p.shape[0], -1)
            ortho = T.orthogonalize(update, opt.ns_dtype).reshape(p.shape).to(p.dtype)
            scale = max(1.0, update.shape[0] / update.shape[1]) ** 0.5
            if isinstance(g["lr"], torch.Tensor):
                p.sub_(ortho * (g["lr"] * scale))
            else:
                p.add_(ortho, alpha=-g["lr"] * scale)


MUON_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 0.05}  # of an orthogonalized entry (about 0.05-0.3 here)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_the_batched_newton_schulz_chain_orthogonalizes_each_bank_as_alone(dtype, channels_last):
    """FilterBanks + orthogonalize_batch on the network's own banks (wide ones and the tall 1x1 c3, whose matrix is
    transposed), zero-padded to one shape: each bank's result is orthogonalize's on it alone, scaled by
    sqrt(max(1, out / (in*k*k))), within rounding (fp32 tight, bf16 loose), in either memory layout."""
    torch.manual_seed(0)
    model = Net("bn")
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    params = T.make_optimizer(model, Config(norm="bn"), "fp32").param_groups[-1]["params"]
    assert {tuple(p.shape) for p in params} >= {(32, 16, 1, 1), (16, 3, 3, 3), (32, 32, 3, 3)}  # tall, and wide ones
    updates = [torch.randn_like(p) for p in params]
    banks = T.FilterBanks(params)
    flat = banks.orthogonalized(updates, 1.0, dtype)
    assert flat.dtype == torch.float32 and flat.numel() == sum(p.numel() for p in params)
    for p, u, got, perm in zip(params, updates, banks.unflat(flat, params), banks.perms):
        m = u.reshape(u.shape[0], -1)
        want = T.orthogonalize(m, dtype).float().reshape(u.shape) * max(1.0, m.shape[0] / m.shape[1]) ** 0.5
        got = got.permute(*torch.argsort(torch.tensor(perm)).tolist())  # memory order back to (out, in, k, k)
        assert (got - want).abs().max() < MUON_TOLERANCE[dtype], tuple(p.shape)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("settings", [{}, {"muon_norm": False}, {"muon_momentum": 0.6}])
@pytest.mark.parametrize("device_lr", [False, True])
def test_batched_muon_takes_the_steps_of_muon_bank_by_bank(precision, settings, device_lr):
    """Three optimizer steps of SGDMuon from the same weights and gradients as the per-bank algorithm it replaced
    (reference_muon_step): the same weights and buffers within rounding; the SGD groups bit for bit. With the
    learning rates as device tensors too (what --compile capture records)."""
    from normlab.capture import use_device_lr

    torch.manual_seed(0)
    cfg = Config(norm="bn", **settings)
    a = Net.from_config(cfg).to(memory_format=torch.channels_last)
    b = Net.from_config(cfg).to(memory_format=torch.channels_last)
    b.load_state_dict(a.state_dict())
    new, old = T.make_optimizer(a, cfg, precision), T.make_optimizer(b, cfg, precision)
    if device_lr:
        use_device_lr(new)
        use_device_lr(old)
    muon = {id(p) for p in new.param_groups[-1]["params"]}
    for lr in (0.2, 0.1, 0.05):
        for pa, pb in zip(a.parameters(), b.parameters()):
            pa.grad = torch.randn_like(pa)
            pb.grad = pa.grad.clone()
        T.set_lr(new, lr)
        T.set_lr(old, lr)
        new.step()
        reference_muon_step(old)
        for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
            assert torch.equal(pa, pb) if id(pa) not in muon else (pa - pb).abs().max() < 1e-6, name
            if id(pa) in muon:
                assert torch.equal(new.state[pa]["muon_buffer"], old.state[pb]["muon_buffer"]), name
        b.load_state_dict(a.state_dict())  # each step from the same weights: bf16 turns a last bit into a visible one later


def test_lookahead_with_foreach_ops_pulls_exactly_as_tensor_by_tensor():
    torch.manual_seed(0)
    model = Net("bn").to(memory_format=torch.channels_last)
    la = T.Lookahead(model, 0.95)
    ref = [s.clone() for s in la.slow]
    for step in range(1, 11):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        live = [t.detach().clone() for t in la.live]
        if step % la.EVERY == 0:
            decay = la.alpha ** la.EVERY * (step / 10) ** 3
            for slow, t in zip(ref, live):
                slow.lerp_(t, 1 - decay)
                t.copy_(slow)
        la.step(step, 10)
        assert all(torch.equal(a, b) for a, b in zip(la.slow, ref))
        assert all(torch.equal(a, b) for a, b in zip(la.live, live))
    assert step % la.EVERY == 0


def test_muon_with_its_learning_rate_on_the_device_takes_the_same_steps():
    """What --compile capture records (capture.use_device_lr: every group's learning rate a device tensor, SGD fused)
    steps SGDMuon's filters as the plain float learning rate does, step after step of the schedule (each step from
    the same weights and buffers: Newton-Schulz in bf16 turns a last-bit difference into a visible one later)."""
    from normlab.capture import use_device_lr

    torch.manual_seed(0)
    a, b = Net("bn"), Net("bn")
    b.load_state_dict(a.state_dict())
    cfg = Config(norm="bn", muon_lr=0.05)
    opt_a, opt_b = T.make_optimizer(a, cfg), T.make_optimizer(b, cfg)
    use_device_lr(opt_b)
    place = Placement(torch.device("cpu"), "fp32", False)
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8)
    for lr in (0.1, 0.2, 0.05):
        before = [p.detach().clone() for p in a.parameters()]
        for model, opt in ((a, opt_a), (b, opt_b)):
            T.train_step(model, opt, x, y, lr, 0.0, place, place.grad_scaler())
        for (name, pa), pb, p0 in zip(a.named_parameters(), b.parameters(), before):
            assert torch.allclose(pa, pb, atol=1e-7, rtol=0) and not torch.equal(pa, p0), name
        b.load_state_dict(a.state_dict())
        for pa, pb in zip(a.parameters(), b.parameters()):
            for k, v in opt_a.state[pa].items():
                opt_b.state[pb][k].copy_(v)
    assert isinstance(opt_b.param_groups[-1]["lr"], torch.Tensor) and opt_b.param_groups[-1]["muon"]
    assert "muon_buffer" in opt_b.state[opt_b.param_groups[-1]["params"][0]]


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
    T.train_epoch(compiled, T.make_optimizer(model, cfg), batches, cfg, 0, 3, place, place.grad_scaler(), eager=eager)
    assert compiled.sizes == [20, 20] and eager.sizes == [10]


def test_the_first_step_is_timed_only_when_asked(cifar_dir):
    images, labels = D.load_split(cifar_dir, train=True)
    model, cfg = Net("bn"), Config(batch_size=50)
    place = Placement(torch.device("cpu"), "fp32", False)
    batches = D.Batches(images[:100], labels[:100], 50, True, 2, True, False, torch.Generator().manual_seed(0))
    opt = T.make_optimizer(model, cfg)
    assert T.train_epoch(model, opt, batches, cfg, 0, 4, place, place.grad_scaler())["first_step_seconds"] is None
    r = T.train_epoch(model, opt, batches, cfg, 2, 4, place, place.grad_scaler(), time_first=True)
    assert 0 < r["first_step_seconds"] < 60


def test_muon_norm_takes_the_same_step_whatever_the_filters_scale():
    """--muon-norm: before each Muon step every filter bank is scaled to norm sqrt(out). The network (a norm after
    every conv, weight-standardized convs) computes the same whatever the filters' scale, so two networks whose
    filters differ by a factor 5 take the same step and end equal; without --muon-norm they do not."""
    for muon_norm in (True, False):
        torch.manual_seed(0)
        a, b = Net("gn"), Net("gn")
        b.load_state_dict(a.state_dict())
        cfg = Config(norm="gn", muon_norm=muon_norm)
        opt_a, opt_b = T.make_optimizer(a, cfg, "fp32"), T.make_optimizer(b, cfg, "fp32")
        filters_b = opt_b.param_groups[-1]["params"]
        with torch.no_grad():
            for p in filters_b:
                p.mul_(5.0)
        place = Placement(torch.device("cpu"), "fp32", False)
        x, y = torch.randn(8, 3, 32, 32), torch.arange(8)
        with torch.no_grad():
            assert torch.allclose(a(x), b(x), atol=2e-3)  # blind to the filters' scale (but for weight std's eps)
        for model, opt in ((a, opt_a), (b, opt_b)):  # one step: later ones differ by the momentum of the first gradients
            T.train_step(model, opt, x, y, 0.1, 0.0, place, place.grad_scaler())
        gap = max((pa - pb).abs().max().item() for pa, pb in zip(opt_a.param_groups[-1]["params"], filters_b))
        assert gap < 1e-3 if muon_norm else gap > 1e-2, gap
        if muon_norm:  # the step was taken from norm sqrt(out): the filters sit near it, not near 5 times it
            for p in filters_b:
                assert 0.8 < p.norm().item() / p.shape[0] ** 0.5 < 1.5


def test_muon_norm_is_ignored_without_muon():
    """--muon-lr 0 (SGD for every filter) with the renormalization left on, its default: nothing to renormalize,
    so it is accepted and SGD's two groups are all there is."""
    cfg = Config(norm="gn", muon_lr=0).validate()
    assert cfg.muon_norm and len(T.make_optimizer(Net("gn"), cfg).param_groups) == 2


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
    on, off = (T.Trainer(Config(norm="bn", epochs=2, batch_size=50, precise_bn=n), place, images[:150], labels[:150],
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
    whole = T.Trainer(cfg, place, images, labels, progress=False)
    whole.run_epoch(), whole.run_epoch()
    norms = [m for m in whole.model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert len(norms) == 10 and all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in norms)
    assert all(not m.weight.requires_grad for m in norms) and all(m.bias.abs().sum() > 0 for m in norms)
    assert sum(p.numel() for p in whole.model.parameters()) == 47_978
    assert _same_weights(whole, _resumed_after_first_epoch(cfg, place, images, labels))
    trained = T.Trainer(dataclasses.replace(cfg, norm_scale=True), place, images, labels, progress=False)
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
    whole = T.Trainer(cfg, place, images, labels, progress=False)
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
