"""optim.py: the one-cycle schedule, weight decay and parameter groups, Lookahead, and Muon (its steps,
orthogonalization, closure, device learning rates, renormalized filters)."""
import pytest
import torch

from normlab import loop as T
from normlab import optim as O
from normlab.config import Config
from normlab.device import Placement
from normlab.models import Net
from normlab.norms import NORMS

ALL_NORMS = list(NORMS)  # every norm of the registry


def test_lr_schedule_one_cycle():
    lrs = [O.lr_at(s, 100, 0.2, 0.2) for s in range(101)]
    assert lrs[0] == pytest.approx(0.02) and max(lrs) == pytest.approx(0.2) == lrs[20]
    assert lrs[-1] == 0 and all(a <= b for a, b in zip(lrs[:20], lrs[1:21])) and all(a >= b for a, b in zip(lrs[20:], lrs[21:]))
    assert lrs[21] < 0.2


def test_lr_schedule_holds_the_peak():
    """--hold 0.3: the same rise, the peak from step 20 to 49, then linear down to 0 over the last 50 steps."""
    lrs = [O.lr_at(s, 100, 0.2, 0.2, 0.3) for s in range(101)]
    assert lrs[:20] == [O.lr_at(s, 100, 0.2, 0.2) for s in range(20)]
    assert all(lr == pytest.approx(0.2) for lr in lrs[20:50]) and lrs[50] == pytest.approx(0.2) and lrs[51] < 0.2
    assert lrs[75] == pytest.approx(0.1) and lrs[-1] == 0 and all(a >= b for a, b in zip(lrs[50:], lrs[51:]))


