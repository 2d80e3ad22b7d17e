"""The loop: optimizer, schedule, one step, one epoch, infer and evaluate, and ``Trainer`` that
holds one model in training. It writes no files (``api.py`` and ``rundir.py`` do).

Muon for the conv filters (``--muon-lr``, the default) and SGD with Nesterov momentum for the rest, or
SGD for all; a one-cycle learning rate (a plain function of the step), label smoothing, weight decay on
SGD's conv weights only; the precision and layout come from a
``device.Placement`` (bf16 or fp16 autocast, fp16 with loss scaling, or fp32).
"""
from __future__ import annotations

import functools

from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from normlab import data as D
from normlab.capture import GraphedStep, plain_groups
from normlab.config import Config
from normlab.device import Placement
from normlab.errors import TrainingError
from normlab.models import Net, norm_layers, whiten_

WHITEN_IMAGES = 5000  # training images whose 3x3 patches set a whitened C1 (airbench: 5,000)


class Diverged(TrainingError):
    """The training loss became NaN or infinite; ``epoch`` and ``batch`` (1-based) say where."""

    def __init__(self, epoch: int, batch: int, n_batches: int):
        self.epoch, self.batch, self.n_batches = epoch, batch, n_batches
        super().__init__(f"the training loss became NaN or infinite in epoch {epoch}, batch {batch} of {n_batches}")


# ---------------------------------------------------------------- optimization
def lr_at(step: int, total: int, peak: float, warmup: float, hold: float = 0.0) -> float:
    """One-cycle: linear from peak/10 up to ``peak`` over the warm-up, ``peak`` for the hold, then linear down to 0."""
    rise = max(1, round(warmup * total))
    if step < rise:
        return peak * (0.1 + 0.9 * step / rise)
    top = rise + round(hold * total)
    if step < top:
        return peak
    return peak * max(0.0, (total - step) / max(1, total - top))


