"""The whole training step captured as one CUDA graph (``--compile capture``): forward, loss, backward and
the SGD step recorded once and replayed for every full batch, with PyTorch's own kernels and no
``torch.compile`` (so no compilation time).

On an H100 a bn step issued ~440 kernels for 1.75 ms of kernel time against 9.6 ms of wall time
(docs/performance.md, 2026-11-28): the host's launches were the cost, which one replay removes. What a
replayed step needs, PyTorch's "whole-network capture" recipe: a few eager warm-up steps on a side stream
(cuDNN's algorithm search, the momentum buffers), then inputs and learning rates in fixed device tensors
that each step overwrites (SGD fused, reading its learning rate from the device), and autocast without its
weight-cast cache (SGDMuon's Muon step too). fp16, whose loss scaler reads the device at every step, is not captured.
"""
from __future__ import annotations

from typing import Callable

import torch

from normlab.errors import TrainingError

WARMUP_STEPS = 3  # eager steps before the capture, as in PyTorch's recipe


def capturable(precision: str) -> str | None:
    """Why a run in this precision cannot be captured (None if it can): every setting of Config can."""
    if precision == "fp16":
        return "fp16's loss scaler reads the device at every step"
    return None


def settle(place) -> tuple[object, str | None]:
    """The placement a run gets: ``place``, or, where ``--compile capture`` cannot capture its precision, the
    compiled network with CUDA graphs instead, and a line that says so."""
    why = capturable(place.precision) if place.capture else None
    if why is None:
        return place, None
    import dataclasses

    return (dataclasses.replace(place, capture=False, compile=True, graphs=True),
            f"--compile capture: not this run ({why}); the compiled network replayed as CUDA graphs instead")


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
            except RuntimeError as e:  # an op that cannot be recorded: one line, and the way on
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise TrainingError(f"--compile capture could not record this training step as a CUDA graph ({first}); "
                                    f"train it with --compile graphs (a run in progress resumes with --resume RUN --compile graphs)") from None
        else:
            self.x.copy_(x)
            self.y.copy_(y)
        self.replay()
        return self.out
