"""The loop: one step, one epoch, infer and evaluate, and ``Trainer``, one model in training, made by
``build``, the one factory of everything a training needs (network, optimizer, Lookahead, moving average,
placement and the step: eager, compiled, CUDA graphs or captured). It writes no files (``api.py`` and
``rundir.py`` do).

Label smoothing; the optimizers and the schedule are ``optim.py``'s; the precision and layout come from a
``device.Placement`` (bf16 or fp16 autocast, fp16 with loss scaling, or fp32).
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from normlab import data as D
from normlab.capture import GraphedStep, plain_groups
from normlab.config import Config
from normlab.device import Placement, Runtime, setup
from normlab.errors import TrainingError
from normlab.models import Net, whiten_
from normlab.norms import get_norm, progress_layers
from normlab.optim import Lookahead, lr_at, make_ema, make_optimizer, set_lr

WHITEN_IMAGES = 5000  # training images whose 3x3 patches set a whitened C1 (airbench: 5,000)


class Diverged(TrainingError):
    """The training loss became NaN or infinite; ``epoch`` and ``batch`` (1-based) say where."""

    def __init__(self, epoch: int, batch: int, n_batches: int):
        self.epoch, self.batch, self.n_batches = epoch, batch, n_batches
        super().__init__(f"the training loss became NaN or infinite in epoch {epoch}, batch {batch} of {n_batches}")


def crops(cfg: Config, epoch: int) -> tuple[int, int]:
    """(random-crop padding, cutout side) of training epoch ``epoch`` (1-based): none in the last ``cfg.clean_epochs``."""
    return (0, 0) if epoch > cfg.epochs - cfg.clean_epochs else (cfg.crop_pad, cfg.cutout)


@torch.no_grad()
def recalibrate_bn(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, cfg: Config, place: Placement) -> None:
    """Precise BN (Wu and Johnson, 2021, "Rethinking 'Batch' in BatchNorm"): batch norm's running statistics
    re-estimated at the model's present weights, as the plain average over full training batches of their batch
    statistics (``cfg.precise_bn`` images, all if fewer, drawn with the seed's own generator, augmented as in the last
    epoch: ``crops``), instead of the running averages the training steps left, which mix in the last steps' weights.
    A model without batch norm, of a norm that does not read ``precise_bn`` (batch renorm: ``norms.NORMS``), or with
    ``precise_bn`` 0 is left alone; nothing but those buffers changes."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns or not cfg.precise_bn or "precise_bn" not in get_norm(cfg.norm).options:
        return
    generator = torch.Generator().manual_seed(cfg.seed)
    n = min(cfg.precise_bn, len(labels))
    n = n - n % cfg.batch_size or n  # full batches only, unless there are fewer images than one batch
    pick = torch.randperm(len(labels), generator=generator)[:n].to(images.device)
    pad, cutout = crops(cfg, cfg.epochs)  # the last epoch's augmentation
    batches = D.Batches(images[pick], labels[pick], cfg.batch_size, True, pad, cfg.flip, place.channels_last, generator,
                        cutout=cutout, fill=cfg.crop_fill)
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average: every batch weighs the same
    was_training = model.training
    model.train()
    with place.autocast():
        for x, _ in batches:
            model(x)
    model.train(was_training)
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum


def update_on_batch(model, opt, x: torch.Tensor, y: torch.Tensor, label_smoothing: float, place: Placement,
                    scaler: torch.amp.GradScaler) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward, loss, backward and optimizer step on the batch (x, y) at the learning rates already set: what
    ``train_step`` runs, and what ``--compile capture`` records as one CUDA graph. Returns the loss and the logits."""
    opt.zero_grad(set_to_none=True)  # the backward then writes the gradients, never adds to them
    with place.autocast():
        logits = model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
    scaler.scale(loss).backward()  # with fp32 or bf16 the scaler is disabled: plain backward and step
    scaler.step(opt)
    scaler.update()
    return loss, logits


def train_step(model, opt, x: torch.Tensor, y: torch.Tensor, lr: float, label_smoothing: float, place: Placement,
               scaler: torch.amp.GradScaler) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on the batch (x, y); returns the loss and the logits, both still on the device."""
    set_lr(opt, lr)
    if place.graphs:  # a new iteration: the last one's graph outputs (already read) may be overwritten
        torch.compiler.cudagraph_mark_step_begin()
    return update_on_batch(model, opt, x, y, label_smoothing, place, scaler)


