"""The norm registry and its layers: instance norm's statistics, no norm's lack of them, and ghost batch norm
(statistics over groups of --norm-batch images) against plain batch norm."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normlab.config import Config, ConfigError
from normlab.models import Net
from normlab.norms import DEFAULT_NORMS, NORMS, GhostBatchNorm2d, ScaledAffine2d, make_norm

ALL_NORMS = list(NORMS)


def test_registry_holds_seven_norms_and_runs_bn_gn_ln_by_default():
    assert list(NORMS) == ["bn", "gn", "ln", "in", "none", "brn", "frn"]
    assert DEFAULT_NORMS == ("bn", "gn", "ln")
    assert NORMS["in"].label == "Instance Normalization" and NORMS["none"].label == "No normalization"
    assert NORMS["brn"].label == "Batch Renormalization" and NORMS["frn"].label == "Filter Response Normalization + TLU"
    assert len({n.colour for n in NORMS.values()}) == len(NORMS)  # every norm its own colour in the figures


def test_options_name_config_settings_and_only_batch_norm_and_renorm_read_norm_batch():
    fields = set(Config.__dataclass_fields__)
    assert all(set(n.options) <= fields for n in NORMS.values())
    assert NORMS["bn"].options == ("norm_batch", "bn_momentum", "precise_bn") and NORMS["gn"].options == ("groups",)
    assert NORMS["brn"].options == ("norm_batch", "bn_momentum")  # not precise_bn (norms.BatchRenorm2d)
    assert all(not {"norm_batch", "precise_bn"} & set(NORMS[n].options) for n in ("gn", "ln", "in", "none", "frn"))


@pytest.mark.parametrize("norm", ALL_NORMS)
def test_constructors_take_channels_first_and_ignore_other_settings(norm):
    layer = make_norm(norm, 16, groups=8, norm_batch=0, fan_in=144, unknown="ignored")
    x = torch.randn(4, 16, 8, 8)
    assert layer(x).shape == x.shape
    assert isinstance(NORMS[norm].describe(**Config(norm=norm).to_dict()), str)


def _moments(y: torch.Tensor, dims) -> tuple[torch.Tensor, torch.Tensor]:
    var, mean = torch.var_mean(y, dim=dims, unbiased=False)
    return mean, var


def test_instance_norm_statistics_are_per_sample_and_channel():
    layer = make_norm("in", 8)
    assert isinstance(layer, nn.GroupNorm) and layer.num_groups == layer.num_channels == 8 and layer.affine
    x = torch.randn(4, 8, 6, 6) * torch.arange(1.0, 9.0)[:, None, None] + torch.randn(4, 8, 1, 1) * 5
    y = layer(x)
    mean, var = _moments(y, (2, 3))  # (B, C): each sample's each channel on its own
    torch.testing.assert_close(mean, torch.zeros(4, 8), atol=1e-5, rtol=0)
    torch.testing.assert_close(var, torch.ones(4, 8), atol=1e-3, rtol=0)
    torch.testing.assert_close(y, F.instance_norm(x, eps=layer.eps))  # the textbook definition
    # no batch statistics and no running ones: another sample, or eval mode, leaves a sample's output alone
    assert not list(layer.buffers())
    torch.testing.assert_close(layer(x[:1]), y[:1])
    torch.testing.assert_close(layer.eval()(x), y)


def _gratings(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Class k: a sine grating at angle k*pi/10, random phase, a random colour offset per image, and noise."""
    labels = torch.arange(n) % 10
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    angle = labels[:, None, None] * torch.pi / 10
    phase = torch.rand(n, 1, 1, generator=gen) * 2 * torch.pi
    wave = torch.sin((xx * torch.cos(angle) + yy * torch.sin(angle)) * 0.8 + phase)  # (n, 32, 32)
    x = wave[:, None] + torch.randn(n, 3, 1, 1, generator=gen) + 0.5 * torch.randn(n, 3, 32, 32, generator=gen)
    return x, labels


def test_instance_norm_network_learns_spatial_patterns():
    """Instance norm starts slowly (after it, the global pool sees each channel's distribution, not its level),
    so this trains 100 steps at the default lr on classes that differ in their spatial pattern."""
    gen = torch.Generator().manual_seed(0)
    x, y = _gratings(200, gen)
    torch.manual_seed(0)
    model = Net("in")
    opt = torch.optim.SGD(model.parameters(), lr=Config(norm="in").lr, momentum=0.9, nesterov=True)
    with torch.no_grad():
        before = F.cross_entropy(model.eval()(x), y).item()
    model.train()
    for _ in range(100):
        i = torch.randint(0, 200, (20,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x[i]), y[i]).backward()
        opt.step()
    with torch.no_grad():
        after = F.cross_entropy(model.eval()(x), y).item()
    assert after < before - 0.2, (before, after)