def test_weight_decay_on_conv_weights_only():
    model = Net("bn")
    decay, no_decay = O.make_optimizer(model, Config(muon_lr=0)).param_groups
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0
    assert all(p.ndim == 4 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    decay, no_decay, muon = O.make_optimizer(model, Config()).param_groups  # the default: Muon for the filters but C10's
    assert decay["params"] == [model.C10.weight] and decay["weight_decay"] == 5e-4 and muon["weight_decay"] == 0


@pytest.mark.parametrize("norm", ALL_NORMS)
def test_norm_biases_train_at_their_own_learning_rate(norm):
    """--norm-bias-lr: the norms' biases (every bias but C10's) in a third group at that multiple of the
    schedule's lr; at the default 1 the optimizer keeps its two groups (old checkpoints still load)."""
    model = Net(norm)
    assert len(O.make_optimizer(model, Config(norm=norm, muon_lr=0)).param_groups) == 2
    biases = O.norm_biases(model)
    assert len(biases) == 10 and all(b is not model.C10.bias for b in biases)  # C1-C5, C7-C9, and P1, P2 (c3, c6)
    opt = O.make_optimizer(model, Config(norm=norm, norm_bias_lr=64.0, muon_lr=0))
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


def test_lookahead_pulls_every_fifth_step_and_ends_on_the_slow_weights():
    model = Net("bn")
    la = O.Lookahead(model, 0.95)
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
    opt_a = O.make_optimizer(a, Config(norm="gn", muon_lr=0))
    m = {} if momentum is None else {"muon_momentum": momentum}
    opt_b = O.make_optimizer(b, Config(norm="gn", muon_lr=0.05, muon_norm=False, **m))  # the step itself (renormalized: below)
    m = 0.95 if momentum is None else momentum
    assert type(opt_a) is torch.optim.SGD and type(opt_b) is O.SGDMuon
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
    opt = O.make_optimizer(model, Config(norm="bn"), precision="fp32")
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
        bf16 = O.orthogonalize(g)
        assert torch.equal(g, g0) and bf16.dtype == torch.bfloat16
        assert torch.equal(bf16, _zeropower_via_newtonschulz(g, (3.4445, -4.775, 2.0315), 5, 1e-7))
        fp32 = O.orthogonalize(g, torch.float32)
        assert fp32.dtype == torch.float32 and (fp32 - bf16.float()).abs().max() < 0.05
        for m in (bf16.float(), fp32):  # about U V^T: every singular value near 1, none near 0
            s = torch.linalg.svdvals(m)
            assert len(s) == min(shape) and s.min() > 0.5 and s.max() < 1.3, s
    model, cfg = Net("bn"), Config(norm="bn", muon_lr=0.05)
    assert {p: O.make_optimizer(model, cfg, p).ns_dtype for p in ("bf16", "fp16", "fp32")} == {
        "bf16": torch.bfloat16, "fp16": torch.float32, "fp32": torch.float32}


@torch.no_grad()
def reference_muon_step(opt: O.SGDMuon) -> None:
    """SGDMuon's step done the plain way: SGD, then Muon one filter bank at a time."""
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
            ortho = O.orthogonalize(update, opt.ns_dtype).reshape(p.shape).to(p.dtype)
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
    params = O.make_optimizer(model, Config(norm="bn"), "fp32").param_groups[-1]["params"]
    assert {tuple(p.shape) for p in params} >= {(32, 16, 1, 1), (16, 3, 3, 3), (32, 32, 3, 3)}  # tall, and wide ones
    updates = [torch.randn_like(p) for p in params]
    banks = O.FilterBanks(params)
    flat = banks.orthogonalized(updates, 1.0, dtype)
    assert flat.dtype == torch.float32 and flat.numel() == sum(p.numel() for p in params)
    for p, u, got, perm in zip(params, updates, banks.unflat(flat, params), banks.perms):
        m = u.reshape(u.shape[0], -1)
        want = O.orthogonalize(m, dtype).float().reshape(u.shape) * max(1.0, m.shape[0] / m.shape[1]) ** 0.5
        got = got.permute(*torch.argsort(torch.tensor(perm)).tolist())  # memory order back to (out, in, k, k)
        assert (got - want).abs().max() < MUON_TOLERANCE[dtype], tuple(p.shape)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("settings", [{}, {"muon_norm": False}, {"muon_momentum": 0.6}])
@pytest.mark.parametrize("device_lr", [False, True])
def test_batched_muon_takes_the_steps_of_muon_bank_by_bank(precision, settings, device_lr):
    """Three optimizer steps of SGDMuon from the same weights and gradients as Muon bank by bank
    (reference_muon_step): the same weights and buffers within rounding; the SGD groups bit for bit. With the
    learning rates as device tensors too (what --compile capture records)."""
    from normlab.capture import use_device_lr

    torch.manual_seed(0)
    cfg = Config(norm="bn", **settings)
    a = Net.from_config(cfg).to(memory_format=torch.channels_last)
    b = Net.from_config(cfg).to(memory_format=torch.channels_last)
    b.load_state_dict(a.state_dict())
    new, old = O.make_optimizer(a, cfg, precision), O.make_optimizer(b, cfg, precision)
    if device_lr:
        use_device_lr(new)
        use_device_lr(old)
    muon = {id(p) for p in new.param_groups[-1]["params"]}
    for lr in (0.2, 0.1, 0.05):
        for pa, pb in zip(a.parameters(), b.parameters()):
            pa.grad = torch.randn_like(pa)
            pb.grad = pa.grad.clone()
        O.set_lr(new, lr)
        O.set_lr(old, lr)
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
    la = O.Lookahead(model, 0.95)
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
    opt_a, opt_b = O.make_optimizer(a, cfg), O.make_optimizer(b, cfg)
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


def test_muon_norm_takes_the_same_step_whatever_the_filters_scale():
    """--muon-norm: before each Muon step every filter bank is scaled to norm sqrt(out). The network (a norm after
    every conv, weight-standardized convs) computes the same whatever the filters' scale, so two networks whose
    filters differ by a factor 5 take the same step and end equal; without --muon-norm they do not."""
    for muon_norm in (True, False):
        torch.manual_seed(0)
        a, b = Net("gn"), Net("gn")
        b.load_state_dict(a.state_dict())
        cfg = Config(norm="gn", muon_norm=muon_norm)
        opt_a, opt_b = O.make_optimizer(a, cfg, "fp32"), O.make_optimizer(b, cfg, "fp32")
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
    assert cfg.muon_norm and len(O.make_optimizer(Net("gn"), cfg).param_groups) == 2