def graphed_step(model, opt, cfg: Config, place: Placement, scaler: torch.amp.GradScaler) -> GraphedStep:
    """``--compile capture``'s step of ``model``: ``update_on_batch`` recorded as one CUDA graph."""
    return GraphedStep(functools.partial(update_on_batch, model, opt, label_smoothing=cfg.label_smoothing, place=place,
                                         scaler=scaler), opt)


def train_epoch(model, opt, batches, cfg: Config, step: int, total: int, place: Placement, scaler: torch.amp.GradScaler,
                desc: str = "", ema=None, progress: bool = True, lookahead: Lookahead | None = None,
                eager: torch.nn.Module | None = None, time_first: bool = False, graphed=None) -> dict[str, Any]:
    """One pass over ``batches`` (then ``lookahead`` and ``ema``, if given, after each step); returns loss/accuracy
    means, the first non-finite batch (or -1) and the new step count.

    ``eager``: where ``model`` is compiled, the plain module it wraps, which takes the batches of another size
    (the last, partial one of an epoch): one eager step instead of a second compilation for that shape.
    ``time_first``: also return ``first_step_seconds``, the first step's wall time (a compiled network's
    compilation happens there), with a synchronization after it.
    ``graphed``: a ``capture.GraphedStep`` that takes the full batches (the partial one goes through ``train_step``)."""
    t0 = time.perf_counter()
    first_step_seconds = None
    model.train()
    dev = batches.labels.device
    loss_sum, correct, bad = torch.zeros((), device=dev), torch.zeros((), device=dev, dtype=torch.long), torch.tensor(-1, device=dev)
    renorms = progress_layers(model)  # batch renorm's limits follow the run's progress, as the learning rate does
    for i, (x, y) in enumerate(tqdm(batches, desc=desc, leave=False, disable=None if progress else True, unit="batch")):
        lr = lr_at(step, total, cfg.lr, cfg.warmup, cfg.hold)
        for m in renorms:
            m.set_progress(step / total)
        if graphed is not None and len(y) == batches.batch_size:
            set_lr(opt, lr)
            loss, logits = graphed(x, y)
        else:
            net = model if eager is None or len(y) == batches.batch_size else eager
            loss, logits = train_step(net, opt, x, y, lr, cfg.label_smoothing, place, scaler)
        if time_first and i == 0:
            place.synchronize()
            first_step_seconds = time.perf_counter() - t0
        if lookahead is not None:
            lookahead.step(step + 1, total)
        if ema is not None:
            ema.update_parameters(model)
        step += 1
        # Accumulate on the device: .item() per step would be a sync point on a GPU.
        loss_sum += loss.detach() * len(y)
        correct += (logits.argmax(1) == y).sum()
        bad = torch.where((bad < 0) & ~torch.isfinite(loss.detach()), i, bad)
    n = len(batches.labels)
    return {"loss": loss_sum.item() / n, "acc": correct.item() / n, "bad_batch": int(bad), "step": step,
            "first_step_seconds": first_step_seconds}


@torch.no_grad()
def infer(model, images: torch.Tensor, place: Placement, batch_size: int = 1000, flip: bool = False) -> torch.Tensor:
    """Logits (N, 10), float32, of uint8 ``images``; with ``flip`` the mean of the image and its mirror."""
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = D.normalize(images[i : i + batch_size], place.channels_last)
        with place.autocast():  # copies: a CUDA graph's output is overwritten by its next replay (fp32 .float() is no copy)
            logits = model(x).to(torch.float32, copy=True)
            if flip:
                logits = (logits + model(x.flip(3)).float()) / 2
        out.append(logits)
    return torch.cat(out) if out else torch.zeros(0, 10, device=images.device)


