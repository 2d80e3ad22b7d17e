"""The norm registry: name -> constructor(channels, **options), label, memory layout, colour.

Everything the project knows about a norm lives in its ``Norm`` entry, so a new norm is one
entry here (as in timm's ``create_norm``): the network, the command line, the report and the
tests all read ``NORMS``. Every constructor takes the channel count first and the settings it
uses as keywords (ignoring the others), so that norms swap freely.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn


@dataclass(frozen=True)
class Norm:
    name: str                       # the short name on the command line: bn, gn, ln
    label: str                      # the name people read: "Batch Normalization"
    make: Callable[..., nn.Module]  # make(channels, **settings) -> the layer
    layer: str                      # the layer as the report names it; str.format'ed with the settings
    cpu_channels_last: bool         # the faster memory layout on a CPU (measured with benchmarks/speed.py)
    colour: str                     # its colour in every figure
    options: tuple[str, ...] = ()   # the Config settings it reads (others do not change it)

    def describe(self, **settings: Any) -> str:
        return self.layer.format(**settings)


def _batch_norm(channels: int, **_: Any) -> nn.Module:
    return nn.BatchNorm2d(channels)


def _group_norm(channels: int, groups: int = 8, **_: Any) -> nn.Module:
    if channels % groups:
        raise ValueError(f"group norm needs the group count ({groups}) to divide every width; {channels} channels do not split")
    return nn.GroupNorm(groups, channels)


def _layer_norm(channels: int, **_: Any) -> nn.Module:
    # Layer norm for conv maps: statistics over (C, H, W) of each sample = GroupNorm with one group.
    return nn.GroupNorm(1, channels)


# CPU layouts measured on a 2-core AVX512-BF16 CPU (benchmarks/speed.py): PyTorch's group norm with
# several groups is faster on NCHW maps there, batch norm and one-group (layer) norm on channels_last.
NORMS: dict[str, Norm] = {n.name: n for n in (
    Norm("bn", "Batch Normalization", _batch_norm, "BatchNorm2d", True, "tab:blue"),
    Norm("gn", "Group Normalization", _group_norm, "GroupNorm, {groups} groups", False, "tab:orange", ("groups",)),
    Norm("ln", "Layer Normalization", _layer_norm, "GroupNorm, 1 group (over C, H, W)", True, "tab:green"),
)}


DEFAULT_NORMS = ("bn", "gn", "ln")  # the assignment's three: what normlab run trains unless told otherwise


def get_norm(name: str) -> Norm:
    """The registry entry of ``name``; an unknown name lists the valid ones."""
    if name not in NORMS:
        raise ValueError(f"unknown norm {name!r}; choose one of: {', '.join(NORMS)}")
    return NORMS[name]


def make_norm(name: str, channels: int, **settings: Any) -> nn.Module:
    """The norm layer called ``name`` for ``channels`` channels (``settings``: groups=..., others ignored)."""
    return get_norm(name).make(channels, **settings)
