"""Batch renormalization (brn) and filter response normalization with a TLU (frn): each layer against its formula
written out on small tensors, brn's schedule and its place in the training loop, frn's TLU in the activation's
place, and a one-epoch run of each from the command line."""
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import DEVICE, make_cifar
from normlab import data as D
from normlab import loop as T
from normlab.cli import main
from normlab.config import Config
from normlab.device import Placement
from normlab.models import ACTS, PARAM_BUDGET, ConvBlock, Net, PoolBlock, count_params
from normlab.norms import (NORMS, BatchRenorm2d, FilterResponseNormTlu2d, GhostBatchNorm2d, make_norm, progress_layers,
                           renorm_limits)

CPU = Placement(torch.device("cpu"), "fp32", False)


# ---------------------------------------------------------------- batch renormalization
def _layers(channels: int, norm_batch: int) -> tuple[BatchRenorm2d, nn.BatchNorm2d]:
    """A brn layer and the batch norm of the same groups (plain or ghost), both with the same random state."""
    torch.manual_seed(1)
    brn = make_norm("brn", channels, norm_batch=norm_batch)
    with torch.no_grad():
        brn.weight.uniform_(0.5, 2), brn.bias.uniform_(-1, 1)
        brn.running_mean.uniform_(-1, 1), brn.running_var.uniform_(0.5, 2)
    bn = GhostBatchNorm2d(channels, norm_batch) if norm_batch else nn.BatchNorm2d(channels)
    bn.load_state_dict(brn.state_dict())  # the same keys: BatchNorm2d's
    return brn, bn


def _renormalized(x: torch.Tensor, layer: BatchRenorm2d, mean: torch.Tensor, var: torch.Tensor, r_max: float,
                  d_max: float) -> torch.Tensor:
    """The paper's training output written out, for one group ``x``, against the running ``mean`` and ``var``."""
    mu_b, var_b = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False)
    sigma_b, sigma = (var_b + layer.eps).sqrt(), (var + layer.eps).sqrt()
    r = (sigma_b / sigma).clamp(1 / r_max, r_max).detach()
    d = ((mu_b - mean) / sigma).clamp(-d_max, d_max).detach()
    x_hat = (x - mu_b[:, None, None]) / sigma_b[:, None, None]
    return layer.weight[:, None, None] * (x_hat * r[:, None, None] + d[:, None, None]) + layer.bias[:, None, None]


def test_the_schedule_is_plain_batch_norm_then_linear_ramps_to_3_and_5():
    assert renorm_limits(0.0) == renorm_limits(0.05) == (1.0, 0.0)  # 5 % of plain batch norm
    assert renorm_limits(0.15) == pytest.approx((1 + 2 * 0.10 / 0.35, 5 * 0.10 / 0.20))
    assert renorm_limits(0.25) == pytest.approx((1 + 2 * 0.20 / 0.35, 5.0))  # d_max full at 25 %
    assert renorm_limits(0.40) == pytest.approx((3.0, 5.0))  # r_max full at 40 %
    assert renorm_limits(1.0) == (3.0, 5.0)
    r, d = zip(*(renorm_limits(k / 100) for k in range(101)))
    assert list(r) == sorted(r) and list(d) == sorted(d)  # never falls back


@pytest.mark.parametrize("norm_batch", [0, 2])
def test_at_the_start_of_training_brn_is_batch_norm(norm_batch):
    """r_max 1, d_max 0 (a new layer, or the first 5 % of the steps): the output, gradients and running statistics of
    batch norm (ghost batch norm with --norm-batch)."""
    brn, bn = _layers(6, norm_batch)
    brn.set_progress(0.01)
    x = torch.randn(8, 6, 5, 5) * 3 + 1
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = brn(x1), bn(x2)
    torch.testing.assert_close(y1, y2)
    g = torch.randn_like(y1)
    (y1 * g).sum().backward()
    (y2 * g).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(brn.weight.grad, bn.weight.grad)
    torch.testing.assert_close(brn.bias.grad, bn.bias.grad)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(brn, name), getattr(bn, name))


