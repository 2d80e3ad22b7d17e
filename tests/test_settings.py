"""Every Config setting round-trips: flag -> config -> config.json -> the report's settings table and the command
that trains it again -> the same config. A setting that the CLI or the report forgets fails here."""
from __future__ import annotations

import dataclasses
import json
import re
import shlex
from pathlib import Path

import pytest

from normlab.cli import build_parser, config_from
from normlab.config import Config, setting_fields
from normlab.report import _header, _settings_section
from normlab.rundir import Results, Run

# A value other than the default for every setting (all valid together but norm_scale, which cannot go with zero_init_res).
OTHER = {
    "norm": "gn", "widths": (16, 24, 32), "groups": 4, "norm_batch": 16, "weight_std": False, "act": "relu", "pool_first": False,
    "skips": "every", "zero_init_res": True, "norm_scale": False, "identity_init": True, "whiten": "frozen", "epochs": 3, "batch_size": 64, "lr": 0.15, "warmup": 0.3, "hold": 0.1, "momentum": 0.85, "norm_bias_lr": 64.0, "lookahead": 0.9, "bn_momentum": 0.4, "precise_bn": 0, "muon_lr": 0.1, "muon_norm": False, "muon_momentum": 0.6,
    "weight_decay": 1e-4, "ema": 0.99, "label_smoothing": 0.2, "logit_scale": 0.5, "crop_pad": 4, "crop_fill": "zero", "cutout": 8, "clean_epochs": 1, "flip": False, "alt_flip": False,
    "val_size": 100, "seed": 3, "eval_test": False,
}


def test_every_setting_has_a_value_here():
    assert set(OTHER) == {f.name for f in setting_fields()}, "a new Config field: give it a non-default value in OTHER"
    assert all(OTHER[f.name] != f.default for f in setting_fields())


def _parse(argv: list[str]) -> Config:
    return config_from(build_parser().parse_args(argv))


def _train_argv(cfg: Config) -> list[str]:
    return ["train", "--norm", cfg.norm, "--seed", str(cfg.seed), *cfg.to_flags(skip=("norm", "seed"))]


def _configs() -> list[Config]:
    """All settings changed at once, and each one alone (groups with group norm; norm_batch with the default, batch norm)."""
    one_each = [Config(**{name: value, **({"norm": "gn"} if name == "groups" else {})}) for name, value in OTHER.items()]
    return [Config(**{**OTHER, "norm_scale": True}), *one_each]


@pytest.mark.parametrize("cfg", _configs(), ids=["all", *OTHER])
def test_flags_and_config_json_round_trip(cfg):
    assert _parse(_train_argv(cfg)) == cfg
    assert Config.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def _run(cfg: Config, folder: Path) -> Run:
    results = Results(norm=cfg.norm, device="cpu", precision="fp32", threads=1, torch="x", params=1, epochs=cfg.epochs)
    return Run(folder, cfg, results, [], None, None, None)


@pytest.mark.parametrize("cfg", _configs(), ids=["all", *OTHER])
@pytest.mark.parametrize("seeds", [1, 2])
def test_report_shows_every_setting_and_the_command_that_trains_it_again(cfg, seeds, tmp_path):
    is_parent = seeds > 1
    runs = [_run(dataclasses.replace(cfg, seed=cfg.seed + s), tmp_path / f"seed{s}") for s in range(seeds)]
    header = _header({cfg.norm: runs}, tmp_path, is_parent, tmp_path)
    settings = _settings_section({cfg.norm: runs})
    for f in setting_fields():
        if f.name not in ("norm", "seed"):
            assert f"| {f.metadata['label']} |" in settings, f.name
    command = re.search(r"```sh\n(.*)\n```", header).group(1)
    argv = shlex.split(command)
    assert argv[0] == "normlab" and argv[1] == ("run" if is_parent else "train")
    args = build_parser().parse_args(argv[1:])
    if is_parent:
        assert args.norms == cfg.norm and args.seeds == seeds and args.seed == cfg.seed
        assert config_from(args, norm=cfg.norm, seed=cfg.seed) == cfg
    else:
        assert config_from(args) == cfg