def test_none_has_no_statistics_only_a_per_channel_gain_and_bias():
    layer = make_norm("none", 8, fan_in=72)
    assert isinstance(layer, ScaledAffine2d) and not list(layer.buffers())
    assert [n for n, _ in layer.named_parameters()] == ["weight", "bias"]
    torch.testing.assert_close(layer.weight, torch.ones(8))  # the gain starts at 1, as batch norm's
    with torch.no_grad():
        layer.weight.copy_(torch.arange(1.0, 9.0)), layer.bias.copy_(torch.arange(8.0))
    x = torch.randn(3, 8, 5, 5) * 7 + 3
    # scaled weight standardization: the fixed 1/sqrt(fan-in) of the conv before, then the gain and bias
    expected = x * 72 ** -0.5 * torch.arange(1.0, 9.0)[:, None, None] + torch.arange(8.0)[:, None, None]
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer.eval()(x[1:2]), expected[1:2])  # no batch dependence, same in eval


def test_none_network_has_no_normalization_statistics_and_starts_at_a_sane_scale():
    torch.manual_seed(0)
    model = Net("none")
    assert not list(model.buffers())
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d)) for m in model.modules())
    fan_ins = [m.fan_in for m in model.modules() if isinstance(m, ScaledAffine2d)]
    assert fan_ins == [27, 144, 16, 288, 288, 288, 32, 216, 216, 216]  # 3x3 convs: cin*9; c3, c6 (1x1): cin
    x = torch.randn(8, 3, 32, 32)
    model.train()
    y = model(x)
    assert torch.isfinite(y).all() and 1e-3 < y.std() < 10  # neither exploding nor vanishing at the start
    torch.testing.assert_close(model(x[:2]), y[:2])  # each image on its own
    torch.testing.assert_close(model.eval()(x), y)


# ---------------------------------------------------------------- ghost batch norm
def _bn_like(ghost: nn.BatchNorm2d) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(ghost.num_features)
    bn.load_state_dict(ghost.state_dict())
    return bn


def _ghost(channels: int, n: int) -> GhostBatchNorm2d:
    torch.manual_seed(1)
    g = GhostBatchNorm2d(channels, n)
    with torch.no_grad():
        g.weight.uniform_(0.5, 2), g.bias.uniform_(-1, 1)
        g.running_mean.uniform_(-1, 1), g.running_var.uniform_(0.5, 2)
    return g


def test_norm_batch_0_is_exactly_batch_norm_with_the_same_state_dict():
    assert type(make_norm("bn", 16)) is nn.BatchNorm2d
    assert type(make_norm("bn", 16, norm_batch=0)) is nn.BatchNorm2d
    assert type(make_norm("bn", 16, norm_batch=32)) is GhostBatchNorm2d
    old, ghost = Net("bn"), Net("bn", norm_batch=32)
    assert {k: v.shape for k, v in old.state_dict().items()} == {k: v.shape for k, v in ghost.state_dict().items()}
    ghost.load_state_dict(old.state_dict())  # a model.pt of either loads into the other
    old.load_state_dict(ghost.state_dict())
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(old.eval()(x), ghost.eval()(x), rtol=0, atol=0)  # eval: the running statistics


def test_from_config_passes_norm_batch_to_batch_norm_only():
    bn = Net.from_config(Config(norm="bn", norm_batch=16))
    ghosts = [m for m in bn.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(ghosts) == 10 and all(type(m) is GhostBatchNorm2d and m.norm_batch == 16 for m in ghosts)
    for norm in ("gn", "ln", "in", "none", "frn"):
        a, b = Net.from_config(Config(norm=norm, norm_batch=16)), Net.from_config(Config(norm=norm))
        assert str(a) == str(b)


def test_ghost_with_norm_batch_equal_to_the_batch_is_batch_norm():
    g = _ghost(6, 8)
    bn = _bn_like(g)
    x = torch.randn(8, 6, 5, 5) * 3 + 1
    torch.testing.assert_close(g(x), bn(x))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(g, name), getattr(bn, name))


