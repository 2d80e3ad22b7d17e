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
    name: str                       # the short name on the command line: bn, gn, ln
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


def _batch_norm(channels: int, norm_batch: int = 0, bn_momentum: float = 0.1, **_: Any) -> nn.Module:
    # norm_batch 0 (the whole optimizer batch) is exactly nn.BatchNorm2d: the same training, bit for bit.
    layer = GhostBatchNorm2d(channels, norm_batch) if norm_batch else nn.BatchNorm2d(channels)
    layer.momentum = bn_momentum  # of the running statistics (PyTorch's convention: the weight of the new batch)
    return layer


def _describe_batch_norm(norm_batch: int = 0, batch_size: int = 0, **_: Any) -> str:
    # Groups as large as the batch are the whole batch: plain batch norm, whatever --norm-batch says.
    ghost = norm_batch and not (batch_size and norm_batch >= batch_size)
    return f"BatchNorm2d, statistics over groups of {norm_batch} images (ghost batches)" if ghost else "BatchNorm2d"


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
# 2-core fp32 CPU (docs/experiments.md, 2026-11-27: "Instance norm, no norm, ghost batch norm").
NORMS: dict[str, Norm] = {n.name: n for n in (
    Norm("bn", "Batch Normalization", _batch_norm, _describe_batch_norm, True, "tab:blue", ("norm_batch", "bn_momentum", "precise_bn")),
    Norm("gn", "Group Normalization", _group_norm, "GroupNorm, {groups} groups", False, "tab:orange", ("groups",), cuda_channels_last=False),
    Norm("ln", "Layer Normalization", _layer_norm, "GroupNorm, 1 group (over C, H, W)", True, "tab:green", cuda_channels_last=False),
    Norm("in", "Instance Normalization", _instance_norm, "GroupNorm, 1 channel per group (over H, W)", False, "tab:red",
         cuda_channels_last=False),
    Norm("none", "No normalization", _no_norm, "per-channel gain and bias after a fixed 1/sqrt(fan-in), no statistics",
         True, "tab:gray", defaults={"lr": 0.1}),  # diverged at lr 0.2 on the validation split (docs/experiments.md, 2026-11-27)
)}


DEFAULT_NORMS = ("bn", "gn", "ln")  # the three the study compares: what normlab run trains unless told otherwise


def get_norm(name: str) -> Norm:
    """The registry entry of ``name``; an unknown name is a ``ConfigError`` (a ValueError) that lists the valid ones."""
    if name not in NORMS:
        raise ConfigError(f"unknown norm {name!r}; choose one of: {', '.join(NORMS)}")
    return NORMS[name]


def make_norm(name: str, channels: int, **settings: Any) -> nn.Module:
    """The norm layer called ``name`` for ``channels`` channels.

    ``settings``: the Config settings of its entry's ``options`` (groups=..., norm_batch=...) and
    ``fan_in`` (inputs per output of the conv before it); each norm ignores those it does not read.
    """
    return get_norm(name).make(channels, **settings)