def norm_biases(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The biases (shifts) of the norm layers."""
    return [m.bias for m in norm_layers(model)]


NS_COEFFICIENTS, NS_STEPS = (3.4445, -4.775, 2.0315), 5  # torch.optim.Muon's defaults (Jordan et al.'s quintic)


def orthogonalize(g: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Muon's Newton-Schulz iteration: a 2-D ``g`` to about U V^T of its SVD (singular values ~0.7-1.2), in ``dtype``.

    torch.optim.Muon's own ``_zeropower_via_newtonschulz``, op for op (the same result bit for bit in
    bf16, which it always uses); ``dtype`` lets a CPU without bf16 units run it in fp32, 3-4 times faster
    than emulated bf16 there.
    """
    a, b, c = NS_COEFFICIENTS
    x = g.to(dtype)
    tall = g.size(0) > g.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=1e-7)  # spectral norm at most 1 (g itself untouched)
    for _ in range(NS_STEPS):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def orthogonalize_batch(g: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``orthogonalize`` of every matrix of a batch ``g`` (n, rows, cols), rows <= cols, at once: one chain of
    batched products instead of one per matrix, each matrix scaled by its own Frobenius norm. A matrix
    zero-padded to the batch's shape comes out as the same padding around its own result: zero rows and
    columns stay zero through every product, and the norm is unchanged (equal up to rounding)."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(dtype)
    x = x / x.norm(dim=(1, 2), keepdim=True).clamp(min=1e-7)  # (n, 1, 1): each spectral norm at most 1
    for _ in range(NS_STEPS):
        gram = torch.bmm(x, x.mT)  # (n, rows, rows)
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x


class FilterBanks:
    """Where each element of a list of filter banks sits in one zero-padded batch of matrices, so that Muon's step
    for all of them is a handful of kernel launches, not some 24 per bank.

    Bank i, viewed as (out, in*k*k) and transposed if tall (rows <= cols, as ``orthogonalize`` does), fills the top
    left of slice i of a (n, rows, cols) batch; the rest is zero. ``flat`` lays the banks end to end in their own
    memory order (channels_last or not: views, no copies), and two index maps move between that and the batch.
    Built once per list of banks (index tensors on their device), before any CUDA graph records a step."""

    def __init__(self, params: list[torch.Tensor]):
        device = params[0].device
        # dims in memory order: a channels_last bank read in that order is a view of its storage
        self.perms = [(0, 2, 3, 1) if p.ndim == 4 and not p.is_contiguous() and p.is_contiguous(memory_format=torch.channels_last)
                      else tuple(range(p.ndim)) for p in params]
        mats = [(p.shape[0], p[0].numel()) for p in params]  # (out, in*k*k)
        n, rows, cols = len(params), max(min(m) for m in mats), max(max(m) for m in mats)
        self.sizes = [p.numel() for p in params]
        total = sum(self.sizes)
        to_batch = torch.empty(total, dtype=torch.long)  # flat position -> position in the (n, rows, cols) batch
        offset = 0
        for i, (p, perm, (out, fan_in)) in enumerate(zip(params, self.perms, mats)):
            logical = torch.arange(p.numel()).view(p.shape).permute(perm).reshape(-1)  # (out, in*k*k) index at each flat slot
            r, c = logical // fan_in, logical % fan_in
            if out > fan_in:
                r, c = c, r
            to_batch[offset:offset + p.numel()] = i * rows * cols + r * cols + c
            offset += p.numel()
        from_flat = torch.full((n * rows * cols,), total, dtype=torch.long)  # slot ``total``: a zero appended to the flat
        from_flat[to_batch] = torch.arange(total)
        self.shape = (n, rows, cols)
        self.to_batch, self.from_flat = to_batch.to(device), from_flat.to(device)
        self.bank = torch.repeat_interleave(torch.arange(n), torch.tensor(self.sizes)).to(device)  # flat position -> bank
        # torch.optim.Muon's default scale sqrt(max(1, out / (in*k*k))); the norm a renormalized bank gets, sqrt(out)
        self.scale = torch.tensor([max(1.0, o / f) ** 0.5 for o, f in mats], device=device).view(n, 1, 1)
        self.sqrt_out = torch.tensor([o ** 0.5 for o, _ in mats], device=device)
        self.zero = torch.zeros(1, device=device)

    def views(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each bank in its memory order (a view where its layout is the bank's own)."""
        return [t.permute(perm) for t, perm in zip(tensors, self.perms)]

    def flat(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """The banks end to end, in memory order: one concatenation. (total,)"""
        return torch.cat([v.reshape(-1) for v in self.views(tensors)])

    def unflat(self, flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
        """``flat``'s pieces shaped as the memory-order views of ``like`` (so that foreach ops take their fast path)."""
        return [piece.view(v.shape) for piece, v in zip(flat.split(self.sizes), self.views(like))]

    def orthogonalized(self, updates: list[torch.Tensor], lr, dtype: torch.dtype) -> torch.Tensor:
        """Every bank's orthogonalized update times its scale and ``lr`` (a number, or a device tensor), flat, fp32."""
        padded = torch.cat([self.flat(updates), self.zero]).index_select(0, self.from_flat).view(self.shape)
        ortho = orthogonalize_batch(padded, dtype).float() * (self.scale * lr)  # (n, rows, cols)
        return ortho.view(-1).index_select(0, self.to_batch)


class SGDMuon(torch.optim.SGD):
    """torch.optim.SGD for every parameter group but those marked ``muon``; there Muon (Jordan et al., 2024):
    Nesterov momentum (``muon_momentum``), then each filter bank's update, viewed as (out, in*k*k), orthogonalized
    (``orthogonalize``, in ``ns_dtype``: bf16 as torch.optim.Muon, fp32 where the run is fp32) and scaled by
    sqrt(max(1, out / (in*k*k))) as torch.optim.Muon does by default. torch.optim.Muon itself takes 2-D
    parameters only; conv filters are 4-D. A group with ``normalize`` (the default; --no-muon-norm turns it off)
    first scales each filter bank to norm sqrt(out), as airbench94_muon does, so that the step's size relative to
    the filters is the learning rate's.

    The whole group in a few dozen kernel launches (an eager GPU step is bound by its launches): momentum with
    foreach ops, every bank's Newton-Schulz chain as one batched chain (``FilterBanks``, ``orthogonalize_batch``:
    today's per-bank result up to rounding), the rescale and update on the banks laid end to end. The SGD groups
    take torch's foreach path on a CPU too (the same arithmetic as its per-tensor loop, which it is there).
    """

    ns_dtype = torch.bfloat16  # make_optimizer sets the run's (fp32 unless the run is bf16)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:  # as torch's optimizers: the closure recomputes the loss and its gradients first
            with torch.enable_grad():
                loss = closure()
        groups = self.param_groups
        self.param_groups = [dict(g, foreach=True) if g.get("foreach") is None and not g.get("fused") else g
                             for g in groups if not g.get("muon")]
        try:
            super().step()  # SGD, exactly as without Muon
        finally:
            self.param_groups = groups
        for g in (g for g in groups if g.get("muon")):
            params = [p for p in g["params"] if p.grad is not None]
            if params:
                self._muon_step(g, params)
        return loss

    def _muon_step(self, g: dict, params: list[torch.Tensor]) -> None:
        key = tuple(map(id, params))
        banks = getattr(self, "_banks", {}).get(key)
        if banks is None:  # once: host work and host-to-device copies, never inside a captured step
            self._banks = {**getattr(self, "_banks", {}), key: (banks := FilterBanks(params))}
        grads, bufs = [p.grad for p in params], []
        for p in params:
            state = self.state[p]
            if "muon_buffer" not in state:
                state["muon_buffer"] = torch.zeros_like(p.grad)
            bufs.append(state["muon_buffer"])
        torch._foreach_lerp_(bufs, grads, 1 - g["momentum"])
        updates = torch._foreach_lerp(grads, bufs, g["momentum"])  # Nesterov
        step = banks.orthogonalized(updates, g["lr"], self.ns_dtype)  # a device lr: a captured step reads it (capture.py)
        if g.get("normalize"):  # the filters to norm sqrt(out), their function unchanged (scale-free)
            factor = banks.sqrt_out / torch.stack(torch._foreach_norm(params))  # (n,)
            new = banks.flat(params) * factor.index_select(0, banks.bank) - step
            torch._foreach_copy_(banks.views(params), banks.unflat(new, params))
        else:
            torch._foreach_sub_(banks.views(params), banks.unflat(step, params))


def make_optimizer(model: torch.nn.Module, cfg: Config, precision: str = "bf16") -> torch.optim.Optimizer:
    """SGD Nesterov; weight decay on conv weights only. With ``norm_bias_lr`` != 1 the norms' biases form a third
    group whose learning rate is that multiple of the schedule's (``lr_scale``; train_step applies it). With
    ``muon_lr`` the conv filters but C10's train with Muon (``SGDMuon``) at that peak, on the same schedule;
    its orthogonalization in bf16 where the run's ``precision`` is bf16, else in fp32 (bf16 there would be
    emulated: on a CPU without bf16 units it made Muon's step 3-4 times slower)."""
    fast = {id(p) for p in norm_biases(model)} if cfg.norm_bias_lr != 1 else set()
    head = getattr(model, "C10", None)
    muon = {id(p) for p in model.parameters() if p.ndim == 4 and (head is None or p is not head.weight)} if cfg.muon_lr else set()
    decay = [p for p in model.parameters() if p.ndim >= 2 and id(p) not in muon]    # conv weights
    no_decay = [p for p in model.parameters() if p.ndim < 2 and id(p) not in fast]  # norm scales/shifts and biases
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if fast:  # only then: the optimizer state of earlier runs (two groups) still loads
        groups.append({"params": [p for p in model.parameters() if id(p) in fast], "weight_decay": 0.0,
                       "lr_scale": cfg.norm_bias_lr})
    if muon:
        groups.append({"params": [p for p in model.parameters() if id(p) in muon], "weight_decay": 0.0, "muon": True,
                       "momentum": cfg.muon_momentum, "lr_scale": cfg.muon_lr / cfg.lr, "normalize": cfg.muon_norm})
        opt = SGDMuon(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
        opt.ns_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        return opt
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)


def make_ema(model: torch.nn.Module, decay: float):
    """An exponential moving average of the weights and the norms' running statistics (None if ``decay`` is 0)."""
    if not decay:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


class Lookahead:
    """airbench's Lookahead: a slow copy of the weights and float buffers (the running statistics too).

    After every ``EVERY``-th optimizer step, and after the last, the slow copy moves towards the network by
    1 - decay and the network jumps back to it; decay = alpha^5 * (step/total)^3 rises from 0 (plain training)
    to alpha^5 at the end, where ``finish`` makes the network the slow copy (Zhang et al., 2019, "Lookahead
    Optimizer: k steps forward, 1 step back", with airbench's schedule). airbench pulls on every fifth step
    alone and so drops the steps after the last one: nothing here (20 epochs make a multiple of 5 steps), but
    every step of a run shorter than 5.
    """

    EVERY = 5

    def __init__(self, model: torch.nn.Module, alpha: float):
        self.alpha = alpha
        self.live = [t for t in model.state_dict(keep_vars=True).values() if t.is_floating_point()]
        self.slow = [t.detach().clone() for t in self.live]  # clones keep the layout: the foreach ops' fast path
        self._live = [t.detach() for t in self.live]

    @torch.no_grad()
    def pull(self, decay: float) -> None:
        # Two foreach ops (two kernel launches on a GPU) instead of two per tensor; the same arithmetic.
        torch._foreach_lerp_(self.slow, self._live, 1 - decay)
        torch._foreach_copy_(self._live, self.slow)

    def step(self, step: int, total: int) -> None:
        """After optimizer step number ``step`` (1-based) of ``total``."""
        if step % self.EVERY == 0 or step == total:
            self.pull(self.alpha ** self.EVERY * (step / total) ** 3)

    def finish(self) -> None:
        self.pull(1.0)  # the network takes the slow weights


def crops(cfg: Config, epoch: int) -> tuple[int, int]:
    """(random-crop padding, cutout side) of training epoch ``epoch`` (1-based): none in the last ``cfg.clean_epochs``."""
    return (0, 0) if epoch > cfg.epochs - cfg.clean_epochs else (cfg.crop_pad, cfg.cutout)


@torch.no_grad()
def recalibrate_bn(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, cfg: Config, place: Placement) -> None:
    """Precise BN (Wu and Johnson, 2021, "Rethinking 'Batch' in BatchNorm"): batch norm's running statistics
    re-estimated at the model's present weights, as the plain average over full training batches of their batch
    statistics (``cfg.precise_bn`` images, all if fewer, drawn with the seed's own generator, augmented as in the last
    epoch: ``crops``), instead of the running averages the training steps left, which mix in the last steps' weights.
    A model without batch norm (or ``precise_bn`` 0) is left alone; nothing but those buffers changes."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns or not cfg.precise_bn:
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


def set_lr(opt, lr: float) -> None:
    """The schedule's learning rate into each param group, times the group's ``lr_scale``. A captured step's
    learning rates are device tensors (capture.py): filled in place, where the replayed graph reads them."""
    for g in opt.param_groups:
        lr_g = lr * g.get("lr_scale", 1.0)
        if isinstance(g["lr"], torch.Tensor):
            g["lr"].fill_(lr_g)
        else:
            g["lr"] = lr_g


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
    import time

    t0 = time.perf_counter()
    first_step_seconds = None
    model.train()
    dev = batches.labels.device
    loss_sum, correct, bad = torch.zeros((), device=dev), torch.zeros((), device=dev, dtype=torch.long), torch.tensor(-1, device=dev)
    for i, (x, y) in enumerate(tqdm(batches, desc=desc, leave=False, disable=None if progress else True, unit="batch")):
        lr = lr_at(step, total, cfg.lr, cfg.warmup, cfg.hold)
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
class Trainer:
    """One model in training: the network, its optimizer, moving average, batches and step count.

    ``run_epoch()`` trains one epoch and returns its metrics row; ``state_dict()`` and
    ``load_state_dict()`` carry everything a resumed run needs to continue bit for bit.
    With ``test_x, test_y`` each row also holds the test loss and accuracy after the epoch: monitoring
    only (nothing is chosen by it), evaluated like the validation split, in eval mode without
    gradients, so it touches no random state and no running statistic and the weights come out the same.
    """

    def __init__(self, cfg: Config, place: Placement, train_x: torch.Tensor, train_y: torch.Tensor,
                 val_x: torch.Tensor | None = None, val_y: torch.Tensor | None = None, progress: bool = True,
                 test_x: torch.Tensor | None = None, test_y: torch.Tensor | None = None):
        self.cfg, self.place, self.progress = cfg, place, progress
        torch.manual_seed(cfg.seed)
        net = Net.from_config(cfg)
        if cfg.whiten != "off":  # C1 from the training images' patches (no random draw: the seed's stream is unchanged)
            whiten_(net.C1[0], D.normalize(train_x[:WHITEN_IMAGES], channels_last=False))
        self.model = place.place(net)
        self.net = place.compiled(self.model)  # what the training steps call; self.model keeps the state_dict keys
        self.opt = make_optimizer(self.model, cfg, place.precision)
        self.ema = make_ema(self.model, cfg.ema)
        self.lookahead = Lookahead(self.model, cfg.lookahead) if cfg.lookahead else None
        self.scaler = place.grad_scaler()
        # --compile capture: the whole step of each full batch as one CUDA graph (CUDA only: device.setup)
        self.graphed = graphed_step(self.model, self.opt, cfg, place, self.scaler) if place.capture else None
        dev = place.device
        self.train_x, self.train_y = train_x.to(dev), train_y.to(dev)
        empty_x, empty_y = torch.zeros(0, 3, 32, 32, dtype=torch.uint8), torch.zeros(0, dtype=torch.long)
        self.val_x = (val_x if val_x is not None else empty_x).to(dev)
        self.val_y = (val_y if val_y is not None else empty_y).to(dev)
        self.test_x = (test_x if test_x is not None else empty_x).to(dev)
        self.test_y = (test_y if test_y is not None else empty_y).to(dev)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.batches = D.Batches(self.train_x, self.train_y, cfg.batch_size, True, cfg.crop_pad, cfg.flip, place.channels_last,
                                 self.generator, cfg.alt_flip, cutout=cfg.cutout, fill=cfg.crop_fill)
        self.total = cfg.epochs * len(self.batches)
        self.step, self.epoch = 0, 0
        self.metrics: list[dict[str, Any]] = []
        self.compile_seconds: float | None = None  # a compiled network: its first step in this process, compilation included

    @property
    def final(self) -> torch.nn.Module:
        """The model that is evaluated and saved: the moving average if there is one."""
        return self.ema.module if self.ema is not None else self.model

    @property
    def done(self) -> bool:
        return self.epoch >= self.cfg.epochs

    def run_epoch(self) -> dict[str, Any]:
        """Train the next epoch; returns (and keeps) its row of metrics. Raises ``Diverged`` on a non-finite loss."""
        import time

        cfg, epoch = self.cfg, self.epoch + 1
        t0 = time.perf_counter()
        self.batches.pad, self.batches.cutout = crops(cfg, epoch)
        r = train_epoch(self.net, self.opt, self.batches, cfg, self.step, self.total, self.place, self.scaler,
                        desc=f"{cfg.norm} epoch {epoch}/{cfg.epochs}", ema=self.ema, progress=self.progress,
                        lookahead=self.lookahead, eager=self.model if self.net is not self.model else None,
                        time_first=self.net is not self.model and self.compile_seconds is None, graphed=self.graphed)
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