@pytest.mark.parametrize("channels_last", [False, True])
def test_ghost_batches_of_2_normalize_each_pair_by_its_own_statistics(channels_last):
    g = _ghost(6, 2)
    start = {k: v.clone() for k, v in g.state_dict().items()}
    x = torch.randn(8, 6, 5, 5) * torch.arange(1.0, 9.0)[:, None, None, None] + torch.randn(8, 1, 1, 1) * 4
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    y = g(x)
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last
    pair_bns = []
    for i in range(0, 8, 2):
        bn = nn.BatchNorm2d(6)
        bn.load_state_dict(start)
        pair_bns.append(bn)
        torch.testing.assert_close(y[i:i + 2], bn(x[i:i + 2]))
        normalized = (y[i:i + 2] - g.bias[:, None, None]) / g.weight[:, None, None]
        mean, var = _moments(normalized, (0, 2, 3))
        torch.testing.assert_close(mean, torch.zeros(6), atol=1e-5, rtol=0)
        torch.testing.assert_close(var, torch.ones(6), atol=1e-3, rtol=0)
    # the running statistics move once, towards the mean of the pairs' statistics: the average of four batch norms
    torch.testing.assert_close(g.running_mean, torch.stack([bn.running_mean for bn in pair_bns]).mean(0))
    torch.testing.assert_close(g.running_var, torch.stack([bn.running_var for bn in pair_bns]).mean(0))
    assert g.num_batches_tracked.item() == 1
    # and the gradients are those of four separate batch norms
    grad_out = torch.randn_like(y)
    (y * grad_out).sum().backward()
    x2 = x.detach().clone().requires_grad_()
    ref = torch.cat([bn(x2[i:i + 2]) for bn, i in zip(pair_bns, range(0, 8, 2))])
    (ref * grad_out).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(g.weight.grad, sum(bn.weight.grad for bn in pair_bns))
    torch.testing.assert_close(g.bias.grad, sum(bn.bias.grad for bn in pair_bns))


def test_a_batch_that_does_not_split_evenly_ends_with_one_smaller_group():
    g = _ghost(4, 32)
    start = {k: v.clone() for k, v in g.state_dict().items()}
    x = torch.randn(80, 4, 3, 3)  # the last batch of an epoch: 50,000 % 128 = 80 images -> 32, 32, 16
    y = g(x)
    bns, sizes = [], [32, 32, 16]
    for lo, n in zip([0, 32, 64], sizes):
        bn = nn.BatchNorm2d(4)
        bn.load_state_dict(start)
        torch.testing.assert_close(y[lo:lo + n], bn(x[lo:lo + n]))
        bns.append(bn)
    weights = torch.tensor(sizes, dtype=torch.float32)[:, None] / 80
    torch.testing.assert_close(g.running_mean, (torch.stack([b.running_mean for b in bns]) * weights).sum(0))
    torch.testing.assert_close(g.running_var, (torch.stack([b.running_var for b in bns]) * weights).sum(0))


def test_ghost_batch_norm_evaluates_with_the_running_statistics():
    g = _ghost(4, 2)
    g(torch.randn(8, 4, 3, 3))
    g.eval()
    x = torch.randn(5, 4, 3, 3)
    expected = F.batch_norm(x, g.running_mean, g.running_var, g.weight, g.bias, False, 0.0, g.eps)
    torch.testing.assert_close(g(x), expected)
    torch.testing.assert_close(g(x[:1]), expected[:1])


def test_a_network_with_ghost_batch_norm_trains_on_any_batch_size():
    torch.manual_seed(0)
    model = Net("bn", norm_batch=32).to(memory_format=torch.channels_last)
    for batch in (128, 80, 33, 7):
        x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
        y = model(x)
        assert y.shape == (batch, 10) and torch.isfinite(y).all()
        y.square().mean().backward()


def test_norm_batch_validation():
    Config(norm="bn", norm_batch=128, batch_size=128).validate()
    Config(norm="bn", norm_batch=1).validate()
    with pytest.raises(ConfigError, match="--norm-batch must be 0"):
        Config(norm="bn", norm_batch=-1).validate()
    Config(norm="bn", norm_batch=256).validate()  # groups no smaller than the batch are the whole batch (below)
    Config(norm="bn", norm_batch=32, batch_size=16).validate()  # so 32 takes any batch size
    Config(norm="gn", norm_batch=256).validate()  # the other norms ignore it, as batch norm ignores --groups
    with pytest.raises(ConfigError, match="--norm-batch must be 0"):
        Config(norm="gn", norm_batch=-1).validate()


