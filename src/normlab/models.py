"""The prescribed network, C1 C2 c3 P1 C3 C4 C5 c6 P2 C7 C8 C9 GAP C10, its blocks, its summary
and its receptive field.

The norm layer is picked by name from the registry in ``norms.py`` so that one network
definition serves every variant; the blocks receive the norm's name, never an ``if`` on it.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from normlab.norms import get_norm, make_norm

PARAM_BUDGET = 50_000  # parameters, trainable or frozen, strictly fewer (the prescribed limit: < 50,000)
NUM_CLASSES = 10
LAYER_ORDER = ("C1", "C2", "c3", "P1", "C3", "C4", "C5", "c6", "P2", "C7", "C8", "C9", "GAP", "C10")


ACTS: dict[str, Callable[[], nn.Module]] = {"relu": lambda: nn.ReLU(inplace=True), "gelu": nn.GELU}


def make_activation(norm: str, act: str) -> nn.Module:
    """The activation after a norm: ``ACTS[act]``, or the identity where the norm ends with its own nonlinearity
    (``Norm.own_activation``: FRN's TLU), so that the blocks stay norm -> activation whatever the norm."""
    return nn.Identity() if get_norm(norm).own_activation else ACTS[act]()


# --skips: the blocks whose output is added to their input ("residual branches"); each list ends its stage's run of convs
SKIPS: dict[str, tuple[str, ...]] = {
    "pairs": ("C2", "C5", "C9"),  # C1 -> C2, C3 -> C5 (over C4, C5), C7 -> C9 (over C8, C9)
    "every": ("C2", "C3", "C4", "C5", "C7", "C8", "C9"),  # every 3x3 conv whose input has its width
}


class WSConv2d(nn.Conv2d):
    """A convolution whose filters are standardized (zero mean, unit variance) on every forward.

    Weight standardization (Qiao et al., 2019, "Micro-Batch Training with Batch-Channel
    Normalization and Weight Standardization") keeps every output channel on the same scale,
    which group and layer norm cannot do themselves (they share statistics across channels).
    On the validation split it lifted layer norm from 38 % to 61 % after 400 steps, and batch
    norm from 69 % to 71 % (docs/experiments.md). It adds no parameters.

    Each filter is standardized by ``F.layer_norm`` over its (in, k, k) weights, without affine:
    (w - mean) / sqrt(biased var + 1e-5), one kernel forward and one backward instead of the five
    ops (and eight backward) of writing the formula out: a bn training step does 327 ATen ops that
    work instead of 517, each about one kernel launch on a GPU (docs/performance.md, 2026-11-28:
    "Fewer launches per step"; filters in their own memory order, below). Runs made before that
    change wrote the formula out: the same filters within 1e-6 but rounded differently, so those runs do not repeat
    bit for bit on this code (within seed noise they do).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        # channels_last filters (a channels_last model) are the same memory as a contiguous (out, k, k, in) tensor:
        # standardized in that order, no copy either way (layer_norm would otherwise make them contiguous, and the
        # conv convert them back, forward and backward)
        cl = not w.is_contiguous() and w.is_contiguous(memory_format=torch.channels_last)
        w = w.permute(0, 2, 3, 1) if cl else w
        w = F.layer_norm(w, w.shape[1:], eps=1e-5)
        return F.conv2d(x, w.permute(0, 3, 1, 2) if cl else w, self.bias, self.stride, self.padding)


def make_conv(cin: int, cout: int, kernel: int, weight_std: bool) -> nn.Conv2d:
    """A bias-free conv with 'same' padding (the norm after it has the bias), weight-standardized or plain."""
    return (WSConv2d if weight_std else nn.Conv2d)(cin, cout, kernel, padding=kernel // 2, bias=False)


class ConvBlock(nn.Sequential):
    """conv (3x3 or 1x1, 'same' padding, no bias: the norm has one) -> norm -> activation (``make_activation``).

    ``norm_kw``: the settings a norm may read (groups, norm_batch); the conv's fan-in is added.
    """

    def __init__(self, cin: int, cout: int, kernel: int, norm: str, norm_kw: dict[str, Any], weight_std: bool = True,
                 act: str = "relu"):
        super().__init__(
            make_conv(cin, cout, kernel, weight_std),
            make_norm(norm, cout, fan_in=cin * kernel * kernel, **norm_kw),
            make_activation(norm, act),
        )


class PoolBlock(nn.Module):
    """2x2 max-pool -> norm -> activation: the pool of a 1x1 conv whose norm and activation follow it.

    Max-pooling before the norm and the activation (as airbench's conv groups do) runs them on a
    quarter of the pixels; on a 2-core CPU this made a batch-norm training step 1.38x faster
    (docs/performance.md). The pool itself always runs on channels_last: PyTorch's CPU max-pool
    of bf16 NCHW maps (the layout of group norm) is about 10x slower.
    """

    def __init__(self, channels: int, norm: str, norm_kw: dict[str, Any], fan_in: int, act: str = "relu"):
        super().__init__()  # fan_in: that of the 1x1 conv before the pool
        self.pool, self.norm = nn.MaxPool2d(2), make_norm(norm, channels, fan_in=fan_in, **norm_kw)
        self.act = make_activation(norm, act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cl = x.is_contiguous(memory_format=torch.channels_last)
        x = self.pool(x.contiguous(memory_format=torch.channels_last))
        return self.act(self.norm(x if cl else x.contiguous()))


class Net(nn.Module):
    """C1 C2 c3 P1 C3 C4 C5 c6 P2 C7 C8 C9 GAP C10.

    Every conv but C10 is weight-standardized (``WSConv2d``) unless ``weight_std`` is False.
    With ``pool_first`` (the default) c3 and c6 are bare convs and P1, P2 are ``PoolBlock``s
    (pool -> norm -> activation); without it c3 and c6 are conv -> norm -> activation and P1, P2
    plain pools. ``act`` is the activation after every norm (``ACTS``: relu, gelu), except after a norm that brings
    its own (frn's TLU).
    ``groups`` and ``norm_batch`` reach the norms that read them (group norm; batch norm's ghost
    batches, 0 = the whole batch).
    ``widths = (w1, w2, w3)``: C1 and C2 have w1 channels at 32x32; c3 maps w1 -> w2 and
    C3..C5 keep w2 at 16x16; c6 maps w2 -> w3 and C7..C9 keep w3 at 8x8; C10 maps w3 -> 10.

    Skip additions (the output of one layer added to the output of a later one), ``skips`` "pairs" (the default):
      * C1 -> C2: ``C2(x1) + x1`` at 32x32,
      * C3 -> C5: ``C5(C4(x3)) + x3`` at 16x16,
      * C7 -> C9: ``C9(C8(x7)) + x7`` at 8x8;
    "every": each 3x3 conv after C1 adds its input to its output (P1 -> C3, C3 -> C4, ..., C8 -> C9), as a
    ResNet of one-conv branches. ``SKIPS`` names each choice's branch ends.
    """

    def __init__(self, norm: str = "bn", widths: Sequence[int] = (16, 32, 24), groups: int = 8, weight_std: bool = True,
                 pool_first: bool = True, act: str = "gelu", zero_init_res: bool = False, norm_batch: int = 0,
                 identity_init: bool = False, whiten: str = "off", bn_momentum: float = 0.1, norm_scale: bool = True,
                 skips: str = "pairs", logit_scale: float = 1.0):
        super().__init__()  # the arguments are a valid Config's (Config.validate checks them, and the budget)
        self.skips = skips
        w1, w2, w3 = (int(w) for w in widths)
        self.norm, self.widths, self.groups, self.weight_std, self.pool_first = norm, (w1, w2, w3), groups, weight_std, pool_first
        self.act, self.norm_batch, self.logit_scale = act, norm_batch, float(logit_scale)
        norm_kw = {"groups": groups, "norm_batch": norm_batch, "bn_momentum": bn_momentum}  # what the norms may read
        norm_args = (norm, norm_kw, weight_std, act)

        def reduce(cin: int, cout: int) -> tuple[nn.Module, nn.Module]:  # the 1x1 conv and the pool after it
            if pool_first:
                return make_conv(cin, cout, 1, weight_std), PoolBlock(cout, norm, norm_kw, cin, act)
            return ConvBlock(cin, cout, 1, *norm_args), nn.MaxPool2d(2)

        # --whiten: C1 is a plain conv (standardizing its filters would undo their 1/sqrt(eigenvalue) scales), its
        # filters set from the training images by whiten_() once the data is at hand; frozen unless "train".
        self.C1 = ConvBlock(3, w1, 3, norm, norm_kw, weight_std and whiten == "off", act)
        self.C1[0].weight.requires_grad_(whiten != "frozen")
        self.C2 = ConvBlock(w1, w1, 3, *norm_args)
        self.c3, self.P1 = reduce(w1, w2)
        self.C3 = ConvBlock(w2, w2, 3, *norm_args)
        self.C4 = ConvBlock(w2, w2, 3, *norm_args)
        self.C5 = ConvBlock(w2, w2, 3, *norm_args)
        self.c6, self.P2 = reduce(w2, w3)
        self.C7 = ConvBlock(w3, w3, 3, *norm_args)
        self.C8 = ConvBlock(w3, w3, 3, *norm_args)
        self.C9 = ConvBlock(w3, w3, 3, *norm_args)
        self.GAP = nn.AdaptiveAvgPool2d(1)
        self.C10 = nn.Conv2d(w3, NUM_CLASSES, 1)
        if not norm_scale:  # airbench's batch norm: the scales stay 1, untrained (still counted); the biases train
            for m in norm_layers(self):
                m.weight.requires_grad_(False)
        if zero_init_res:  # each residual branch starts as the identity: its last norm's scale is 0
            for block in (getattr(self, name) for name in SKIPS[skips]):
                nn.init.zeros_(block[1].weight)
        if identity_init:  # airbench's: each 3x3 conv's first min(in, out) filters pass their input channel through
            for m in self.modules():
                if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3):
                    with torch.no_grad():
                        nn.init.dirac_(m.weight[: min(m.in_channels, m.out_channels)])

    @classmethod
    def from_config(cls, cfg) -> "Net":
        """The network that a ``normlab.config.Config`` describes."""
        # Each argument of the network is the Config setting of the same name (so a new one cannot be left out here).
        return cls(**{name: getattr(cfg, name) for name in inspect.signature(cls).parameters})

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, 32, 32) -> (B, 10)
        x = self.C1(x)
        x = self.C2(x) + x
        x = self.P1(self.c3(x))  # (B, w2, 16, 16)
        if self.skips == "every":
            x = self.C3(x) + x
            x = self.C4(x) + x
            x = self.C5(x) + x
            x = self.P2(self.c6(x))  # (B, w3, 8, 8)
            x = self.C7(x) + x
            x = self.C8(x) + x
            x = self.C9(x) + x
        else:
            x = self.C3(x)
            x = self.C5(self.C4(x)) + x
            x = self.P2(self.c6(x))  # (B, w3, 8, 8)
            x = self.C7(x)
            x = self.C9(self.C8(x)) + x
        logits = self.C10(self.GAP(x)).flatten(1)  # (B, 10)
        return logits if self.logit_scale == 1.0 else logits * self.logit_scale


def norm_layers(model: nn.Module) -> list[nn.Module]:
    """The norm layers of ``model``: every module with parameters of its own that is not a convolution (each has a
    per-channel ``weight`` and ``bias``; none's ``ScaledAffine2d`` too)."""
    return [m for m in model.modules() if not isinstance(m, nn.Conv2d) and next(m.parameters(recurse=False), None) is not None]


def count_params(model: nn.Module) -> int:
    """Every parameter, trainable or frozen (a frozen whitening C1 counts towards the budget too)."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def whiten_(conv: nn.Conv2d, images: torch.Tensor, eps: float = 5e-4, chunk: int = 500) -> torch.Tensor:
    """Set ``conv``'s filters to a patch-whitening bank (airbench's initialization of its first conv).

    ``images``: normalized (N, C, H, W) float training images. The second moment of their k x k
    patches (every position, no padding) is accumulated in float64 over chunks of images; its
    eigenvectors, largest eigenvalue first, scaled by 1/sqrt(eigenvalue + eps), give out/2 filters,
    each followed by its negative (out odd: the last negative left out). The filters' responses
    to the patches are then decorrelated with unit second moment. Returns the eigenvalues used.
    """
    cout, cin, kh, kw = conv.weight.shape
    dim = cin * kh * kw
    if cout > 2 * dim:
        raise ValueError(f"whitening gives at most {2 * dim} filters for {cin}x{kh}x{kw} patches, C1 has {cout}")
    moment, count = torch.zeros(dim, dim, dtype=torch.float64), 0
    for i in range(0, len(images), chunk):
        patches = F.unfold(images[i : i + chunk].float().cpu(), (kh, kw)).transpose(1, 2).reshape(-1, dim).double()
        moment += patches.T @ patches
        count += len(patches)
    values, vectors = torch.linalg.eigh(moment / count)  # ascending
    values, vectors = values.flip(0)[: -(-cout // 2)], vectors.flip(1)[:, : -(-cout // 2)]
    bank = (vectors / torch.sqrt(values + eps)).T.reshape(-1, cin, kh, kw)
    conv.weight.copy_(torch.cat([bank, -bank])[:cout].to(conv.weight))
    return values


def model_summary(cfg) -> str:
    """torchinfo table of the network a ``Config`` describes on a (1, 3, 32, 32) input, layers named as in the spec."""
    import torchinfo

    s = torchinfo.summary(Net.from_config(cfg), input_size=(1, 3, 32, 32), col_names=("output_size", "kernel_size", "num_params"),
                          row_settings=("var_names",), depth=2, verbose=0, device="cpu")
    return str(s).replace("(Units.MEGABYTES)", "(M)")  # torchinfo 1.8 prints the enum's repr on Python >= 3.11


_GEOMETRY = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def _one(v: Any) -> int:
    return int(v[0] if isinstance(v, tuple) else v)


def receptive_field(model: nn.Module, input_size: int = 32) -> list[dict[str, Any]]:
    """Per layer: kernel, stride, padding, jump and receptive field (in input pixels), output size.

    Walks ``LAYER_ORDER`` on a normlab Net, else the children of ``model`` in order (an
    nn.Sequential of Conv2d / MaxPool2d). j_out = j_in * s; r_out = r_in + (k - 1) * j_in, with the
    dilated kernel for k. Skip additions do not widen the field (the longer branch sets it), so the
    main path gives it. A global pool ends the count: from there on every output sees the whole input.
    """
    names = LAYER_ORDER if all(hasattr(model, n) for n in LAYER_ORDER) else [n for n, _ in model.named_children()]
    rows: list[dict[str, Any]] = []
    rf, jump, size, whole = 1, 1, input_size, False
    for name in names:
        m = next((m for m in getattr(model, name).modules() if isinstance(m, _GEOMETRY)), None)
        if m is None:
            continue
        if isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
            if _one(m.output_size) != 1:
                raise ValueError(f"{name}: only global adaptive pooling (output 1x1) is supported")
            k, s, p, d = size, size, 0, 1
            whole = True
        else:
            k, d = _one(m.kernel_size), _one(getattr(m, "dilation", 1))
            s = _one(m.stride) if m.stride is not None else k
            p = m.padding if not isinstance(m.padding, str) else (d * (k - 1) // 2 if m.padding == "same" else 0)
            p = _one(p)
        k_eff = d * (k - 1) + 1
        out_size = (size + 2 * p - k_eff) // s + 1
        new_rf = None if whole else rf + (k_eff - 1) * jump
        rows.append({"layer": name, "type": type(m).__name__, "kernel": k, "stride": s, "padding": p, "jump_in": jump,
                     "jump": jump * s, "rf_in": rf, "rf": new_rf, "size_in": size, "size": out_size, "global": whole})
        rf, jump, size = (new_rf if new_rf is not None else rf), jump * s, out_size
    return rows
