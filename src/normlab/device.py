"""Where and how a run executes: device, threads, precision, memory layout. The only module that
touches ``torch.cuda``.

``Runtime`` says what the user asked for (``--device``, ``--threads``, ``--precision``); ``setup``
turns it, with what the hardware reports, into a ``Placement`` that the trainer, the evaluation and
the benchmarks all use. None of it changes what a model learns, so none of it is in ``Config``.
"""
from __future__ import annotations

import contextlib
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from normlab.errors import ConfigError, TrainingError
from normlab.norms import get_norm

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")


@dataclass(frozen=True)
class Runtime:
    """How to run, as asked: the same settings train the same model on any of these."""

    device: str = "auto"     # auto | cpu | cuda
    threads: int = 0         # CPU threads for torch (0 = all cores)
    precision: str = "auto"  # auto | bf16 | fp16 | fp32 (auto: what the hardware does natively)
    progress: bool = True    # a progress bar per epoch on a terminal

    def validate(self) -> "Runtime":
        if self.device not in DEVICES:
            raise ConfigError(f"--device must be auto, cpu or cuda (got {self.device!r})")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision must be one of: {', '.join(PRECISIONS)} (got {self.precision!r})")
        if self.threads < 0:
            raise ConfigError(f"--threads must be 0 (all cores) or more (got {self.threads})")
        return self


def set_threads(n: int) -> None:
    # Before any work: the thread pool is fixed at the first parallel op.
    torch.set_num_threads(n or os.cpu_count() or 1)


def cpu_has_bf16(cpuinfo: str | None = None) -> bool:
    """True on CPUs with native bf16 matrix units (AVX512-BF16 or AMX), where autocast pays."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    return "avx512_bf16" in cpuinfo or "amx_bf16" in cpuinfo


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def native_precision(device_type: str, cuda_capability: tuple[int, int] | None = None, cpu_bf16: bool = False) -> str:
    """The precision a device runs fast: bf16 where it is native (CUDA capability >= 8.0, i.e. Ampere
    and later; CPUs with AVX512-BF16 or AMX), fp16 on older GPUs (a T4: ``is_bf16_supported`` says yes
    there only by emulation, and bf16 convolutions fall back to a slow path), fp32 on other CPUs."""
    if device_type == "cuda":
        return "bf16" if cuda_capability is not None and cuda_capability >= (8, 0) else "fp16"
    return "bf16" if cpu_bf16 else "fp32"


def pick_precision(device: torch.device, asked: str = "auto") -> str:
    if asked != "auto":
        return asked
    if device.type == "cuda":
        return native_precision("cuda", torch.cuda.get_device_capability(device))
    return native_precision(device.type, cpu_bf16=cpu_has_bf16())


def use_channels_last(norm: str, device: torch.device) -> bool:
    return True if device.type == "cuda" else get_norm(norm).cpu_channels_last


@dataclass(frozen=True)
class Placement:
    """A resolved runtime: the device, its precision and the memory layout of one norm's maps."""

    device: torch.device
    precision: str       # bf16 | fp16 | fp32
    channels_last: bool

    def autocast(self):
        """Mixed precision for the forward pass (a no-op in fp32)."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if self.precision == "bf16" else torch.float16)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Loss scaling for fp16 (its gradients underflow without it); disabled, a no-op, otherwise."""
        return torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    def place(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model on the device, its weights in the memory layout that the inputs will have."""
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def synchronize(self) -> None:
        """Wait for the device's queued work (for honest timings)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @property
    def layout(self) -> str:
        return "channels_last" if self.channels_last else "NCHW"


def setup(runtime: Runtime, norm: str) -> Placement:
    """The placement of one model of ``norm`` under ``runtime``."""
    device = pick_device(runtime.device)
    return Placement(device, pick_precision(device, runtime.precision), use_channels_last(norm, device))


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
