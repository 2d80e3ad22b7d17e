"""The network: parameter budget, layer order, output shape, and clear errors for bad settings."""
import pytest
import torch
from torch import nn

from normlab.config import Config, ConfigError
from normlab.models import LAYER_ORDER, PARAM_BUDGET, ConvBlock, Net, PoolBlock, WSConv2d, count_params, whiten_
from normlab.norms import DEFAULT_NORMS, NORMS, BatchRenorm2d, FilterResponseNormTlu2d, GhostBatchNorm2d, ScaledAffine2d, make_norm

ALL_NORMS = list(NORMS)  # every norm of the registry
NORM_KINDS = (nn.BatchNorm2d, nn.GroupNorm, ScaledAffine2d, FilterResponseNormTlu2d)  # the layers the registry makes


def norm_layers(model: Net) -> list[nn.Module]:
    """The norm of every conv block (C1..C9, and c3, c6 or their pools), by position in the block, not by type."""
    return [m[1] if isinstance(m, ConvBlock) else m.norm for m in model.modules() if isinstance(m, (ConvBlock, PoolBlock))]


def test_norms_are_the_seven_and_the_default_run_the_three():
    assert ALL_NORMS == ["bn", "gn", "ln", "in", "none", "brn", "frn"]
    assert DEFAULT_NORMS == ("bn", "gn", "ln")