def evaluate(model, images, labels, place: Placement, flip: bool = False) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) on clean images."""
    logits = infer(model, images, place, flip=flip)
    loss = F.cross_entropy(logits, labels).item() if len(labels) else float("nan")
    return (logits.argmax(1) == labels).float().mean().item(), loss


# ---------------------------------------------------------------- one model in training
@dataclass(eq=False)
class Trainer:
    """One model in training: the network, its optimizer, moving average, batches and step count (``build`` makes it).

    ``run_epoch()`` trains one epoch and returns its metrics row; ``state_dict()`` and
    ``load_state_dict()`` carry everything a resumed run needs to continue bit for bit.
    With ``test_x, test_y`` each row also holds the test loss and accuracy after the epoch: monitoring
    only (nothing is chosen by it), evaluated like the validation split, in eval mode without
    gradients, so it touches no random state and no running statistic and the weights come out the same.
    """

    cfg: Config
    place: Placement
    model: torch.nn.Module  # the network; its state_dict keys are the checkpoint's
    net: Any  # what the training steps call: ``model``, or its torch.compile'd wrapper
    opt: torch.optim.Optimizer
    ema: Any  # torch.optim.swa_utils.AveragedModel, or None
    lookahead: Lookahead | None
    scaler: torch.amp.GradScaler
    graphed: GraphedStep | None  # --compile capture: each full batch's step as one CUDA graph
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    generator: torch.Generator
    batches: D.Batches
    progress: bool = True
    step: int = 0
    epoch: int = 0
    metrics: list[dict[str, Any]] = field(default_factory=list)
    compile_seconds: float | None = None  # a compiled network: its first step in this process, compilation included

    @property
    def total(self) -> int:
        return self.cfg.epochs * len(self.batches)

    @property
    def final(self) -> torch.nn.Module:
        """The model that is evaluated and saved: the moving average if there is one."""
        return self.ema.module if self.ema is not None else self.model

    @property
    def done(self) -> bool:
        return self.epoch >= self.cfg.epochs

    def train_on(self, batches, step: int, total: int, desc: str = "", time_first: bool = False) -> dict[str, Any]:
        """One pass over ``batches`` from step ``step`` of ``total`` with this model's optimizer, Lookahead, moving
        average and step (``train_epoch``); the benchmarks time it on batches of their own."""
        compiled = self.net is not self.model
        return train_epoch(self.net, self.opt, batches, self.cfg, step, total, self.place, self.scaler, desc=desc, ema=self.ema,
                           progress=self.progress, lookahead=self.lookahead, eager=self.model if compiled else None,
                           time_first=time_first, graphed=self.graphed)

    def step_on(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step on the full batch (x, y) at ``lr``, as an epoch takes it (captured, compiled or eager)."""
        if self.graphed is not None:
            set_lr(self.opt, lr)
            return self.graphed(x, y)
        return train_step(self.net, self.opt, x, y, lr, self.cfg.label_smoothing, self.place, self.scaler)

    def run_epoch(self) -> dict[str, Any]:
        """Train the next epoch; returns (and keeps) its row of metrics. Raises ``Diverged`` on a non-finite loss."""
        cfg, epoch = self.cfg, self.epoch + 1
        t0 = time.perf_counter()
        self.batches.pad, self.batches.cutout = crops(cfg, epoch)
        r = self.train_on(self.batches, self.step, self.total, desc=f"{cfg.norm} epoch {epoch}/{cfg.epochs}",
                          time_first=self.net is not self.model and self.compile_seconds is None)
        if r["first_step_seconds"] is not None:
            self.compile_seconds = r["first_step_seconds"]
        if self.lookahead is not None and epoch == cfg.epochs:
            self.lookahead.finish()
        if epoch == cfg.epochs and r["bad_batch"] < 0:  # batch norm's statistics at the final weights (--precise-bn)
            recalibrate_bn(self.final, self.train_x, self.train_y, cfg, self.place)
        self.place.synchronize()
        seconds = time.perf_counter() - t0
        if r["bad_batch"] >= 0:
            raise Diverged(epoch, r["bad_batch"] + 1, len(self.batches))
        self.step, self.epoch = r["step"], epoch
        val_acc, val_loss = evaluate(self.final, self.val_x, self.val_y, self.place) if len(self.val_y) else (None, None)
        test_acc = test_loss = test_seconds = None
        if len(self.test_y):  # timed apart from the training: seconds stays training time only
            t0 = time.perf_counter()
            test_acc, test_loss = evaluate(self.final, self.test_x, self.test_y, self.place)
            test_seconds = time.perf_counter() - t0
        row = {"epoch": epoch, "lr": lr_at(self.step - 1, self.total, cfg.lr, cfg.warmup, cfg.hold), "train_loss": r["loss"],
               "train_acc": r["acc"], "val_loss": val_loss, "val_acc": val_acc, "test_loss": test_loss, "test_acc": test_acc,
               "seconds": seconds, "test_seconds": test_seconds}
        self.metrics.append(row)
        return row

    def final_scores(self) -> "FinalScores":
        """The final model on the clean training images and (where read) the test set: plain, and flip-averaged."""
        final, place = self.final, self.place
        train_acc_clean = evaluate(final, self.train_x, self.train_y, place)[0]
        if not self.cfg.eval_test:
            return FinalScores(train_acc_clean)
        logits = infer(final, self.test_x, place)
        test_acc = (logits.argmax(1) == self.test_y).float().mean().item()
        return FinalScores(train_acc_clean, test_acc, evaluate(final, self.test_x, self.test_y, place, flip=True)[0], logits)

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors, numbers, strings, lists and dicts only: loadable with ``torch.load(weights_only=True)``."""
        state = {"model": self.model.state_dict(), "optimizer": plain_groups(self.opt.state_dict()), "generator": self.generator.get_state(),
                 "torch_rng": torch.get_rng_state(), "metrics": self.metrics, "step": self.step, "epoch": self.epoch}
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        if self.lookahead is not None:
            state["lookahead"] = self.lookahead.slow
        if self.scaler.is_enabled():
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        if self.lookahead is not None:
            for slow, saved in zip(self.lookahead.slow, state["lookahead"]):
                slow.copy_(saved)
        if self.scaler.is_enabled() and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.metrics, self.step, self.epoch = list(state["metrics"]), state["step"], state["epoch"]
        self.batches.epoch = state["epoch"]


@dataclass(frozen=True)
class FinalScores:
    """The final model's accuracies: clean training images; test set plain and flip-averaged (None: not read)."""

    train_acc_clean: float
    test_acc: float | None = None
    test_acc_flip_tta: float | None = None
    test_logits: torch.Tensor | None = None  # (N, 10) on the device, for predictions.csv


