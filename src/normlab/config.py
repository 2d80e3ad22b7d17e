"""What a model learns: one frozen dataclass, each setting with its flag, label and help beside it.

The command line is built from these fields and the report reads their labels and flags, so the
two cannot drift; each run folder gets ``config.json``, so every figure can be traced back to the
settings that made it. How a run *executes* (device, threads, precision, progress) is not here:
it lives in ``device.Runtime`` and never changes what is learned.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from normlab.data import CROP_FILLS
from normlab.errors import ConfigError
from normlab.models import ACTS, PARAM_BUDGET, SKIPS, Net, count_params
from normlab.norms import NORMS, get_norm

MAX_EPOCHS = 20  # the prescribed limit (<= 20 epochs); more is allowed for experiments but flagged
WHITEN = ("off", "frozen", "train")  # --whiten: C1 from the patch covariance, then frozen or trained

__all__ = ["Config", "ConfigError", "MAX_EPOCHS", "setting_fields", "parse_widths"]


def _s(default: Any, label: str, help: str, flag: str | None = None) -> Any:
    """A setting: its default, the label the report shows, the CLI help; ``flag`` where it is not --name."""
    return field(default=default, metadata={"label": label, "help": help, "flag": flag})


@dataclass(frozen=True)
class Config:
    norm: str = _s("bn", "norm", "normalization layer: bn | gn | ln | in | none | brn | frn")
    widths: tuple[int, int, int] = _s((16, 32, 24), "widths (C1–C2, c3–C5, c6–C9)",
                                      "channels of C1-C2, c3-C5, c6-C9; under 50,000 parameters in all")
    groups: int = _s(8, "groups (group norm)", "group norm's group count; must divide every width")
    norm_batch: int = _s(0, "images per batch-norm statistics (ghost batches; 0 = the whole batch)",
                         "batch norm and renorm: images per statistics group (ghost batches); 0 = the whole batch")
    bn_momentum: float = _s(0.1, "batch norm's running-statistics momentum",
                            "batch norm and renorm: weight of each batch in the running statistics, in (0, 1]")
    precise_bn: int = _s(10000, "images re-estimating batch norm's statistics after the last epoch (0 = off)",
                         "batch norm: re-estimate its statistics on N training images after training; 0 = off")
    weight_std: bool = _s(True, "weight-standardized convs", "plain convs instead of weight-standardized ones", "--no-weight-std")
    act: str = _s("gelu", "activation", "activation after every norm: relu | gelu (frn brings its own TLU)")
    pool_first: bool = _s(True, "c3, c6: max-pool before norm and activation",
                          "pool c3 and c6 after their norm and activation instead of before", "--no-pool-first")
    skips: str = _s("pairs", "skip additions",
                    "skip additions: pairs (C1->C2, C3->C5, C7->C9) | every (over each 3x3 conv after C1)")
    zero_init_res: bool = _s(False, "residual branches start at zero",
                             "start the last norm of each residual branch at scale 0")
    norm_scale: bool = _s(True, "norms' scales trained",
                          "keep every norm's scale at 1, untrained (its bias still trains)", "--no-norm-scale")
    whiten: str = _s("off", "C1 starts as a patch-whitening filter bank",
                     "start C1 as a whitening of 3x3 image patches: off | frozen | train")
    identity_init: bool = _s(False, "3x3 convs start as the identity",
                             "start each 3x3 conv as the identity (Dirac)")
    epochs: int = _s(20, "epochs", f"passes over the training images; over {MAX_EPOCHS} is outside the prescribed limits")
    batch_size: int = _s(128, "batch size", "images per optimizer step")
    lr: float = _s(0.2, "peak learning rate (one-cycle)",
                   "peak one-cycle learning rate of SGD's part (with Muon: norms, biases, C10); none: 0.1")
    warmup: float = _s(0.2, "warm-up fraction", "fraction of all steps spent rising to the peak learning rate")
    hold: float = _s(0.0, "fraction held at the peak learning rate",
                     "fraction of all steps held at the peak learning rate after the warm-up")
    momentum: float = _s(0.9, "momentum (Nesterov)", "SGD's Nesterov momentum")
    muon_lr: float = _s(0.02, "Muon's peak learning rate for the conv filters (0 = SGD)",
                        "peak learning rate of Muon for the conv filters but C10; 0 = SGD for all")
    muon_norm: bool = _s(True, "Muon's filters renormalized before each step",
                         "do not rescale each filter bank to norm sqrt(out channels) before each Muon step",
                         "--no-muon-norm")
    muon_momentum: float = _s(0.95, "Muon's momentum (Nesterov)", "Muon's Nesterov momentum")
    norm_bias_lr: float = _s(1.0, "learning-rate factor of the norms' biases",
                             "the norms' biases train at this multiple of the learning rate")
    weight_decay: float = _s(5e-4, "weight decay (conv weights SGD trains)",
                             "L2 weight decay on the conv weights SGD trains (with Muon: C10's)")
    lookahead: float = _s(0.95, "Lookahead (final decay; 0 = off)",
                          "Lookahead's final decay (a slow copy of the weights, pulled every 5 steps); 0 = off")
    ema: float = _s(0.0, "moving average of the weights (decay; 0 = off)",
                    "per-step decay of a moving average of the weights, the final model; 0 = off")
    label_smoothing: float = _s(0.1, "label smoothing", "label smoothing of the cross-entropy, in [0, 1)")
    logit_scale: float = _s(1.0, "logit scale (C10's output times this)",
                            "multiply C10's logits by this, in training and evaluation")
    crop_pad: int = _s(2, "random-crop padding (px)", "random-crop shift in pixels; 0 = no crop")
    crop_fill: str = _s("reflect", "random crops beyond the edge",
                        "beyond the image's edge a crop shows: zero (black) | reflect (the image mirrored)")
    cutout: int = _s(0, "cutout square (px; 0 = off)",
                     "side in pixels of a square set to the mean at a random place each step; 0 = off")
    clean_epochs: int = _s(2, "last epochs on uncropped images",
                           "the last N epochs train on whole images (no crop, no cutout); 0 = off")
    flip: bool = _s(True, "random flips", "no random horizontal flips", "--no-flip")
    alt_flip: bool = _s(True, "alternating flips",
                        "flip each image at random every epoch, not in alternate epochs", "--no-alt-flip")
    val_size: int = _s(0, "validation images held out", "training images held out for validation; 5000 to tune")
    seed: int = _s(0, "seed", "seed of the weights, the shuffling and the augmentation")
    eval_test: bool = _s(True, "test set read at the end", "do not read the test set (tuning runs)", "--no-test")

    def __post_init__(self) -> None:
        # A norm's own defaults (NORMS[norm].defaults, e.g. none: lr 0.1) replace the settings left at Config's default,
        # so that Config(norm="none"), dataclasses.replace(cfg, norm="none") and --norm none all train at that lr.
        fields = type(self).__dataclass_fields__
        for name, value in (NORMS[self.norm].defaults.items() if self.norm in NORMS else ()):
            if getattr(self, name) == fields[name].default:
                object.__setattr__(self, name, value)

    def validate(self) -> "Config":
        """This config, if every setting is in range and the network it describes within the parameter budget; else
        ``ConfigError`` naming the first setting that is not. The only check of the settings: the network trusts it."""
        get_norm(self.norm)  # an unknown norm: the registry's error, which lists the valid ones
        checks = [
            (self.act in ACTS, f"--act must be one of: {', '.join(ACTS)} (got {self.act!r})"),
            (self.skips in SKIPS, f"--skips must be one of: {', '.join(SKIPS)} (got {self.skips!r})"),
            (self.epochs >= 1, f"--epochs must be at least 1 (got {self.epochs})"),
            (1 <= self.batch_size <= 8192, f"--batch-size must be between 1 and 8192 (got {self.batch_size})"),
            (0 < self.lr <= 10, f"--lr must be above 0 and at most 10 (got {self.lr})"),
            (0 <= self.warmup < 1, f"--warmup must be in [0, 1) (got {self.warmup})"),
            (0 <= self.hold and self.warmup + self.hold < 1,
             f"--hold must be 0 or more, and --warmup + --hold below 1 (got {self.warmup} + {self.hold})"),
            (0 <= self.momentum < 1, f"--momentum must be in [0, 1) (got {self.momentum})"),
            (self.weight_decay >= 0, f"--weight-decay must be 0 or more (got {self.weight_decay})"),
            (0 <= self.ema < 1, f"--ema must be in [0, 1), 0 = off (got {self.ema})"),
            (self.whiten in WHITEN, f"--whiten must be one of: {', '.join(WHITEN)} (got {self.whiten!r})"),
            (0 < self.bn_momentum <= 1, f"--bn-momentum must be in (0, 1] (got {self.bn_momentum})"),
            (self.precise_bn >= 0, f"--precise-bn must be 0 (off) or a number of images (got {self.precise_bn})"),
            (0 <= self.lookahead < 1, f"--lookahead must be in [0, 1), 0 = off (got {self.lookahead})"),
            (0 <= self.muon_lr <= 10, f"--muon-lr must be in [0, 10], 0 = off (got {self.muon_lr})"),
            (0 <= self.muon_momentum < 1, f"--muon-momentum must be in [0, 1) (got {self.muon_momentum})"),
            (0 < self.norm_bias_lr <= 1000, f"--norm-bias-lr must be in (0, 1000] (got {self.norm_bias_lr})"),
            (0 < self.logit_scale <= 100, f"--logit-scale must be above 0 and at most 100 (got {self.logit_scale})"),
            (0 <= self.label_smoothing < 1, f"--label-smoothing must be in [0, 1) (got {self.label_smoothing})"),
            (0 <= self.crop_pad <= 16, f"--crop-pad must be between 0 and 16 (got {self.crop_pad})"),
            (self.crop_fill in CROP_FILLS, f"--crop-fill must be one of: {', '.join(CROP_FILLS)} (got {self.crop_fill!r})"),
            (0 <= self.cutout <= 32, f"--cutout must be between 0 (off) and 32 pixels (got {self.cutout})"),
            (self.clean_epochs >= 0, f"--clean-epochs must be 0 (off) or more (got {self.clean_epochs})"),
            (self.val_size >= 0, f"--val-size must be 0 or more (got {self.val_size})"),
            (self.norm_scale or not self.zero_init_res,
             "--no-norm-scale and --zero-init-res cannot go together: the residual branches' scales would stay 0"),
            (self.groups >= 1, f"--groups must be at least 1 (got {self.groups})"),
            (self.norm_batch >= 0, f"--norm-batch must be 0 (the whole batch) or more (got {self.norm_batch})"),
            (len(self.widths) == 3 and all(w >= 1 for w in self.widths),
             f"--widths must be three positive channel counts (got {self.widths})"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        if "groups" in NORMS[self.norm].options and any(w % self.groups for w in self.widths):
            raise ConfigError(f"--groups {self.groups} must divide every width of --widths {','.join(map(str, self.widths))} "
                              f"for {NORMS[self.norm].label.lower()}; choose another group count or other widths")
        with torch.device("meta"):  # the parameter budget; on the meta device huge widths allocate nothing
            n = count_params(Net.from_config(self))
        if n >= PARAM_BUDGET:
            raise ConfigError(f"--widths {','.join(map(str, self.widths))}: widths {tuple(self.widths)} give {n:,} parameters; "
                              f"the budget is fewer than {PARAM_BUDGET:,}. Choose smaller widths.")
        return self

    @property
    def over_epoch_limit(self) -> bool:
        return self.epochs > MAX_EPOCHS

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def differences(self, other: "Config") -> list[tuple[str, Any, Any]]:
        """(setting, this config's value, ``other``'s) for each setting where the two differ, in field order."""
        return [(f.name, getattr(self, f.name), getattr(other, f.name)) for f in dataclasses.fields(self)
                if getattr(self, f.name) != getattr(other, f.name)]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Config":
        """The config a ``config.json`` describes; keys of other versions (device, threads) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        # Runs written before these options existed pooled after the norm, used ReLU and random flips,
        kwargs.setdefault("pool_first", False)
        kwargs.setdefault("act", "relu")
        kwargs.setdefault("alt_flip", False)
        kwargs.setdefault("muon_lr", 0.0)  # and trained every filter with SGD;
        kwargs.setdefault("muon_norm", False)  # those of 0.5.0 used Muon without renormalizing the filters
        kwargs.setdefault("norm_batch", 0)  # and batch norm's statistics came from the whole batch
        kwargs.setdefault("precise_bn", 0)  # and kept the running averages of the training steps
        kwargs.setdefault("lookahead", 0.0)  # and trained without Lookahead
        kwargs.setdefault("crop_fill", "zero")  # and cropped from zero-padded images,
        kwargs.setdefault("clean_epochs", 0)  # every epoch of them
        if "widths" in kwargs:
            kwargs["widths"] = tuple(kwargs["widths"])
        cfg = cls(**kwargs)
        for name, value in kwargs.items():  # a saved value is what the run trained with, even where a norm's own
            object.__setattr__(cfg, name, value)  # default would replace it in a new Config (none's lr 0.1, since 0.5.0)
        return cfg

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> "Config":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_flags(self, skip: tuple[str, ...] = ()) -> list[str]:
        """The command-line flags that give this config from the defaults (settings in ``skip`` left out)."""
        base, out = Config(), []
        for f in setting_fields():
            v = getattr(self, f.name)
            if f.name in skip or v == getattr(base, f.name):
                continue
            out += [flag_of(f)] if isinstance(v, bool) else [flag_of(f), format_value(v)]
        return out


def setting_fields() -> tuple[dataclasses.Field, ...]:
    return dataclasses.fields(Config)


def flag_of(f: dataclasses.Field) -> str:
    """The flag of a setting: its own (``--no-flip``), else ``--name-with-dashes``."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def format_value(v: Any) -> str:
    """A setting's value as it is typed on the command line (widths as 16,32,24)."""
    return ",".join(map(str, v)) if isinstance(v, tuple) else str(v)


def parse_widths(text: str) -> tuple[int, int, int]:
    """'16,32,24' (or 16x32x24) -> (16, 32, 24)."""
    try:
        parts = tuple(int(p) for p in text.replace("x", ",").split(","))
    except ValueError:
        raise ValueError(f"widths must look like 16,24,32 (got {text!r})") from None
    if len(parts) != 3:
        raise ValueError(f"widths must be three numbers like 16,24,32 (got {text!r})")
    return parts  # type: ignore[return-value]