@pytest.mark.parametrize("channels_last", [False, True])
def test_weight_standardized_conv_is_the_formula_written_out(channels_last):
    # each filter standardized over its (in, k, k) weights: (w - mean) / sqrt(biased var + 1e-5), forward and backward,
    # also for channels_last filters (a channels_last model), which are standardized in their own memory order
    torch.manual_seed(0)
    conv = WSConv2d(6, 5, 3, padding=1, bias=False)
    if channels_last:
        conv = conv.to(memory_format=torch.channels_last)
    with torch.no_grad():
        conv.weight.mul_(torch.linspace(0.1, 10, 5)[:, None, None, None]).add_(torch.arange(5.0)[:, None, None, None])
    x = torch.randn(2, 6, 8, 8)
    w = conv.weight.detach().contiguous().requires_grad_(True)
    var, mean = torch.var_mean(w, dim=(1, 2, 3), keepdim=True, unbiased=False)
    expected = nn.functional.conv2d(x, (w - mean) / torch.sqrt(var + 1e-5), padding=1)
    out = conv(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    (expected * g).sum().backward()
    torch.testing.assert_close(conv.weight.grad, w.grad, rtol=1e-4, atol=1e-5)
    std = nn.functional.layer_norm(conv.weight, conv.weight.shape[1:], eps=1e-5)  # the filters the conv uses
    torch.testing.assert_close(std.mean(dim=(1, 2, 3)), torch.zeros(5), atol=1e-6, rtol=0)


def test_parameter_counts():
    # every norm has a scale and a bias per channel (none: its affine layer), so all have the same count, but frn,
    # whose TLU adds a threshold per channel (256 over the ten norms)
    assert {norm: count_params(Net(norm)) for norm in ALL_NORMS} == {**dict.fromkeys(ALL_NORMS, 47_978), "frn": 48_234}
    assert count_params(Net("bn", norm_batch=32)) == 47_978  # ghost batches add no parameters


@pytest.mark.parametrize("norm", ALL_NORMS)
def test_parameter_budget(norm):
    model = Net(norm)
    n = count_params(model)
    assert 0 < n < PARAM_BUDGET == 50_000
    assert n == sum(p.numel() for p in model.parameters())  # every parameter is trained


@pytest.mark.parametrize("norm", ALL_NORMS)
def test_layer_order_registered_and_applied(norm):
    model = Net(norm)
    assert LAYER_ORDER == ("C1", "C2", "c3", "P1", "C3", "C4", "C5", "c6", "P2", "C7", "C8", "C9", "GAP", "C10")
    assert tuple(name for name, _ in model.named_children()) == LAYER_ORDER
    called = []
    for name, module in model.named_children():
        module.register_forward_hook(lambda m, i, o, name=name: called.append(name))
    model.eval()
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert tuple(called) == LAYER_ORDER


@pytest.mark.parametrize("norm", ALL_NORMS)
def test_norm_layers_are_the_named_kind(norm):
    model = Net(norm)
    norms = norm_layers(model)
    assert len(norms) == 10  # one in each conv block, C1..C9 with c3 and c6; none after C10
    assert norms == [m for m in model.modules() if isinstance(m, NORM_KINDS)]  # and no other norm anywhere
    if norm == "bn":
        assert all(type(m) is nn.BatchNorm2d for m in norms)  # exactly batch norm (not ghost) by default
    elif norm == "brn":
        assert all(type(m) is BatchRenorm2d and m.norm_batch == 0 for m in norms)
    elif norm == "frn":
        assert all(type(m) is FilterResponseNormTlu2d for m in norms) and not list(model.buffers())
    elif norm == "none":
        assert all(type(m) is ScaledAffine2d for m in norms) and not list(model.buffers())
    else:
        assert all(type(m) is nn.GroupNorm for m in norms)
        groups = {"gn": [model.groups] * 10, "ln": [1] * 10, "in": [m.num_channels for m in norms]}[norm]
        assert [m.num_groups for m in norms] == groups


def test_ghost_batch_norm_in_every_block():
    norms = norm_layers(Net("bn", norm_batch=16))
    assert len(norms) == 10 and all(type(m) is GhostBatchNorm2d and m.norm_batch == 16 for m in norms)


@pytest.mark.parametrize("norm", ALL_NORMS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_output_shape(norm, channels_last):
    model = Net(norm)
    x = torch.randn(5, 3, 32, 32)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    model.train()
    y = model(x)
    assert y.shape == (5, 10) and y.dtype == torch.float32 and torch.isfinite(y).all()


def test_unknown_norm_lists_valid_names():
    """One message, the registry's (a ConfigError, also a ValueError), whoever asks: the network, make_norm, Config."""
    for make in (lambda: Net("xx"), lambda: make_norm("xx", 16), lambda: Config(norm="xx").validate()):
        with pytest.raises(ConfigError) as e:
            make()
        assert isinstance(e.value, ValueError)
        assert "unknown norm 'xx'" in str(e.value) and all(n in str(e.value) for n in ALL_NORMS)
    with pytest.raises(ConfigError, match="bn, gn, ln"):
        Config(norm="batch").validate()


@pytest.mark.parametrize("norm", ALL_NORMS)
def test_widths_over_budget(norm):
    n = count_params(Net(norm, widths=(64, 64, 64)))  # the network trusts its settings; the Config checks them
    with pytest.raises(ConfigError, match=f"--widths 64,64,64: widths \\(64, 64, 64\\) give {n:,} parameters; the budget is fewer than 50,000"):
        Config(norm=norm, widths=(64, 64, 64)).validate()


def test_huge_widths_fail_without_allocating():
    # 6.5 billion parameters would need 26 GB; the check runs on the meta device.
    with pytest.raises(ConfigError, match="budget"):
        Config(widths=(10_000, 10_000, 10_000)).validate()


def test_group_count_must_divide_widths():
    with pytest.raises(ValueError, match="divide"):
        Net("gn", widths=(16, 24, 32), groups=5)
    with pytest.raises(ConfigError, match="--groups 5 must divide"):
        Config(norm="gn", groups=5).validate()
    Config(norm="gn", groups=8).validate()
    Config(norm="bn", groups=5).validate()  # groups matter to group norm only
    Config(norm="ln", groups=5).validate()


@pytest.mark.parametrize("norm", ALL_NORMS)
@pytest.mark.parametrize("pool_first", [False, True])
@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_variants_keep_order_budget_and_shape(norm, pool_first, act):
    model = Net(norm, pool_first=pool_first, act=act)
    assert tuple(name for name, _ in model.named_children()) == LAYER_ORDER
    assert count_params(model) == count_params(Net(norm))  # the options move layers, they add no parameters
    kinds = {type(m) for m in model.modules()}
    own = NORMS[norm].own_activation  # frn: its TLU instead (tests/test_brn_frn.py)
    assert (nn.GELU in kinds) == (act == "gelu" and not own) and (nn.ReLU in kinds) == (act == "relu" and not own)
    # pool first: the pools carry the norms of c3 and c6; otherwise the 1x1 convs do.
    assert any(isinstance(m, NORM_KINDS) for m in model.P1.modules()) == pool_first
    assert model(torch.randn(3, 3, 32, 32)).shape == (3, 10)


@pytest.mark.parametrize("norm", ALL_NORMS)
def test_pool_first_runs_the_norm_on_pooled_maps(norm):
    """c3 -> P1 with pool_first equals max-pool, then the norm and ReLU, of c3's conv output."""
    model = Net(norm, pool_first=True).eval()
    x = torch.randn(4, 16, 32, 32)
    pooled = model.P1(model.c3(x))
    expected = model.P1.act(model.P1.norm(torch.nn.functional.max_pool2d(model.c3(x), 2)))
    torch.testing.assert_close(pooled, expected)
    # the CPU pool runs on channels_last, but the block hands back the layout it was given
    assert model.P1(model.c3(x)).is_contiguous()


def test_old_configs_describe_the_old_network():
    """config.json files written before these options existed pooled after the ReLU, flipped at random and trained with
    SGD; those written with Muon before --muon-norm existed did not renormalize the filters; those without norm_batch
    took batch norm's statistics over the whole batch; those written before --lookahead existed had none."""
    old = Config.from_dict({"norm": "bn"})
    assert old.pool_first is False and old.act == "relu" and old.alt_flip is False and old.muon_lr == 0
    assert Config.from_dict({"norm": "bn", "muon_lr": 0.05}).muon_norm is False
    assert old.norm_batch == 0  # batch norm over the whole batch, before ghost batches of 32 became the default
    assert old.precise_bn == 0  # and the running averages of training, before --precise-bn
    assert old.lookahead == 0  # no Lookahead before --lookahead existed (0.95 the default since 0.7.0)
    new = Config.from_dict(Config().to_dict())
    assert new.pool_first is True and new.alt_flip is True and new.muon_lr == 0.02 and new.muon_norm is True
    assert new.precise_bn == Config().precise_bn
    assert new.lookahead == Config().lookahead == 0.95
    assert new.norm_batch == 0  # ghost batches of 32 were the default for a few hours of 2026-12-03, never released
    assert (old.crop_fill, old.clean_epochs) == ("zero", 0)  # zero-padded crops in every epoch before 0.8.0
    assert (new.crop_fill, new.clean_epochs) == (Config().crop_fill, Config().clean_epochs) == ("reflect", 2)


def test_unknown_activation():
    with pytest.raises(ConfigError, match="--act must be one of: relu, gelu"):
        Config(act="tanh").validate()


def test_logit_scale_multiplies_the_output_and_keeps_the_parameters():
    torch.manual_seed(0)
    plain = Net("gn").eval()
    scaled = Net.from_config(Config(norm="gn", logit_scale=0.25)).eval()
    scaled.load_state_dict(plain.state_dict())  # no parameter or buffer of its own: the same state loads
    assert count_params(scaled) == count_params(plain)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(scaled(x), 0.25 * plain(x))
    for bad in (0.0, -1.0, 101.0):
        with pytest.raises(ConfigError, match="--logit-scale must be above 0 and at most 100"):
            Config(logit_scale=bad).validate()


@pytest.mark.parametrize("norm", ALL_NORMS)
def test_zero_init_res_starts_each_residual_branch_at_zero(norm):
    model = Net(norm, zero_init_res=True)
    assert count_params(model) == count_params(Net(norm))
    x1 = torch.randn(2, 16, 32, 32)
    assert torch.count_nonzero(model.C2(x1)) == 0  # so C2(x1) + x1 is x1 at the start
    x3 = torch.randn(2, 32, 16, 16)
    assert torch.count_nonzero(model.C5(model.C4(x3))) == 0
    assert torch.count_nonzero(Net(norm).C2(x1)) > 0


def test_identity_init_makes_each_3x3_conv_pass_its_channels_through():
    """--identity-init: the first min(in, out) filters of every 3x3 conv are Dirac deltas; the others, the 1x1
    convs and C10 keep their random start; the parameter count is unchanged."""
    torch.manual_seed(0)
    plain = Net("bn", weight_std=False)
    torch.manual_seed(0)
    net = Net("bn", weight_std=False, identity_init=True)
    assert count_params(net) == count_params(plain)
    x = torch.randn(2, 16, 8, 8)
    for name in ("C1", "C2", "C3", "C4", "C5", "C7", "C8", "C9"):
        conv = getattr(net, name)[0]
        k = min(conv.in_channels, conv.out_channels)
        xin = x[:, : conv.in_channels].repeat(1, 4, 1, 1)[:, : conv.in_channels] if conv.in_channels > 16 else torch.randn(2, conv.in_channels, 8, 8)
        assert torch.equal(conv(xin)[:, :k], xin[:, :k]), name
        assert torch.equal(conv.weight[k:], getattr(plain, name)[0].weight[k:]), name  # the rest as before
    for name in ("c3", "c6", "C10"):
        assert torch.equal(getattr(net, name).weight, getattr(plain, name).weight)


def test_whitening_filters_decorrelate_the_patches():
    """whiten_: filter i and its negative i + out/2; the first out/2 filters' responses to the images' 3x3 patches
    have a second moment of about the identity (eps = 5e-4 keeps it just under 1), on anisotropic data."""
    torch.manual_seed(0)
    x = torch.randn(300, 3, 32, 32) * torch.tensor([1.0, 3.0, 0.3]).view(1, 3, 1, 1)
    x = x + 0.8 * x.roll(1, dims=3)  # neighbouring pixels correlated
    conv = nn.Conv2d(3, 16, 3, bias=False)
    values = whiten_(conv, x, chunk=70)  # chunks that do not divide the images evenly
    assert values.shape == (8,) and torch.all(values[:-1] >= values[1:])
    assert torch.equal(conv.weight[8:], -conv.weight[:8])
    y = torch.nn.functional.conv2d(x, conv.weight[:8]).transpose(0, 1).reshape(8, -1).double()
    assert torch.allclose(y @ y.T / y.shape[1], torch.eye(8, dtype=torch.float64), atol=2e-3)
    with pytest.raises(ValueError, match="at most 54 filters"):
        whiten_(nn.Conv2d(3, 60, 3), x)


@pytest.mark.parametrize("whiten", ["off", "frozen", "train"])
def test_a_whitened_c1_is_a_plain_conv_and_counts_towards_the_budget(whiten):
    net = Net("bn", whiten=whiten)
    assert count_params(net) == 47_978  # frozen parameters count too
    assert isinstance(net.C1[0], nn.Conv2d) and (type(net.C1[0]) is nn.Conv2d) == (whiten != "off")
    assert net.C1[0].weight.requires_grad == (whiten != "frozen") and all(
        p.requires_grad for n, p in net.named_parameters() if n != "C1.0.weight")


def test_no_norm_scale_cannot_go_with_zero_init_res():
    with pytest.raises(ConfigError, match="--no-norm-scale and --zero-init-res"):
        Config(zero_init_res=True, norm_scale=False).validate()


@pytest.mark.parametrize("norm", ["bn", "gn"])
def test_skips_every_adds_each_conv_input_to_its_output(norm):
    """--skips every: with every branch started at zero (--zero-init-res), each stage is the identity after its first
    conv, so the network is C1, c3/P1, c6/P2, GAP, C10 alone; with the default pairs, C3 and C7 still act."""
    torch.manual_seed(0)
    net = Net(norm, skips="every", zero_init_res=True).eval()
    assert count_params(net) == count_params(Net(norm))
    x = torch.randn(4, 3, 32, 32)
    short = net.C10(net.GAP(net.P2(net.c6(net.P1(net.c3(net.C1(x))))))).flatten(1)
    assert torch.allclose(net(x), short, atol=1e-6)
    pairs = Net(norm, zero_init_res=True).eval()
    pairs.load_state_dict(net.state_dict())
    assert not torch.allclose(pairs(x), short, atol=1e-3)
    with pytest.raises(ConfigError, match="--skips must be one of: pairs, every"):
        Config(skips="all").validate()


@pytest.mark.parametrize("norm", ALL_NORMS)
def test_norm_layers_are_the_ten_norms_after_the_convs(norm):
    """models.norm_layers: the norm after each conv but C10 (C1, C2, c3, C3, C4, C5, c6, C7, C8, C9), each with a
    per-channel scale and shift, and nothing else; what --norm-bias-lr and --no-norm-scale act on."""
    model = Net(norm, whiten="frozen", norm_batch=32 if norm == "bn" else 0)
    layers = norm_layers(model)
    assert len(layers) == 10 and not any(isinstance(m, torch.nn.Conv2d) for m in layers)
    assert all(m.weight.shape == m.bias.shape == (m.weight.numel(),) for m in layers)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    owned = {id(p) for m in layers for p in m.parameters()} | {id(p) for m in convs for p in m.parameters()}
    assert owned == {id(p) for p in model.parameters()}  # nothing else in the network has parameters