def placement(cfg: Config, runtime: Runtime) -> Placement:
    """Where one model of ``cfg`` runs under ``runtime``, its GPU's peak-memory count started afresh."""
    place = setup(runtime, cfg.norm)
    place.reset_peak_memory()
    return place


def build(cfg: Config, where: Runtime | Placement, train_x: torch.Tensor, train_y: torch.Tensor,
          val_x: torch.Tensor | None = None, val_y: torch.Tensor | None = None, test_x: torch.Tensor | None = None,
          test_y: torch.Tensor | None = None, progress: bool = True) -> Trainer:
    """The ``Trainer`` of one model of a valid ``cfg``, at the ``where`` placement (a ``Runtime``: ``placement``'s), on
    uint8 images: the network (seeded; C1 whitened from ``train_x`` where asked), the optimizer (SGD, or SGD with Muon),
    Lookahead, the moving average, the loss scaler, the step (compiled, CUDA graphs or captured, as placed) and the
    training batches. The only place a training is put together: the API, the benchmarks and the tests call it."""
    place = where if isinstance(where, Placement) else placement(cfg, where)
    torch.manual_seed(cfg.seed)
    net = Net.from_config(cfg)
    if cfg.whiten != "off":  # C1 from the training images' patches (no random draw: the seed's stream is unchanged)
        whiten_(net.C1[0], D.normalize(train_x[:WHITEN_IMAGES], channels_last=False))
    model = place.place(net)
    compiled = place.compiled(model)  # what the training steps call; model keeps the state_dict keys
    opt = make_optimizer(model, cfg, place.precision)
    ema = make_ema(model, cfg.ema)
    lookahead = Lookahead(model, cfg.lookahead) if cfg.lookahead else None
    scaler = place.grad_scaler()
    # --compile capture: the whole step of each full batch as one CUDA graph (CUDA only: device.setup)
    graphed = graphed_step(model, opt, cfg, place, scaler) if place.capture else None
    dev = place.device
    empty_x, empty_y = torch.zeros(0, 3, 32, 32, dtype=torch.uint8), torch.zeros(0, dtype=torch.long)
    train_x, train_y = train_x.to(dev), train_y.to(dev)
    val_x, val_y, test_x, test_y = ((t if t is not None else empty).to(dev) for t, empty in
                                    ((val_x, empty_x), (val_y, empty_y), (test_x, empty_x), (test_y, empty_y)))
    generator = torch.Generator().manual_seed(cfg.seed)
    batches = D.Batches(train_x, train_y, cfg.batch_size, True, cfg.crop_pad, cfg.flip, place.channels_last,
                        generator, cfg.alt_flip, cutout=cfg.cutout, fill=cfg.crop_fill)
    return Trainer(cfg, place, model, compiled, opt, ema, lookahead, scaler, graphed, train_x, train_y, val_x, val_y,
                   test_x, test_y, generator, batches, progress)
