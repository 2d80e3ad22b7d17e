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

from normlab.data import CROP_FILLS
from normlab.errors import ConfigError

MAX_EPOCHS = 20  # the assignment's limit; more is allowed for experiments but flagged
WHITEN = ("off", "frozen", "train")  # --whiten: C1 from the patch covariance, then frozen or trained

__all__ = ["Config", "ConfigError", "MAX_EPOCHS", "setting_fields", "parse_widths"]


def _s(default: Any, label: str, help: str, flag: str | None = None) -> Any:
    """A setting: its default, the label the report shows, the CLI help; ``flag`` where it is not --name."""
    return field(default=default, metadata={"label": label, "help": help, "flag": flag})


@dataclass(frozen=True)
class Config:
    norm: str = _s("bn", "norm", "normalization layer (see normlab.norms.NORMS)")
    widths: tuple[int, int, int] = _s((16, 32, 24), "widths (C1–C2, c3–C5, c6–C9)",
                                      "channels of C1-C2, C3-C5, C7-C9 (16,32,24 beat 16,24,32 on validation)")
    groups: int = _s(8, "groups (group norm)", "group count of group norm (8 beat 4 on validation)")
    norm_batch: int = _s(0, "images per batch-norm statistics (ghost batches; 0 = the whole batch)",
                         "batch norm and batch renorm only: compute their training statistics over groups of this many images of each batch "
                         "(ghost batch norm; the last group may be smaller); 0, or a number no smaller than --batch-size, = "
                         "the whole batch; 32 gained on three validation seeds but not on five, and lost on the test set "
                         "(docs/experiments.md §25-27)")
    bn_momentum: float = _s(0.1, "batch norm's running-statistics momentum",
                            "batch norm and batch renorm only: weight of each batch in the running statistics (PyTorch's convention; "
                            "airbench's 0.6 is 0.4 here); 0.4 with Lookahead lost on validation (docs/experiments.md §16)")
    precise_bn: int = _s(10000, "images re-estimating batch norm's statistics after the last epoch (0 = off)",
                         "batch norm only: after the last epoch, re-estimate its running statistics at the final weights "
                         "from this many training images (all if fewer), drawn at random and augmented as in training, in "
                         "full batches of --batch-size, each batch weighted alike (precise BN, Wu and Johnson, 2021); 0 = keep "
                         "the running averages of the training steps; +0.10 on five paired validation seeds, nothing on the test set "
                         "(docs/experiments.md §29)")
    weight_std: bool = _s(True, "weight-standardized convs", "plain convs instead of weight-standardized ones", "--no-weight-std")
    act: str = _s("gelu", "activation", "activation after every norm: relu | gelu (gelu won on validation); frn brings its own (TLU)")
    pool_first: bool = _s(True, "c3, c6: max-pool before norm and activation",
                          "c3 and c6 as conv -> norm -> activation -> pool (default: conv -> pool -> norm -> activation)", "--no-pool-first")
    skips: str = _s("pairs", "skip additions",
                    "pairs: C1->C2, C3->C5, C7->C9 (each pair of 3x3 convs after a stage's first adds its input) | every: "
                    "each 3x3 conv after C1 adds its input to its output (P1->C3, C3->C4, ..., C8->C9)")
    zero_init_res: bool = _s(False, "residual branches start at zero",
                             "start the last norm of each residual branch (C2, C5, C9; with --skips every, each of C2-C5, C7-C9) with scale 0, "
                             "so each branch starts as the identity; lost on validation under Muon (docs/experiments.md §35)")
    norm_scale: bool = _s(True, "norms' scales trained",
                          "keep every norm's scale (its per-channel weight) at 1, untrained, as airbench's batch norm does; "
                          "the norms' biases still train (not with --zero-init-res, whose scales start at 0)", "--no-norm-scale")
    whiten: str = _s("off", "C1 starts as a patch-whitening filter bank",
                     "off | frozen | train: start C1 (a plain conv then) from the eigenvectors of the training images' 3x3 "
                     "patch covariance, +/- pairs scaled by 1/sqrt(eigenvalue), as airbench does; frozen or trained on; "
                     "both lost on validation, under SGD and again under Muon with Lookahead (docs/experiments.md §16, §35)")
    identity_init: bool = _s(False, "3x3 convs start as the identity",
                             "start each 3x3 conv's first min(in, out) filters as the identity (Dirac), as airbench does; "
                             "with Muon it lost on validation (docs/experiments.md §16, §18)")
    epochs: int = _s(20, "epochs", f"passes over the training images; more than {MAX_EPOCHS} is flagged as outside the assignment")
    batch_size: int = _s(128, "batch size", "images per optimizer step")
    lr: float = _s(0.2, "peak learning rate (one-cycle)", "peak learning rate of the one-cycle schedule, for what SGD trains (with "
                   "Muon, the default: the norms, the biases and C10; the conv filters follow --muon-lr); no normalization "
                   "(--norm none) trains at 0.1 when this is left at 0.2")
    warmup: float = _s(0.2, "warm-up fraction", "fraction of all steps spent rising to the peak learning rate")
    hold: float = _s(0.0, "fraction held at the peak learning rate",
                     "fraction of all steps spent at the peak learning rate after the warm-up, before the linear decay to 0 "
                     "(0 = the plain one-cycle: decay starts at the peak)")
    momentum: float = _s(0.9, "momentum (Nesterov)", "SGD's Nesterov momentum (Muon's: --muon-momentum)")
    muon_lr: float = _s(0.02, "Muon's peak learning rate for the conv filters (0 = SGD)",
                        "train the conv filters (C1-C9, c3, c6; not C10) with Muon at this peak learning rate, on the same "
                        "one-cycle shape (momentum --muon-momentum, Nesterov, no decay); 0 = SGD for all (the default before the eleventh "
                        "session); with the filters renormalized (the default) 0.02 beat 0.04 and tied 0.01 on validation, "
                        "docs/experiments.md §22-23; without it 0.05 (the default of the eleventh to fourteenth sessions), §17-19")
    muon_norm: bool = _s(True, "Muon's filters renormalized before each step",
                         "do not scale each filter bank to norm sqrt(out channels) before each Muon step (airbench94_muon "
                         "does; the default since the fifteenth session): a norm after every conv (and weight "
                         "standardization) makes the network blind to the filters' scale, so renormalizing changes only the "
                         "step's size relative to the filters, which without it shrinks as the filters grow (about 20-fold "
                         "over a run); without it retune --muon-lr (0.05 then); ignored with --muon-lr 0",
                         "--no-muon-norm")
    muon_momentum: float = _s(0.95, "Muon's momentum (Nesterov)",
                              "Muon's Nesterov momentum for the conv filters (torch.optim.Muon's default 0.95; airbench94_muon "
                              "uses 0.6); ignored with --muon-lr 0")
    norm_bias_lr: float = _s(1.0, "learning-rate factor of the norms' biases",
                             "the norms' biases train at this multiple of the learning rate (airbench: 64); "
                             "64 lost on validation, 16 within noise (docs/experiments.md §16)")
    weight_decay: float = _s(5e-4, "weight decay (conv weights SGD trains)", "L2 on the conv weights SGD trains (all of them with "
                             "--muon-lr 0; with Muon, C10's alone), never on norms or biases")
    lookahead: float = _s(0.95, "Lookahead (final decay; 0 = off)",
                          "every 5 steps a slow copy of the weights moves towards the network and the network jumps back to "
                          "it, by a decay rising as (step/total)^3 to this^5; the network ends as the slow copy (airbench: 0.95); "
                          "0 = off (the default before the twenty-third session); under SGD 0.95 lost on validation "
                          "(docs/experiments.md §16); under the renormalized Muon it gained batch norm 0.37 points on five "
                          "paired validation seeds, and is shared by all norms (group norm -0.27 on five, layer norm +0.28 "
                          "on four, neither beyond its spread; §33-34); 0.9 and 0.98 did not beat it for batch norm (§35)")
    ema: float = _s(0.0, "moving average of the weights (decay; 0 = off)",
                    "per-step decay of an exponential moving average of the weights, used as the final model; 0 = off; "
                    "0.998 +0.12 on five validation seeds without Lookahead, 0.999 -0.12 on two with it (docs/experiments.md §31, §35)")
    label_smoothing: float = _s(0.1, "label smoothing", "cross-entropy target smoothing")
    logit_scale: float = _s(1.0, "logit scale (C10's output times this)",
                            "multiply the network's output (C10's logits) by this, in training and at evaluation (the "
                            "predictions do not change, the loss does): as SGD trains C10, its initial logits scale by this "
                            "and its effective learning rate by the square (airbench's head: 1/9); 0.5, 2 and 4 lost on validation "
                            "(docs/experiments.md §35)")
    crop_pad: int = _s(2, "random-crop padding (px)", "random-crop padding in pixels, 0 = off (2 beat 4 and 1 on validation)")
    crop_fill: str = _s("reflect", "random crops beyond the edge",
                        "zero | reflect: what a random crop shows beyond the image's edge, black pixels (zero, the default "
                        "before the twenty-sixth session) or the image mirrored at its edge (reflect, airbench's crops); "
                        "with --clean-epochs 2 it gained +1.32 points (spread 0.45) for group norm on five paired validation "
                        "seeds, +0.42 (spread 0.19) for layer norm on four, +0.19 (spread 0.51) for batch norm on five "
                        "(docs/experiments.md §36)")
    cutout: int = _s(0, "cutout square (px; 0 = off)",
                     "set a square of this side (pixels, wholly inside the image) of each training image to the mean after "
                     "normalizing, at a random place each step (cutout, DeVries and Taylor 2017; airbench96 uses 12); 0 = off")
    clean_epochs: int = _s(2, "last epochs on uncropped images",
                           "train the last N epochs (all of them if there are no more) on whole images: no random crop and "
                           "no cutout (flips as before), so that the model ends fitting the images it is tested on; precise "
                           "BN then averages uncropped batches too; 0 = off (the default before the twenty-sixth session); "
                           "with --crop-fill reflect it gained +1.32 points for group norm, +0.42 for layer norm, +0.19 for "
                           "batch norm on paired validation seeds (docs/experiments.md §36)")
    flip: bool = _s(True, "random flips", "turn off random horizontal flips", "--no-flip")
    alt_flip: bool = _s(True, "alternating flips", "flip each image at random in every epoch "
                        "(default: alternating flips, each image flipped in every other epoch; beat random flips on validation)", "--no-alt-flip")
    val_size: int = _s(0, "validation images held out", "training images held out (stratified) for validation; use 5000 to tune")
    seed: int = _s(0, "seed", "seeds the weights, the shuffling and the augmentation")
    eval_test: bool = _s(True, "test set read at the end", "do not read the test set (tuning runs)", "--no-test")

    def __post_init__(self) -> None:
        # A norm's own defaults (NORMS[norm].defaults, e.g. none: lr 0.1) replace the settings left at Config's default,
        # so that Config(norm="none"), dataclasses.replace(cfg, norm="none") and --norm none all train at that lr.
        from normlab.norms import NORMS

        fields = type(self).__dataclass_fields__
        for name, value in (NORMS[self.norm].defaults.items() if self.norm in NORMS else ()):
            if getattr(self, name) == fields[name].default:
                object.__setattr__(self, name, value)

    def validate(self) -> "Config":
        import torch

        from normlab.models import ACTS, SKIPS, Net
        from normlab.norms import NORMS

        if self.norm not in NORMS:
            raise ConfigError(f"unknown norm {self.norm!r}; choose one of: {', '.join(NORMS)}")
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
        try:  # the network checks its parameter budget; on the meta device huge widths allocate nothing
            with torch.device("meta"):
                Net.from_config(self)
        except ValueError as e:
            raise ConfigError(f"--widths {','.join(map(str, self.widths))}: {e}") from None
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
        kwargs.setdefault("muon_norm", False)  # those of the eleventh to fourteenth sessions used Muon unrenormalized
        kwargs.setdefault("norm_batch", 0)  # and batch norm's statistics came from the whole batch
        kwargs.setdefault("precise_bn", 0)  # and kept the running averages of the training steps
        kwargs.setdefault("lookahead", 0.0)  # and trained without Lookahead
        kwargs.setdefault("crop_fill", "zero")  # and cropped from zero-padded images,
        kwargs.setdefault("clean_epochs", 0)  # every epoch of them
        if "widths" in kwargs:
            kwargs["widths"] = tuple(kwargs["widths"])
        cfg = cls(**kwargs)
        for name, value in kwargs.items():  # a saved value is what the run trained with, even where a norm's own
            object.__setattr__(cfg, name, value)  # default would replace it in a new Config (none's lr 0.1 since section 14)
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
