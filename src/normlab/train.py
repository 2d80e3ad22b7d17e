"""The trainer: train_epoch(), infer(), evaluate() and fit(), one for all three norms.

SGD with Nesterov momentum, a one-cycle learning rate (a plain function of the step), label
smoothing, weight decay on conv weights only. bf16 autocast on CUDA and on CPUs with AVX512-BF16
or AMX. A checkpoint is written atomically after every epoch so that a run can be resumed.
"""
from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from normlab import data as D
from normlab.config import MAX_EPOCHS, Config
from normlab.models import NORM_NAMES, PARAM_BUDGET, Net, count_params

CHECKPOINT = "checkpoint.pt"  # written after every epoch: everything needed to resume
MODEL = "model.pt"            # written at the end: weights + config
METRICS_FIELDS = ["epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "seconds"]
# Measured on a 2-core AVX512-BF16 CPU (benchmarks/speed.py): PyTorch's group norm with several
# groups is faster on NCHW maps there, batch norm and one-group (layer) norm on channels_last.
CPU_CHANNELS_LAST = {"bn": True, "gn": False, "ln": True}
PROGRESS = True  # a progress bar per epoch on a terminal; parallel runs turn it off


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, an unusable run folder); the message says why."""


# ---------------------------------------------------------------- device and precision
def cpu_has_bf16() -> bool:
    """True on CPUs with native bf16 matrix units (AVX512-BF16 or AMX), where autocast pays."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def use_bf16(device: torch.device) -> bool:
    return torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_bf16()


def use_channels_last(norm: str, device: torch.device) -> bool:
    return True if device.type == "cuda" else CPU_CHANNELS_LAST[norm]


def place(model: torch.nn.Module, device: torch.device, channels_last: bool) -> torch.nn.Module:
    """The model on ``device``, its weights in the memory layout that the inputs will have."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


# ---------------------------------------------------------------- optimization
def lr_at(step: int, total: int, peak: float, warmup: float) -> float:
    """One-cycle: linear from peak/10 up to ``peak`` over the warm-up, then linear down to 0."""
    rise = max(1, round(warmup * total))
    if step < rise:
        return peak * (0.1 + 0.9 * step / rise)
    return peak * max(0.0, (total - step) / max(1, total - rise))


def make_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.ndim >= 2]    # conv weights
    no_decay = [p for p in model.parameters() if p.ndim < 2]  # norm scales/shifts and biases
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)


def make_ema(model: torch.nn.Module, decay: float):
    """An exponential moving average of the weights and the norms' running statistics (None if ``decay`` is 0)."""
    if not decay:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def train_epoch(model, opt, batches, cfg: Config, step: int, total: int, amp, desc: str = "", ema=None) -> dict[str, Any]:
    """One pass over ``batches`` (updating ``ema`` after each step, if given); returns loss/accuracy
    sums and the first non-finite batch (or -1)."""
    model.train()
    dev = batches.labels.device
    loss_sum, correct, bad = torch.zeros((), device=dev), torch.zeros((), device=dev, dtype=torch.long), torch.tensor(-1, device=dev)
    for i, (x, y) in enumerate(tqdm(batches, desc=desc, leave=False, disable=None if PROGRESS else True, unit="batch")):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, cfg.lr, cfg.warmup)
        with amp:
            logits = model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if ema is not None:
            ema.update_parameters(model)
        step += 1
        # Accumulate on the device: .item() per step would be a sync point on a GPU.
        loss_sum += loss.detach() * len(y)
        correct += (logits.argmax(1) == y).sum()
        bad = torch.where((bad < 0) & ~torch.isfinite(loss.detach()), i, bad)
    n = len(batches.labels)
    return {"loss": loss_sum.item() / n, "acc": correct.item() / n, "bad_batch": int(bad), "step": step}


@torch.no_grad()
def infer(model, images: torch.Tensor, amp, channels_last: bool, batch_size: int = 1000, flip: bool = False) -> torch.Tensor:
    """Logits (N, 10), float32, of uint8 ``images``; with ``flip`` the mean of the image and its mirror."""
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = D.normalize(images[i : i + batch_size], channels_last)
        with amp:
            logits = model(x).float()
            if flip:
                logits = (logits + model(x.flip(3)).float()) / 2
        out.append(logits)
    return torch.cat(out) if out else torch.zeros(0, 10, device=images.device)


