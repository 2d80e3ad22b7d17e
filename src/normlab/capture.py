"""The whole training step captured as one CUDA graph (``--compile capture``): forward, loss, backward and
the SGD step recorded once and replayed for every full batch, with PyTorch's own kernels and no
``torch.compile`` (so no compilation time).

On an H100 a bn step issued ~440 kernels for 1.75 ms of kernel time against 9.6 ms of wall time
(docs/performance.md, 2026-11-28): the host's launches were the cost, which one replay removes. What a
replayed step needs, PyTorch's "whole-network capture" recipe: a few eager warm-up steps on a side stream
(cuDNN's algorithm search, the momentum buffers), then inputs and learning rates in fixed device tensors
that each step overwrites (SGD fused, reading its learning rate from the device), and autocast without its
weight-cast cache (SGDMuon's Muon step too). fp16's loss scaling stays on the device too (``DeviceScaler``):
a T4 gets a captured step with no compilation at all.
"""
from __future__ import annotations

from typing import Callable

import torch

from normlab.errors import TrainingError

WARMUP_STEPS = 3  # eager steps before the capture, as in PyTorch's recipe


class DeviceScaler(torch.amp.GradScaler):
    """fp16 loss scaling that never reads the device, so that a whole step can be recorded and replayed.

    torch.amp.GradScaler skips a step with inf/NaN gradients by reading ``found_inf`` on the host (a sync each step,
    and nothing a CUDA graph can record). Here the skip is arithmetic: the gradients are unscaled and checked in one
    op (``torch._amp_foreach_non_finite_check_and_unscale_``); where one is not finite they are all zeroed, so the
    optimizer step computes finite values, and the parameters and the optimizer's state tensors are then put back
    as they were (t * (1 - found) + saved * found: exact for finite values); the scale is halved or grown on the
    device (``torch._amp_update_scale_``), as GradScaler.update does. The same steps as GradScaler's otherwise."""

    @torch.no_grad()
    def step(self, optimizer: torch.optim.Optimizer, *args, **kwargs):  # type: ignore[override]
        if not self.is_enabled():
            return optimizer.step(*args, **kwargs)
        self._check_scale_growth_tracker("step")
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        grads = [p.grad for p in params]
        found = torch.zeros(1, device=self._scale.device)  # 1.0 where any gradient is inf or NaN
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found, self._scale.double().reciprocal().float())
        skip = found.bool()
        for g in grads:  # zeros in a skipped step: the step below then computes finite values, undone after it
            g.masked_fill_(skip, 0.0)
        kept = params + [v for p in params for v in optimizer.state[p].values()
                         if isinstance(v, torch.Tensor) and v.is_floating_point()]
        saved = [torch.empty_like(t) for t in kept]
        torch._foreach_copy_(saved, kept)
        out = optimizer.step(*args, **kwargs)
        f = found.squeeze()
        torch._foreach_mul_(kept, 1 - f)
        torch._foreach_add_(kept, torch._foreach_mul(saved, f))
        self._found_inf = found
        return out

    def update(self, new_scale=None) -> None:  # type: ignore[override]
        if not self.is_enabled() or new_scale is not None:
            return super().update(new_scale)
        torch._amp_update_scale_(self._scale, self._growth_tracker, self._found_inf, self._growth_factor,
                                 self._backoff_factor, self._growth_interval)


def use_device_lr(opt: torch.optim.Optimizer) -> None:
    """Each param group's learning rate as a device tensor that the (fused) SGD step reads: a replayed step takes
    the schedule's new value from there. ``optim.set_lr`` fills it in place."""
    for g in opt.param_groups:
        device = g["params"][0].device
        lr = g["lr"]
        g["lr"] = lr if isinstance(lr, torch.Tensor) else torch.tensor(float(lr), device=device)
        g["foreach"], g["fused"] = False, True


def plain_groups(state: dict) -> dict:
    """An optimizer state_dict with plain learning rates and no fused/foreach choice, as any other run saves it:
    a checkpoint of a captured run resumes anywhere."""
    for g in state["param_groups"]:
        if isinstance(g.get("lr"), torch.Tensor):
            g["lr"] = float(g["lr"])
        g["foreach"], g["fused"] = None, None
    return state


def cuda_capture(body: Callable[[], tuple[torch.Tensor, torch.Tensor]]):
    """Record ``body`` as a CUDA graph without running it; returns (replay, outputs of the recording)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = body()
    return graph.replay, out


class GraphedStep:
    """``step(x, y)`` for full batches, at the learning rates ``optim.set_lr`` put into ``opt``: ``update(x, y)``
    (``loop.update_on_batch``: forward, loss, backward, optimizer step) as eager warm-up steps, then recorded
    once, then replayed. Returns the loss and logits (for a replay the graph's own output tensors, overwritten
    by the next step: read them before)."""

    def __init__(self, update: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                 opt: torch.optim.Optimizer, capture: Callable = cuda_capture):
        self.update, self.opt, self.capture = update, opt, capture
        self.warm = 0
        self.replay = None

    def _body(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.update(self.x, self.y)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.replay is None and self.warm == 0:  # here, not when made: a resumed run's optimizer is loaded in between
            use_device_lr(self.opt)
        if self.replay is None and self.warm < WARMUP_STEPS:  # eager, on a side stream where there is one
            self.warm += 1
            self.x, self.y = x, y
            if x.device.type != "cuda":
                return self._body()
            side = torch.cuda.Stream(x.device)
            side.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(side):
                out = self._body()
            torch.cuda.synchronize(x.device)  # its tensors were made on the side stream: done before anyone reuses them
            return out
        if self.replay is None:
            self.x, self.y = x.clone(), y.clone()  # the graph's fixed inputs, from now on overwritten in place
            try:
                self.replay, self.out = self.capture(self._body)
            except torch.OutOfMemoryError:
                raise  # not the recording's fault: api.train says what ran out and what to try
            except RuntimeError as e:  # an op that cannot be recorded: one line, and the way on
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise TrainingError(f"--compile capture could not record this training step as a CUDA graph ({first}); "
                                    f"train it with --compile graphs or --compile off (a run in progress resumes with "
                                    f"--resume and that flag)") from None
        else:
            self.x.copy_(x)
            self.y.copy_(y)
        self.replay()
        return self.out
