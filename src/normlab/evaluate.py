"""Test accuracy of a saved ``model.pt`` on any CIFAR-10 folder in the official layout."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from normlab import data as D
from normlab.config import Config
from normlab.models import Net, count_params
from normlab.train import TrainingError, autocast, device_name, evaluate, pick_device, place, use_bf16, use_channels_last


def load_model(path: Path) -> tuple[Net, Config]:
    """The network and config stored in a ``model.pt`` (or a per-epoch ``checkpoint.pt``)."""
    if not path.is_file():
        raise TrainingError(f"no checkpoint at {path}; pass the model.pt of a run folder")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)  # plain tensors and dicts: no code runs
    except Exception as e:
        raise TrainingError(f"{path} is not a PyTorch checkpoint ({type(e).__name__}); pass the model.pt that normlab train wrote") from None
    if not isinstance(ck, dict) or "config" not in ck or "model" not in ck:
        raise TrainingError(f"{path} is not a normlab checkpoint (no config and weights); pass the model.pt that normlab train wrote")
    try:
        cfg = Config.from_dict(ck["config"])
        model = Net.from_config(cfg)
        model.load_state_dict(ck["model"])
    except (TypeError, ValueError, RuntimeError, KeyError) as e:
        first = str(e).strip().splitlines()[0]
        raise TrainingError(f"{path} holds weights of another network, not normlab's ({first[:160]}); pass the model.pt that normlab train wrote") from None
    return model, cfg


def evaluate_checkpoint(path: Path, data_dir: str | os.PathLike | None, device: str = "auto") -> dict[str, Any]:
    model, cfg = load_model(path)
    dev = pick_device(device)
    bf16, cl = use_bf16(dev), use_channels_last(cfg.norm, dev)
    model = place(model, dev, cl)
    images, labels = D.load_split(D.resolve_data_dir(data_dir), train=False)
    images, labels = images.to(dev), labels.to(dev)
    amp = autocast(dev, bf16)
    acc, loss = evaluate(model, images, labels, amp, cl)
    tta, _ = evaluate(model, images, labels, amp, cl, flip=True)
    return {"checkpoint": str(path), "norm": cfg.norm, "params": count_params(model), "data_dir": str(D.resolve_data_dir(data_dir)),
            "images": len(labels), "test_acc": acc, "test_loss": loss, "test_acc_flip_tta": tta, "device": device_name(dev)}