def evaluate(model, images, labels, amp, channels_last: bool, flip: bool = False) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) on clean images."""
    logits = infer(model, images, amp, channels_last, flip=flip)
    loss = F.cross_entropy(logits, labels).item() if len(labels) else float("nan")
    return (logits.argmax(1) == labels).float().mean().item(), loss


# ---------------------------------------------------------------- files
def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary file, then rename: a kill at any instant leaves the old file intact."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_metrics(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=METRICS_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k])) for k in METRICS_FIELDS})
    os.replace(tmp, path)


def write_predictions(path: Path, labels: torch.Tensor, logits: torch.Tensor) -> None:
    """One row per test image: index, true label, predicted label, the 10 class probabilities."""
    probs = logits.float().softmax(1).cpu()
    preds = probs.argmax(1)
    lines = ["index,label,pred," + ",".join(f"p_{c}" for c in D.CLASSES)]
    for i, (t, p, row) in enumerate(zip(labels.tolist(), preds.tolist(), probs.tolist())):
        lines.append(f"{i},{t},{p}," + ",".join(f"{v:.5f}" for v in row))
    atomic_write_text(path, "\n".join(lines) + "\n")


def check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".normlab-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise TrainingError(f"cannot write to output folder {out} ({e.strerror or e}); choose another with --out") from None


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise TrainingError(f"{path} is not a readable normlab checkpoint ({type(e).__name__}); delete it to start the run afresh") from None


# ---------------------------------------------------------------- the whole run
def _log(message: str) -> None:
    print(message, flush=True)  # flushed: a log file of a long run must show each epoch as it ends


def fit(cfg: Config, data_dir: str | os.PathLike | None, out: str | os.PathLike, resume: bool = False, log=_log) -> dict[str, Any]:
    """Train one model as ``cfg`` says and write its run folder ``out``; returns results.json's content."""
    cfg.validate()
    started = time.perf_counter()
    out = Path(out)
    ckpt_path = out / CHECKPOINT
    if resume:
        if not (out / "config.json").is_file():
            raise TrainingError(f"{out} is not a normlab run that can be resumed (no config.json); start it with normlab train --out {out}")
        try:
            saved = Config.load(out / "config.json").validate()
        except (OSError, ValueError, TypeError) as e:
            raise TrainingError(f"{out / 'config.json'} is not a readable normlab config ({type(e).__name__}); "
                                f"{out} cannot be resumed, start afresh with another --out") from None
        cfg = saved  # a resumed run keeps the settings it was started with
        if not ckpt_path.is_file():  # stopped within its first epoch: nothing to keep, start it again
            resume = False
            log(f"{out} stopped before its first epoch ended; starting it again with its saved settings")
    elif (out / "results.json").exists() or ckpt_path.exists():
        raise TrainingError(f"{out} already holds a run; resume it with --resume, or choose another --out")
    check_writable(out)

    device = pick_device(cfg.device)
    bf16, cl = use_bf16(device), use_channels_last(cfg.norm, device)
    amp = autocast(device, bf16)
    torch.manual_seed(cfg.seed)
    model = place(Net.from_config(cfg), device, cl)
    opt = make_optimizer(model, cfg)
    ema = make_ema(model, cfg.ema)
    final = ema.module if ema is not None else model  # the model that is evaluated and saved

    images, labels = D.load_split(data_dir, train=True)
    # Read (not yet used) up front: a bad test file must fail before the training, not after it.
    test_split = D.load_split(data_dir, train=False) if cfg.eval_test else None
    train_idx, val_idx = D.stratified_split(labels, cfg.val_size, cfg.seed)
    train_x, train_y = images[train_idx].to(device), labels[train_idx].to(device)
    val_x, val_y = images[val_idx].to(device), labels[val_idx].to(device)
    gen = torch.Generator().manual_seed(cfg.seed)
    batches = D.Batches(train_x, train_y, cfg.batch_size, True, cfg.crop_pad, cfg.flip, cl, gen, cfg.alt_flip)
    total = cfg.epochs * len(batches)

    rows: list[dict[str, Any]] = []
    start_epoch, step = 1, 0
    if resume:
        ck = load_checkpoint(ckpt_path)
        try:
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
            if ema is not None:
                ema.load_state_dict(ck["ema"])
            gen.set_state(ck["generator"])
            torch.set_rng_state(ck["torch_rng"])
            rows, step, start_epoch = ck["metrics"], ck["step"], ck["epoch"] + 1
            batches.epoch = ck["epoch"]
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise TrainingError(f"{ckpt_path} is not a checkpoint of this run ({type(e).__name__}); "
                                f"{out} cannot be resumed, start afresh with another --out") from None
        log(f"resuming {out} after epoch {ck['epoch']} of {cfg.epochs}")
    else:
        cfg.save(out / "config.json")

    n_params = count_params(model)
    limit = "" if cfg.epochs <= MAX_EPOCHS else f"  [{cfg.epochs} epochs: OUTSIDE the assignment's limit of {MAX_EPOCHS}]"
    log(f"{NORM_NAMES[cfg.norm]} ({cfg.norm}): {n_params:,} parameters, {len(train_y):,} training / {len(val_y):,} validation images, "
        f"{device.type}, {'bf16' if bf16 else 'fp32'}, {'channels_last' if cl else 'NCHW'}, {torch.get_num_threads()} threads{limit}")
    if start_epoch == 1:
        log(f"{'epoch':>5} {'lr':>7} {'loss':>7} {'train':>7} {'val':>7} {'sec':>6}")
    for epoch in range(start_epoch, cfg.epochs + 1):
        t0 = time.perf_counter()
        r = train_epoch(model, opt, batches, cfg, step, total, amp, desc=f"{cfg.norm} epoch {epoch}/{cfg.epochs}", ema=ema)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        if r["bad_batch"] >= 0:
            raise TrainingError(
                f"the training loss became NaN or infinite in epoch {epoch}, batch {r['bad_batch'] + 1} of {len(batches)}; "
                + (f"the last good epoch ({epoch - 1}) is kept in {out}. " if epoch > 1 else "")
                + "Start again with a lower --lr and another --out"
            )
        step = r["step"]
        val_acc, val_loss = evaluate(final, val_x, val_y, amp, cl) if len(val_y) else (None, None)
        rows.append({"epoch": epoch, "lr": lr_at(step - 1, total, cfg.lr, cfg.warmup), "train_loss": r["loss"], "train_acc": r["acc"],
                     "val_loss": val_loss, "val_acc": val_acc, "seconds": seconds})
        atomic_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "generator": gen.get_state(),
                     **({"ema": ema.state_dict()} if ema is not None else {}),
                     "torch_rng": torch.get_rng_state(), "metrics": rows, "step": step, "epoch": epoch,
                     "config": cfg.to_dict()}, ckpt_path)
        write_metrics(out / "metrics.csv", rows)
        v = f"{val_acc:7.2%}" if val_acc is not None else f"{'-':>7}"
        log(f"{epoch:>5} {rows[-1]['lr']:7.4f} {r['loss']:7.4f} {r['acc']:7.2%} {v} {seconds:6.1f}")

    # Final figures: the model as it stands after its last epoch.
    results: dict[str, Any] = {
        "norm": cfg.norm, "norm_name": NORM_NAMES[cfg.norm], "params": n_params, "param_budget": PARAM_BUDGET,
        "epochs": cfg.epochs, "over_epoch_limit": cfg.over_epoch_limit, "seed": cfg.seed,
        "train_acc_running": rows[-1]["train_acc"] if rows else None,
        "train_acc_clean": evaluate(final, train_x, train_y, amp, cl)[0],
        "val_acc": rows[-1]["val_acc"] if rows else None,
        "seconds_per_epoch": sum(r["seconds"] for r in rows) / max(1, len(rows)),
        "device": device_name(device), "precision": "bf16" if bf16 else "fp32", "channels_last": cl,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "data_dir": str(Path(data_dir).resolve()),
    }
    if cfg.eval_test:
        test_x, test_y = (t.to(device) for t in test_split)
        logits = infer(final, test_x, amp, cl)
        results["test_acc"] = (logits.argmax(1) == test_y).float().mean().item()
        results["test_acc_flip_tta"] = evaluate(final, test_x, test_y, amp, cl, flip=True)[0]
        write_predictions(out / "predictions.csv", test_y.cpu(), logits)
    atomic_save({"format": "normlab-model", "config": cfg.to_dict(), "model": final.state_dict()}, out / MODEL)
    # This call's wall time (data loading, training, final evaluations; a resumed run counts from
    # its resumption) and the process's peak resident memory so far.
    results["wall_seconds"] = time.perf_counter() - started
    results["peak_rss_mib"] = peak_rss_mib()
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    test = f", test {results['test_acc']:.2%}" if "test_acc" in results else ""
    minutes, secs = divmod(round(results["wall_seconds"]), 60)
    log(f"done in {minutes} min {secs:02d} s: train {results['train_acc_clean']:.2%} (clean), "
        f"{results['train_acc_running']:.2%} (running, augmented){test}; files in {out}")
    return results


def peak_rss_mib() -> float | None:
    """Peak resident memory of this process so far, in MiB (None where the OS does not say)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cores)"