@pytest.mark.parametrize("scale", [1.0, 30.0])  # r and d inside their limits; far outside (clipped)
def test_after_the_ramp_the_output_is_corrected_by_r_and_d(scale):
    brn, bn = _layers(4, 0)
    mean, var = brn.running_mean.clone(), brn.running_var.clone()
    brn.set_progress(1.0)
    assert (brn.r_max.item(), brn.d_max.item()) == (3.0, 5.0)
    x = (torch.randn(6, 4, 3, 3) * torch.linspace(0.6, 1.4, 4)[:, None, None] + 0.3) * scale
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, expected = brn(xa), _renormalized(xb, brn, mean, var, 3.0, 5.0)
    torch.testing.assert_close(y, expected)
    assert not torch.allclose(y, bn(x), atol=1e-3)  # not batch norm any more
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (expected * g).sum().backward()  # r and d constants: the gradient flows through x_hat alone
    torch.testing.assert_close(xa.grad, xb.grad)
    # the running statistics move as batch norm's do
    torch.testing.assert_close(brn.running_mean, bn.running_mean)
    torch.testing.assert_close(brn.running_var, bn.running_var)
    if scale == 1.0:  # unclipped, the correction gives (x - mu) / sigma: what evaluation computes
        torch.testing.assert_close(y, F.batch_norm(x, mean, var, brn.weight, brn.bias, False, 0.0, brn.eps))


@pytest.mark.parametrize("channels_last", [False, True])
def test_groups_of_norm_batch_images_are_each_corrected_toward_the_running_statistics(channels_last):
    brn, ghost = _layers(6, 2)
    mean, var = brn.running_mean.clone(), brn.running_var.clone()
    brn.set_progress(0.3)
    r_max, d_max = renorm_limits(0.3)
    x = torch.randn(8, 6, 5, 5) * torch.arange(1.0, 9.0)[:, None, None, None] + torch.randn(8, 1, 1, 1) * 2
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = brn(x)
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last
    for i in range(0, 8, 2):  # each pair by its own statistics, corrected toward the same running ones
        torch.testing.assert_close(y[i:i + 2], _renormalized(x[i:i + 2], brn, mean, var, r_max, d_max))
    ghost(x)  # the running statistics of ghost batch norm: the mean over the pairs
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(brn, name), getattr(ghost, name))


def test_brn_evaluates_with_the_running_statistics_whatever_the_progress():
    brn, _ = _layers(4, 2)
    brn.set_progress(0.7)
    brn(torch.randn(8, 4, 3, 3))
    brn.eval()
    x = torch.randn(5, 4, 3, 3)
    expected = F.batch_norm(x, brn.running_mean, brn.running_var, brn.weight, brn.bias, False, 0.0, brn.eps)
    torch.testing.assert_close(brn(x), expected)
    torch.testing.assert_close(brn(x[:1]), expected[:1])
    brn.set_progress(0.0)
    torch.testing.assert_close(brn(x), expected)


def test_brn_keeps_batch_norms_state_dict_and_sets_its_limits_in_place():
    """model.pt of brn and bn load into each other; the limits are buffers outside the state_dict, filled in place (a
    compiled network or a captured step reads them from the same memory at every step)."""
    brn, bn = Net("brn", norm_batch=4), Net("bn")
    assert {k: v.shape for k, v in brn.state_dict().items()} == {k: v.shape for k, v in bn.state_dict().items()}
    brn.load_state_dict(bn.state_dict())
    bn.load_state_dict(brn.state_dict())
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(brn.eval()(x), bn.eval()(x), rtol=0, atol=0)
    layers = progress_layers(brn)
    assert len(layers) == 10 and all(type(m) is BatchRenorm2d and m.norm_batch == 4 for m in layers)
    assert progress_layers(bn) == [] and progress_layers(Net("frn")) == []
    ptrs = [(m.r_max.data_ptr(), m.d_max.data_ptr()) for m in layers]
    for m in layers:
        m.set_progress(0.5)
    assert [(m.r_max.data_ptr(), m.d_max.data_ptr()) for m in layers] == ptrs
    assert all((m.r_max.item(), m.d_max.item()) == pytest.approx(renorm_limits(0.5)) for m in layers)