def test_report_names_the_ghost_batches():
    assert NORMS["bn"].describe(**Config().to_dict()) == "BatchNorm2d"  # the default: the whole batch
    assert "groups of 32 images" in NORMS["bn"].describe(**Config(norm_batch=32).to_dict())
    assert "groups of 16 images" in NORMS["bn"].describe(**Config(norm_batch=16).to_dict())
    assert NORMS["bn"].describe(**Config(norm_batch=32, batch_size=32).to_dict()) == "BatchNorm2d"  # one group: the whole batch


def test_ghost_batches_of_32_and_a_batch_of_32_or_fewer_is_plain_batch_norm():
    """The default is plain batch norm (docs/experiments.md, 2026-12-03: "back to the whole batch"); --norm-batch 32 puts a GhostBatchNorm2d in each
    norm's place, and on a batch of 32 or fewer that is plain batch norm, bit for bit."""
    default = [m for m in Net.from_config(Config()).modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(default) == 10 and all(type(m) is nn.BatchNorm2d for m in default)
    model = Net.from_config(Config(norm_batch=32))
    ghosts = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(ghosts) == 10 and all(type(m) is GhostBatchNorm2d and m.norm_batch == 32 for m in ghosts)
    plain = Net.from_config(Config())
    plain.load_state_dict(model.state_dict())
    torch.manual_seed(0)
    x = torch.randn(32, 3, 32, 32)
    torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)
    x = torch.randn(64, 3, 32, 32)
    assert not torch.allclose(model(x), plain(x))  # two groups of 32: other statistics than the whole batch's


def test_a_norms_own_defaults_replace_the_settings_left_at_configs_default():
    import dataclasses

    assert NORMS["none"].defaults == {"lr": 0.1} and all(not NORMS[n].defaults for n in ("bn", "gn", "ln", "in", "brn", "frn"))
    assert Config().lr == 0.2 and Config(norm="none").lr == 0.1
    assert dataclasses.replace(Config(), norm="none").lr == 0.1  # how normlab run makes each norm's config
    assert Config(norm="none", lr=0.05).lr == 0.05  # a value that was asked for is kept
    cfg = Config(norm="none", seed=2)
    assert Config.from_dict(cfg.to_dict()) == cfg and "--lr" in cfg.to_flags()  # config.json and the retrain command say 0.1
    old = Config.from_dict({**Config().to_dict(), "norm": "none", "lr": 0.2})  # a run saved before none had its own lr
    assert old.lr == 0.2 and old.to_dict()["lr"] == 0.2  # resumes and reports as it trained, not at today's 0.1


def test_bn_momentum_reaches_every_batch_norm_and_only_batch_norm():
    for kw in ({}, {"norm_batch": 32}):
        net = Net("bn", bn_momentum=0.4, **kw)
        layers = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
        assert len(layers) == 10 and all(m.momentum == 0.4 for m in layers)
    assert all(m.momentum == 0.1 for m in Net("bn").modules() if isinstance(m, nn.BatchNorm2d))  # PyTorch's default
    gn = Net("gn", bn_momentum=0.4)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in gn.modules())


def test_a_typed_default_that_a_norm_replaces_is_said(capsys):
    """--norm none --lr 0.2: Config cannot tell the typed 0.2 from the default, so none trains at its own 0.1;
    the command line says so instead of dropping the flag silently. Other values and other norms: no note."""
    from normlab.cli import build_parser, note_replaced_defaults

    def note(argv):
        note_replaced_defaults(argv, build_parser().parse_args(argv))
        return capsys.readouterr().out

    assert "none trains at lr 0.1" in note(["train", "--norm", "none", "--lr", "0.2"])
    assert "none trains at lr 0.1" in note(["run", "--norms", "bn,none", "--lr=0.2"])
    assert "none trains at lr 0.1" in note(["sweep", "--norms", "none", "--lr", "0.2"])
    assert note(["train", "--norm", "none", "--lr", "0.3"]) == ""  # a value that is kept
    assert note(["train", "--norm", "bn", "--lr", "0.2"]) == ""
    assert note(["run", "--norms", "bn,gn", "--lr", "0.2"]) == ""
    assert note(["train", "--norm", "none"]) == ""  # nothing typed: nothing to say
