"""The optimizer part of a step: SGD with Nesterov momentum, Muon for the conv filters, Lookahead, the
moving average of the weights, and the one-cycle learning-rate schedule (a plain function of the step).

Muon for the conv filters (``--muon-lr``, the default) and SGD with Nesterov momentum for the rest, or
SGD for all; weight decay on SGD's conv weights only. ``loop.py`` runs the steps; ``loop.build`` makes
these from a ``Config``.
"""
from __future__ import annotations

import torch

from normlab.config import Config
from normlab.models import norm_layers


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
    ``orthogonalize``'s per-bank result up to rounding), the rescale and update on the banks laid end to end. The SGD groups
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


def set_lr(opt, lr: float) -> None:
    """The schedule's learning rate into each param group, times the group's ``lr_scale``. A captured step's
    learning rates are device tensors (capture.py): filled in place, where the replayed graph reads them."""
    for g in opt.param_groups:
        lr_g = lr * g.get("lr_scale", 1.0)
        if isinstance(g["lr"], torch.Tensor):
            g["lr"].fill_(lr_g)
        else:
            g["lr"] = lr_g