def test_brn_reads_norm_batch_and_momentum_but_not_precise_bn(cifar_dir):
    """Batch renorm's running statistics are those it trained toward: precise BN leaves them alone (NORMS' options)."""
    assert NORMS["brn"].options == ("norm_batch", "bn_momentum")
    net = Net.from_config(Config(norm="brn", norm_batch=16, bn_momentum=0.3))
    assert all(m.norm_batch == 16 and m.momentum == 0.3 for m in progress_layers(net))
    images, labels = D.load_split(cifar_dir, train=True)
    for norm, moved in (("bn", True), ("brn", False)):
        cfg = Config(norm=norm, batch_size=50, epochs=1, precise_bn=100)
        torch.manual_seed(0)
        model = Net.from_config(cfg)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        T.recalibrate_bn(model, images, labels, cfg, CPU)
        assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items()) == moved, norm


def test_the_training_loop_sets_the_progress_before_every_step(cifar_dir):
    images, labels = D.load_split(cifar_dir, train=True)
    cfg = Config(norm="brn", norm_batch=10, epochs=2, batch_size=30)  # 200 images: 7 steps per epoch (the last of 20)
    t = T.build(cfg, CPU, images, labels, progress=False)
    seen = []
    t.model.C2[1].register_forward_pre_hook(lambda m, _: seen.append((m.r_max.item(), m.d_max.item())) if m.training else None)
    t.run_epoch(), t.run_epoch()
    assert t.total == 14
    assert seen == [pytest.approx(renorm_limits(step / 14)) for step in range(14)]


def test_brn_resumes_bit_for_bit(cifar_dir):
    """Cut after its first epoch and rebuilt from its state, a brn Trainer ends with the uninterrupted one's weights
    and running statistics: the limits come from the step count, which the checkpoint holds."""
    images, labels = D.load_split(cifar_dir, train=True)
    cfg = Config(norm="brn", norm_batch=10, epochs=2, batch_size=50)
    whole = T.build(cfg, CPU, images, labels, progress=False)
    whole.run_epoch(), whole.run_epoch()
    first = T.build(cfg, CPU, images, labels, progress=False)
    first.run_epoch()
    resumed = T.build(cfg, CPU, images, labels, progress=False)
    resumed.load_state_dict(first.state_dict())
    resumed.run_epoch()
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- filter response normalization + TLU
def _frn(channels: int) -> FilterResponseNormTlu2d:
    torch.manual_seed(2)
    layer = make_norm("frn", channels)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 2), layer.bias.uniform_(-1, 1), layer.tau.uniform_(-0.5, 0.5)
    return layer


def test_frn_starts_as_timm_does_and_matches_its_formula():
    fresh = make_norm("frn", 5)
    assert [n for n, _ in fresh.named_parameters()] == ["weight", "bias", "tau"] and not list(fresh.buffers())
    assert torch.equal(fresh.weight, torch.ones(5)) and torch.equal(fresh.bias, torch.zeros(5))
    assert torch.equal(fresh.tau, torch.zeros(5)) and fresh.eps == 1e-6
    layer = _frn(5)
    x = torch.randn(3, 5, 4, 4) * torch.linspace(0.1, 10, 5)[:, None, None] + 0.5
    y = layer(x)
    for b in range(3):  # each image and channel by its own mean square, then the TLU, written out with loops
        for c in range(5):
            nu2 = (x[b, c] ** 2).mean()
            expected = torch.clamp(layer.weight[c] * x[b, c] / torch.sqrt(nu2 + 1e-6) + layer.bias[c], min=layer.tau[c])
            torch.testing.assert_close(y[b, c], expected)
    assert (y == layer.tau[None, :, None, None].expand_as(y)).any()  # the threshold binds somewhere
    torch.testing.assert_close(layer(x[1:2]), y[1:2])  # no batch dependence
    torch.testing.assert_close(layer.eval()(x), y)  # the same in evaluation


