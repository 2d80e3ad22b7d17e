"""The norm registry: name -> constructor(channels, **options), label, memory layout, colour.

Everything the project knows about a norm lives in its ``Norm`` entry, so a new norm is one
entry here (as in timm's ``create_norm``): the network, the command line, the report and the
tests all read ``NORMS``. Every constructor takes the channel count first and the settings it
uses as keywords (ignoring the others), so that norms swap freely.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from normlab.errors import ConfigError


@dataclass(frozen=True)
class Norm:
    name: str                       # the short name on the command line: bn, gn, ln, ...
    label: str                      # the name people read: "Batch Normalization"
    make: Callable[..., nn.Module]  # make(channels, **settings) -> the layer
    layer: str | Callable[..., str]  # the layer as the report names it; str.format'ed with the settings, or called with them
    cpu_channels_last: bool         # the faster memory layout on a CPU (measured with benchmarks/speed.py)
    colour: str                     # its colour in every figure
    options: tuple[str, ...] = ()   # the Config settings only it reads, in its layer or (precise_bn) the trainer
    # The layout on CUDA: PyTorch's CUDA group norm kernels work on NCHW and convert channels_last maps
    # back and forth, so every GroupNorm-based norm runs NCHW there (benchmarks/gpu_check.sh measures both).
    cuda_channels_last: bool = True
    # Settings this norm trains with instead of Config's defaults (none: lr 0.1); a setting left at Config's
    # default takes this value (Config.__post_init__), one given otherwise is kept.
    defaults: dict[str, Any] = field(default_factory=dict, hash=False)
    # The layer ends with its own nonlinearity (FRN's TLU): the blocks put no activation (--act) after it.
    own_activation: bool = False

    def describe(self, **settings: Any) -> str:
        return self.layer(**settings) if callable(self.layer) else self.layer.format(**settings)


class GhostBatchNorm2d(nn.BatchNorm2d):
    """Batch norm whose training statistics come from groups of ``norm_batch`` consecutive images.

    "Ghost batch norm" (Hoffer et al., 2017, "Train longer, generalize better"): the statistics'
    batch size varies while the optimizer's stays fixed. A batch that does not split evenly ends
    with one smaller group (the last 80 images of an epoch at ``norm_batch`` 32: 32, 32, 16); a
    batch of ``norm_batch`` images or fewer is one group, i.e. plain batch norm. The running
    statistics are updated once per batch, towards the mean over its groups of their mean and
    (unbiased) variance, weighted by group size: the average of per-group running statistics, as
    David Page's GhostBatchNorm (myrtle.ai, 2018; airbench's early versions) keeps them, but in
    BatchNorm2d's own buffers, so that state_dict keys and shapes are those of BatchNorm2d.
    Evaluation uses the running statistics, as batch norm does.

    Each group is a slice of the batch (a view, also of channels_last maps) run through PyTorch's
    own batch-norm kernels; the reshape (B, C, H, W) -> (B/k, k*C, H, W) of those versions needs
    a batch divisible by k and copies channels_last maps, and per-image statistics combined by
    hand made a CPU training step 1.7x slower than batch norm's (this: 1.14x for groups of 32;
    docs/experiments.md, 2026-11-27: "Instance norm, no norm, ghost batch norm").
    """

    def __init__(self, channels: int, norm_batch: int):
        super().__init__(channels)
        if norm_batch < 1:
            raise ValueError(f"ghost batch norm needs a group size of at least 1 image (got {norm_batch})")
        self.norm_batch = norm_batch

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, norm_batch={self.norm_batch}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        if not self.training or x.shape[0] <= self.norm_batch:
            return super().forward(x)  # evaluation (running statistics), or a single group: plain batch norm
        outs, means, variances, sizes = [], [], [], []
        for group in x.split(self.norm_batch):  # (n, C, H, W) views
            mean, var = torch.zeros_like(self.running_mean), torch.ones_like(self.running_var)
            # momentum 1 on fresh buffers: they come back holding the group's mean and unbiased variance
            outs.append(F.batch_norm(group, mean, var, self.weight, self.bias, True, 1.0, self.eps))
            means.append(mean)
            variances.append(var)
            sizes.append(group.shape[0])
        with torch.no_grad():  # as BatchNorm2d: momentum, or a cumulative average when it is None
            w = torch.tensor(sizes, dtype=self.running_mean.dtype, device=x.device)[:, None] / x.shape[0]  # (G, 1)
            self.num_batches_tracked.add_(1)
            m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.lerp_((torch.stack(means) * w).sum(0), m)
            self.running_var.lerp_((torch.stack(variances) * w).sum(0), m)
        return torch.cat(outs)


# Batch renormalization's schedule, as fractions of the run's optimizer steps (the paper's steps, below, over ~100k)
RENORM_WARMUP = 0.05     # plain batch norm (r_max 1, d_max 0) before this
RENORM_R_FULL = 0.40     # r_max has risen linearly from 1 to R_MAX by this
RENORM_D_FULL = 0.25     # d_max has risen linearly from 0 to D_MAX by this
R_MAX, D_MAX = 3.0, 5.0


def renorm_limits(progress: float) -> tuple[float, float]:
    """Batch renormalization's clipping limits (r_max, d_max) after the fraction ``progress`` of the run's steps.

    Ioffe (2017) trained with plain batch norm (r_max 1, d_max 0) for the first 5,000 steps, then relaxed
    the limits gradually to r_max 3 at 40,000 steps and d_max 5 at 25,000, of a run of about 100,000 and more.
    The same as fractions of the run, so that a run of any length gets the whole ramp: plain batch norm for the
    first 5 % of the steps, then linear ramps that reach r_max 3 at 40 % and d_max 5 at 25 %, held to the end.
    """
    def ramp(full: float) -> float:  # 0 before the warm-up, 1 from ``full`` on, linear between
        return min(1.0, max(0.0, (progress - RENORM_WARMUP) / (full - RENORM_WARMUP)))

    return 1.0 + (R_MAX - 1.0) * ramp(RENORM_R_FULL), D_MAX * ramp(RENORM_D_FULL)


class BatchRenorm2d(nn.BatchNorm2d):
    """Batch renormalization (Ioffe, 2017, "Batch Renormalization: Towards Reducing Minibatch Dependence in
    Batch-Normalized Models"): batch norm whose training output is corrected toward the running statistics.

    In training each group of ``norm_batch`` consecutive images (0: the whole batch; as ``GhostBatchNorm2d``
    splits it) is normalized by its own mean mu_B and standard deviation sigma_B (biased variance + eps, as batch
    norm), then corrected: y = gamma * (x_hat * r + d) + beta with r = clip(sigma_B / sigma, 1/r_max, r_max) and
    d = clip((mu_B - mu) / sigma, -d_max, d_max), mu and sigma = sqrt(running_var + eps) the running statistics
    before this batch. r and d are constants to the gradient (it flows through x_hat alone). Unclipped, the
    correction makes the output (x - mu) / sigma: what evaluation computes, so training sees what inference will.
    r_max 1 and d_max 0 give r = 1, d = 0: batch norm (ghost batch norm with ``norm_batch``).

    The running statistics are updated as ``GhostBatchNorm2d`` updates them (once per batch, towards the
    size-weighted mean of its groups' means and unbiased variances; with one group, as batch norm); evaluation
    uses them, exactly as ``nn.BatchNorm2d``. The state_dict is BatchNorm2d's: the limits r_max and d_max are
    buffers outside it, set before every training step by ``set_progress`` (``renorm_limits``: plain batch norm
    until set). They are device tensors filled in place, so that a compiled network or a captured step reads
    each step's values instead of baking in the first.
    """

    def __init__(self, channels: int, norm_batch: int = 0):
        super().__init__(channels)
        if norm_batch < 0:
            raise ValueError(f"batch renormalization needs a group size of 0 (the whole batch) or more images (got {norm_batch})")
        self.norm_batch = norm_batch
        self.register_buffer("r_max", torch.tensor(1.0), persistent=False)
        self.register_buffer("d_max", torch.tensor(0.0), persistent=False)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, norm_batch={self.norm_batch}"

    def set_progress(self, progress: float) -> None:
        """The limits of the fraction ``progress`` of the run's optimizer steps (``renorm_limits``)."""
        r_max, d_max = renorm_limits(progress)
        self.r_max.fill_(r_max)
        self.d_max.fill_(d_max)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        if not self.training:
            return super().forward(x)  # the running statistics, as batch norm
        with torch.no_grad():
            sigma = (self.running_var + self.eps).sqrt()  # (C,), the running statistics before this batch
        outs, means, variances = [], [], []
        for group in (x.split(self.norm_batch) if self.norm_batch else (x,)):  # (n, C, H, W) views
            mean, var = torch.zeros_like(self.running_mean), torch.ones_like(self.running_var)
            # momentum 1 on fresh buffers: they come back holding the group's mean and unbiased variance
            x_hat = F.batch_norm(group, mean, var, None, None, True, 1.0, self.eps)
            with torch.no_grad():
                count = group.numel() // group.shape[1]  # values per channel
                sigma_b = (var * ((count - 1) / count) + self.eps).sqrt()  # the biased variance that x_hat used
                r = torch.clamp(sigma_b / sigma, 1 / self.r_max, self.r_max)
                d = torch.clamp((mean - self.running_mean) / sigma, -self.d_max, self.d_max)
            scale, shift = self.weight * r, self.bias + self.weight * d  # (C,): gamma r, beta + gamma d
            outs.append(torch.addcmul(shift[:, None, None].to(x_hat.dtype), x_hat, scale[:, None, None].to(x_hat.dtype)))
            means.append(mean * (group.shape[0] / x.shape[0]))
            variances.append(var * (group.shape[0] / x.shape[0]))
        with torch.no_grad():  # as GhostBatchNorm2d: momentum, or a cumulative average when it is None
            self.num_batches_tracked.add_(1)
            m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.lerp_(sum(means), m)
            self.running_var.lerp_(sum(variances), m)
        return torch.cat(outs) if len(outs) > 1 else outs[0]


class FilterResponseNormTlu2d(nn.Module):
    """Filter response normalization with a thresholded linear unit (Singh and Krishnan, 2019, "Filter Response
    Normalization Layer: Eliminating Batch Dependence in the Training of Deep Neural Networks").

    z = max(gamma * x / sqrt(nu2 + eps) + beta, tau), nu2 = the mean of x^2 over (H, W) of each image and channel:
    no mean subtracted, no batch statistic, the same in training and evaluation. gamma (``weight``, starts at 1),
    beta (``bias``, 0) and the TLU's threshold tau (0) are learned per channel, as in timm's
    ``FilterResponseNormTlu2d``; the TLU is the nonlinearity, so the blocks put no activation after it
    (``Norm.own_activation``). eps is fixed at the paper's 1e-6 (timm: 1e-5): the paper makes it learnable only
    for maps of 1x1, where nu2 can be tiny; this network's smallest maps are 8x8 (C7-C9), 64 values per mean.
    nu2 is averaged in float32 also under bf16 autocast, as timm does.
    """

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.tau = nn.Parameter(torch.zeros(channels))

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, eps={self.eps}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        nu2 = x.square().mean(dim=(2, 3), keepdim=True, dtype=torch.float32)  # (B, C, 1, 1)
        scale = (nu2 + self.eps).rsqrt() * self.weight[:, None, None]  # gamma / sqrt(nu2 + eps)
        # the TLU as max(y, tau) = relu(y - tau) + tau, tau folded into the shift: the same function (up to rounding),
        # whose backward took a sixth of torch.maximum's on a CPU (bf16, one thread, 128x32x16x16 maps)
        u = torch.addcmul((self.bias - self.tau)[:, None, None].to(x.dtype), x, scale.to(x.dtype))
        return F.relu(u, inplace=True) + self.tau[:, None, None].to(x.dtype)


def _batch_norm(channels: int, norm_batch: int = 0, bn_momentum: float = 0.1, **_: Any) -> nn.Module:
    # norm_batch 0 (the whole optimizer batch) is exactly nn.BatchNorm2d: the same training, bit for bit.
    layer = GhostBatchNorm2d(channels, norm_batch) if norm_batch else nn.BatchNorm2d(channels)
    layer.momentum = bn_momentum  # of the running statistics (PyTorch's convention: the weight of the new batch)
    return layer


def _ghost_groups(norm_batch: int = 0, batch_size: int = 0) -> str:
    # Groups as large as the batch are the whole batch: plain batch statistics, whatever --norm-batch says.
    ghost = norm_batch and not (batch_size and norm_batch >= batch_size)
    return f", statistics over groups of {norm_batch} images (ghost batches)" if ghost else ""


def _describe_batch_norm(norm_batch: int = 0, batch_size: int = 0, **_: Any) -> str:
    return "BatchNorm2d" + _ghost_groups(norm_batch, batch_size)


def _batch_renorm(channels: int, norm_batch: int = 0, bn_momentum: float = 0.1, **_: Any) -> nn.Module:
    layer = BatchRenorm2d(channels, norm_batch)
    layer.momentum = bn_momentum
    return layer


def _describe_batch_renorm(norm_batch: int = 0, batch_size: int = 0, **_: Any) -> str:
    return (f"BatchNorm2d renormalized toward its running statistics (r_max 1 -> {R_MAX:g}, d_max 0 -> {D_MAX:g} "
            f"over {RENORM_WARMUP:.0%}-{RENORM_R_FULL:.0%} and {RENORM_WARMUP:.0%}-{RENORM_D_FULL:.0%} of the steps)"
            + _ghost_groups(norm_batch, batch_size))


def _filter_response_norm(channels: int, **_: Any) -> nn.Module:
    return FilterResponseNormTlu2d(channels)


def _group_norm(channels: int, groups: int = 8, **_: Any) -> nn.Module:
    if channels % groups:
        raise ValueError(f"group norm needs the group count ({groups}) to divide every width; {channels} channels do not split")
    return nn.GroupNorm(groups, channels)


def _layer_norm(channels: int, **_: Any) -> nn.Module:
    # Layer norm for conv maps: statistics over (C, H, W) of each sample = GroupNorm with one group.
    return nn.GroupNorm(1, channels)


def _instance_norm(channels: int, **_: Any) -> nn.Module:
    # Instance norm: statistics over (H, W) of each sample and channel = GroupNorm with one channel per group
    # (affine and without running statistics, unlike nn.InstanceNorm2d's defaults).
    return nn.GroupNorm(channels, channels)


class ScaledAffine2d(nn.Module):
    """No normalization: a per-channel gain and bias (batch norm's affine part) after a fixed 1/sqrt(fan-in), no statistics.

    A weight-standardized conv gives each filter unit variance, not 1/fan-in, so without a norm
    the activations would grow by about sqrt(fan-in) per layer (x17 for a 3x3 conv of 32
    channels). The fixed factor 1/sqrt(fan-in) of the conv before it makes that conv a *scaled*
    weight-standardized one, as in NF-ResNets (Brock et al., 2021, "Characterizing signal
    propagation to close the performance gap in unnormalized ResNets"), and the learnable gain
    starts at 1 as theirs does. A learnable scale that starts at 1/sqrt(fan-in) instead gets a
    fan-in times larger step and diverged on the validation split even at lr 0.05; this form
    trains at lr 0.1 (docs/experiments.md, 2026-11-27: "Instance norm, no norm, ghost batch norm").
    """

    def __init__(self, channels: int, fan_in: int = 1):
        super().__init__()
        self.fan_in = fan_in
        self.weight = nn.Parameter(torch.ones(channels))  # the gain, as batch norm's weight
        self.bias = nn.Parameter(torch.zeros(channels))

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, fan_in={self.fan_in}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        return torch.addcmul(self.bias[:, None, None], x, self.weight[:, None, None] * self.fan_in ** -0.5)


def _no_norm(channels: int, fan_in: int = 1, **_: Any) -> nn.Module:
    return ScaledAffine2d(channels, fan_in)


# CPU layouts measured on a 2-core AVX512-BF16 CPU (benchmarks/speed.py): PyTorch's group norm with
# several groups is faster on NCHW maps there, batch norm and one-group (layer) norm on channels_last.
# Instance norm (NCHW) and none (channels_last): benchmarks/profile_step.py --layout cl | nchw, one thread of a
# 2-core fp32 CPU (docs/experiments.md, 2026-11-27: "Instance norm, no norm, ghost batch norm"). brn and frn: the
# same, bf16, one thread of a 2-core AVX512-BF16 CPU shared with other work (noisy): brn's step 206 / 285 ms channels_last against 284 / 420 NCHW (as bn, channels_last);
# frn no clear winner in seven alternating pairs (medians 450 and 446 ms), so NCHW, as instance norm, its nearest kin.
# On CUDA (not measured) neither runs PyTorch's GroupNorm kernels, so both keep the convolutions' channels_last.
NORMS: dict[str, Norm] = {n.name: n for n in (
    Norm("bn", "Batch Normalization", _batch_norm, _describe_batch_norm, True, "tab:blue", ("norm_batch", "bn_momentum", "precise_bn")),
    Norm("gn", "Group Normalization", _group_norm, "GroupNorm, {groups} groups", False, "tab:orange", ("groups",), cuda_channels_last=False),
    Norm("ln", "Layer Normalization", _layer_norm, "GroupNorm, 1 group (over C, H, W)", True, "tab:green", cuda_channels_last=False),
    Norm("in", "Instance Normalization", _instance_norm, "GroupNorm, 1 channel per group (over H, W)", False, "tab:red",
         cuda_channels_last=False),
    Norm("none", "No normalization", _no_norm, "per-channel gain and bias after a fixed 1/sqrt(fan-in), no statistics",
         True, "tab:gray", defaults={"lr": 0.1}),  # diverged at lr 0.2 on the validation split (docs/experiments.md, 2026-11-27)
    # Not precise_bn: batch renorm ends training normalizing by its running statistics (r and d unclipped), so the
    # layers after it learned, and their running statistics describe, maps normalized that way; precise BN's
    # re-estimate forwards with plain batch statistics, the mismatch that batch renorm removes (BatchRenorm2d).
    Norm("brn", "Batch Renormalization", _batch_renorm, _describe_batch_renorm, True, "tab:cyan", ("norm_batch", "bn_momentum")),
    Norm("frn", "Filter Response Normalization + TLU", _filter_response_norm,
         "FRN + TLU: max(gamma x / sqrt(mean over H, W of x^2 + 1e-6) + beta, tau), the TLU in place of the activation",
         False, "tab:purple", cuda_channels_last=True, own_activation=True),
)}


DEFAULT_NORMS = ("bn", "gn", "ln")  # the three the study compares: what normlab run trains unless told otherwise


def get_norm(name: str) -> Norm:
    """The registry entry of ``name``; an unknown name is a ``ConfigError`` (a ValueError) that lists the valid ones."""
    if name not in NORMS:
        raise ConfigError(f"unknown norm {name!r}; choose one of: {', '.join(NORMS)}")
    return NORMS[name]


def norm_options() -> set[str]:
    """The settings that some norm reads (``NORMS[name].options``): the others change every norm."""
    return {o for n in NORMS.values() for o in n.options}


def reads(norm: str, setting: str) -> bool:
    """Whether ``setting`` can change a model with ``norm``: a norm's own options (``groups`` for gn) change no other norm,
    and ``act`` changes none that brings its own nonlinearity (frn's TLU)."""
    if setting == "act" and NORMS[norm].own_activation:
        return False
    return setting in NORMS[norm].options or setting not in norm_options()


def progress_layers(model: nn.Module) -> list[nn.Module]:
    """The layers of ``model`` that follow the run's progress (batch renorm's limits): each has ``set_progress(fraction)``,
    which the training loop calls before every step with the fraction of the run's steps done."""
    return [m for m in model.modules() if hasattr(m, "set_progress")]


def make_norm(name: str, channels: int, **settings: Any) -> nn.Module:
    """The norm layer called ``name`` for ``channels`` channels.

    ``settings``: the Config settings of its entry's ``options`` (groups=..., norm_batch=...) and
    ``fan_in`` (inputs per output of the conv before it); each norm ignores those it does not read.
    """
    return get_norm(name).make(channels, **settings)