@pytest.mark.parametrize("channels_last", [False, True])
def test_frn_gradients_reach_the_input_gain_bias_and_threshold(channels_last):
    """The gradients of the formula written out (the TLU as max(y, tau)), in both memory layouts."""
    layer, ref = _frn(4), _frn(4)
    x = torch.randn(2, 4, 8, 8)
    x2 = x.clone().requires_grad_()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    y = layer(x)
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last
    g = torch.randn(2, 4, 8, 8)
    (y * g).sum().backward()
    nu2 = x2.square().mean(dim=(2, 3), keepdim=True)
    expected = torch.max(ref.weight[:, None, None] * x2 / torch.sqrt(nu2 + 1e-6) + ref.bias[:, None, None],
                         ref.tau[:, None, None])
    (expected * g).sum().backward()
    for a, b in ((x.grad, x2.grad), (layer.weight.grad, ref.weight.grad), (layer.bias.grad, ref.bias.grad),
                 (layer.tau.grad, ref.tau.grad)):
        assert a is not None and a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_frn_in_bf16_autocast_stays_close_to_fp32():
    layer = _frn(4)
    x = torch.randn(2, 4, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), layer(x), atol=0.05, rtol=0.02)


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("pool_first", [False, True])
def test_the_tlu_takes_the_place_of_the_activation(act, pool_first):
    """Every FRN is followed by no other nonlinearity: the blocks' activation is the identity, whatever --act says."""
    assert NORMS["frn"].own_activation and not any(NORMS[n].own_activation for n in NORMS if n != "frn")
    model = Net("frn", act=act, pool_first=pool_first)
    assert not any(isinstance(m, (nn.ReLU, nn.GELU)) for m in model.modules())
    blocks = [m for m in model.modules() if isinstance(m, (ConvBlock, PoolBlock))]
    assert len(blocks) == 10
    for block in blocks:
        norm, act_layer = (block[1], block[2]) if isinstance(block, ConvBlock) else (block.norm, block.act)
        assert type(norm) is FilterResponseNormTlu2d and type(act_layer) is nn.Identity
    assert any(isinstance(m, ACTS[act]().__class__) for m in Net("bn", act=act).modules())  # other norms keep theirs


def test_frn_counts_its_thresholds_and_stays_under_the_budget():
    model = Net("frn")
    taus = sum(m.tau.numel() for m in model.modules() if isinstance(m, FilterResponseNormTlu2d))
    assert taus == 16 + 16 + 32 + 3 * 32 + 24 + 3 * 24  # one per channel of each of the ten norms
    assert count_params(model) == count_params(Net("bn")) + taus == 48_234 < PARAM_BUDGET
    assert all(p.requires_grad for p in model.parameters())


# ---------------------------------------------------------------- both, from the command line
@pytest.mark.parametrize("norm, extra", [("brn", ["--norm-batch", "10"]), ("frn", [])])
def test_one_epoch_from_the_command_line(tmp_path, capsys, norm, extra):
    data = make_cifar(tmp_path / "data", per_batch=20, test=20)  # 100 images: 2 steps of 50
    out = tmp_path / norm
    assert main(["train", "--data-dir", str(data), "--norm", norm, *extra, "--epochs", "1", "--batch-size", "50",
                 "--threads", "1", "--device", DEVICE, "--out", str(out)]) == 0
    assert f"{NORMS[norm].label} ({norm}; " in capsys.readouterr().out
    r = json.loads((out / "results.json").read_text())
    assert r["norm"] == norm and r["norm_name"] == NORMS[norm].label and r["params"] == count_params(Net(norm))
    assert 0 <= r["test_acc"] <= 1
    assert Config.load(out / "config.json").norm == norm
    assert (out / "model.pt").exists() and (out / "predictions.csv").exists()
