"""Where and how a run executes: device, threads, precision, memory layout. The only module that
touches ``torch.cuda``.

``Runtime`` says what the user asked for (``--device``, ``--threads``, ``--precision``); ``setup``
turns it, with what the hardware reports, into a ``Placement`` that the trainer, the evaluation and
the benchmarks all use. None of it changes what a model learns, so none of it is in ``Config``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import math
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from normlab.errors import ConfigError, NormlabError, TrainingError
from normlab.norms import get_norm

DEVICES = ("auto", "cpu", "cuda")  # and cuda:N for one GPU of several
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
COMPILE = ("auto", "on", "off", "graphs", "capture")  # graphs: compiled, and replayed as CUDA graphs (mode reduce-overhead);
# capture: the whole training step recorded as one CUDA graph, not compiled (capture.py); auto: graphs on CUDA where
# torch.compile can run there (card_plan), else off; off on a CPU


@dataclass(frozen=True)
class Runtime:
    """How to run, as asked: the same settings train the same model on any of these."""

    device: str = "auto"     # auto | cpu | cuda
    threads: int = 0         # CPU threads for torch (0 = all cores)
    precision: str = "auto"  # auto | bf16 | fp16 | fp32 (auto: what the hardware does natively)
    compile: str = "auto"    # auto | on | off | graphs: torch.compile the network (auto: graphs on CUDA; off on a CPU, where it is slower)
    deterministic: bool = False  # deterministic GPU algorithms (cuDNN's default backward ones are not)
    progress: bool = True    # a progress bar per epoch on a terminal

    def validate(self) -> "Runtime":
        if self.device not in DEVICES and not (self.device.startswith("cuda:") and self.device[5:].isdigit()):
            raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N (got {self.device!r})")
        if self.compile not in COMPILE:
            raise ConfigError(f"--compile must be auto, on, off, graphs or capture (got {self.compile!r})")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision must be one of: {', '.join(PRECISIONS)} (got {self.precision!r})")
        if self.threads < 0:
            raise ConfigError(f"--threads must be 0 (all cores) or more (got {self.threads})")
        return self

    def to_flags(self) -> list[str]:
        """The command-line flags that give this runtime from the defaults (the progress bar has none)."""
        base, out = Runtime(), []
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name != "progress" and v != getattr(base, f.name):
                out += [f"--{f.name}"] if isinstance(v, bool) else [f"--{f.name}", str(v)]
        return out


RUNTIME_OPTIONS = tuple(f.name for f in dataclasses.fields(Runtime))


def runtime_with(runtime: Runtime | None, keywords: dict[str, Any], others: tuple[str, ...] = ()) -> Runtime:
    """``runtime`` (default ``Runtime()``) with the runtime options among ``keywords`` applied, validated; threads given
    here are set. A name neither a runtime option nor one of ``others`` (the caller's: ``Config``'s settings) is a
    ``ConfigError`` that lists the valid ones."""
    unknown = [k for k in keywords if k not in others and k not in RUNTIME_OPTIONS]
    if unknown:
        close = difflib.get_close_matches(unknown[0], others + RUNTIME_OPTIONS, n=1)
        what = f"settings: {', '.join(others)}; runtime options" if others else "runtime options"
        raise ConfigError(f"unknown {'setting' if others else 'option'} {', '.join(map(repr, unknown))}"
                          f"{f' (did you mean {close[0]!r}?)' if close else ''}; {what}: {', '.join(RUNTIME_OPTIONS)}")
    runtime = dataclasses.replace(runtime if runtime is not None else Runtime(),
                                  **{k: v for k, v in keywords.items() if k in RUNTIME_OPTIONS}).validate()
    if "threads" in keywords:
        set_threads(runtime.threads)
    return runtime


def worker_runtimes(runtime: Runtime, n: int, cpus: float, spread_gpus: bool = True) -> list[Runtime]:
    """The runtimes of ``n`` worker processes (models trained at once) given ``cpus`` CPUs each: the threads asked for,
    else that share (at least 1); no progress bars (several garble one terminal); with ``spread_gpus``, on a machine
    with GPUs, the visible GPUs one after another (``worker_devices``). The local and the Ray executor both ask this."""
    worker = dataclasses.replace(runtime, threads=runtime.threads or max(1, math.ceil(cpus)), progress=False)
    devices = worker_devices(runtime, n) if spread_gpus else [runtime.device] * n
    return [dataclasses.replace(worker, device=d) for d in devices]


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_allocator_tuned = False


def tune_host_allocator() -> bool:
    """Keep freed activation buffers in the process instead of handing them back to the system.

    glibc serves large allocations (the activations of a batch, tens of MB) with fresh mmaps and
    unmaps them when freed, so every batch faults its buffers in again: an fp32 evaluation of the
    10,000 test images took 6.8 M minor page faults and more system than user time. Raising the
    mmap threshold (32 MiB) and the trim threshold (4 GiB), with a 512 MiB top pad, lets the heap
    reuse them (docs/performance.md has the before and after). The same as setting
    MALLOC_MMAP_THRESHOLD_ etc. in the environment, done from inside the process; a no-op where
    the C library is not glibc. Returns whether it applied.
    """
    global _allocator_tuned
    if _allocator_tuned:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        ok = all(libc.mallopt(param, value) == 1 for param, value in
                 ((_M_MMAP_THRESHOLD, 32 * 2**20), (_M_TRIM_THRESHOLD, 4 * 2**30), (_M_TOP_PAD, 512 * 2**20)))
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    _allocator_tuned = ok
    return ok


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
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TrainingError(f"--device {name} was asked for but no CUDA GPU is visible; use --device cpu or auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise TrainingError(f"--device {name}: only {torch.cuda.device_count()} CUDA GPU(s) are visible (cuda:0 ...)")
    return device


def worker_devices(runtime: Runtime, n_jobs: int) -> list[str]:
    """The device of each of ``n_jobs`` worker processes: the visible GPUs one after another (several jobs may
    share one), or the asked device unchanged where there is no GPU or one was named."""
    if runtime.device not in ("auto", "cuda") or not torch.cuda.is_available():
        return [runtime.device] * n_jobs
    count = torch.cuda.device_count()
    return [f"cuda:{k % count}" for k in range(n_jobs)]


@dataclass(frozen=True)
class CardPlan:
    """What one CUDA card gets: the precision ``--precision auto`` picks, and whether torch.compile can run there
    (``why_not`` says why not: then ``--compile auto`` is off, and ``on``/``graphs`` are refused up front)."""

    precision: str
    why_not: str | None = None

    @property
    def compile(self) -> bool:
        return self.why_not is None


def card_plan(capability: tuple[int, int], triton: bool) -> CardPlan:
    """The one table of what a CUDA card gets, from its compute capability and whether Triton is importable:

    - >= 8.0 (A100, H100, RTX 30xx/40xx, L4): bf16, compiled;
    - 7.x (V100, T4, RTX 20xx): fp16 with loss scaling (bf16 is emulated there), compiled;
    - < 7.0 (P100, GTX 10xx): fp32 (their fp16 runs at 1/64 rate on the consumer cards) and no torch.compile,
      whose Triton code generator needs 7.0;
    - no Triton (Windows, some images): no torch.compile; ``--compile capture`` (no compilation) or eager.
    """
    precision = "bf16" if capability >= (8, 0) else "fp16" if capability >= (7, 0) else "fp32"
    if capability < (7, 0):
        return CardPlan(precision, f"this GPU's capability {capability[0]}.{capability[1]} is below the 7.0 that torch.compile's Triton needs")
    if not triton:
        return CardPlan(precision, "Triton, which torch.compile needs on a GPU, cannot be imported here")
    return CardPlan(precision)


@functools.lru_cache(maxsize=1)
def has_triton() -> bool:
    """Whether Triton (torch.compile's GPU code generator) can be imported."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def native_precision(device_type: str, cuda_capability: tuple[int, int] | None = None, cpu_bf16: bool = False) -> str:
    """The precision a device runs fast: on CUDA ``card_plan``'s (bf16 from capability 8.0, fp16 on 7.x, fp32
    below; fp16 where the capability is unknown), bf16 on CPUs with AVX512-BF16 or AMX, fp32 on other CPUs."""
    if device_type == "cuda":
        return card_plan(cuda_capability, True).precision if cuda_capability is not None else "fp16"
    return "bf16" if cpu_bf16 else "fp32"


def pick_precision(device: torch.device, asked: str = "auto") -> str:
    if asked != "auto":
        return asked
    if device.type == "cuda":
        return native_precision("cuda", torch.cuda.get_device_capability(device))
    return native_precision(device.type, cpu_bf16=cpu_has_bf16())


def use_channels_last(norm: str, device: torch.device) -> bool:
    spec = get_norm(norm)
    return spec.cuda_channels_last if device.type == "cuda" else spec.cpu_channels_last


@dataclass(frozen=True)
class Placement:
    """A resolved runtime: the device, its precision and the memory layout of one norm's maps."""

    device: torch.device
    precision: str       # bf16 | fp16 | fp32
    channels_last: bool
    compile: bool = False
    graphs: bool = False  # the compiled network replayed as CUDA graphs (torch.compile mode reduce-overhead; CUDA only)
    capture: bool = False  # the whole training step recorded as one CUDA graph and replayed (capture.py; CUDA only)

    def autocast(self):
        """Mixed precision for the forward pass (a no-op in fp32)."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if self.precision == "bf16" else torch.float16,
                              cache_enabled=not self.capture)  # a captured graph keeps no cast weights between steps

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Loss scaling for fp16 (its gradients underflow without it); disabled, a no-op, otherwise. A captured step
        gets the scaler that never reads the device (capture.DeviceScaler)."""
        if self.capture and self.precision == "fp16":
            from normlab.capture import DeviceScaler

            return DeviceScaler(self.device.type)
        return torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    def place(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model on the device, its weights in the memory layout that the inputs will have."""
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def compiled(self, model: torch.nn.Module):
        """The callable that runs ``model``: ``torch.compile``d (fewer kernel launches) or the model itself.

        The model keeps its own state_dict keys either way; the compiled wrapper only runs it."""
        if not self.compile:
            return model
        return torch.compile(model, dynamic=False, mode="reduce-overhead" if self.graphs else None)

    def reset_peak_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def record(self) -> dict:
        """What results.json says of the device: name, precision, layout, and on CUDA its capability and peak memory."""
        out = {"device": device_name(self.device), "precision": self.precision, "channels_last": self.channels_last,
               "compile": self.compile, **({"cuda_graphs": True} if self.graphs else {}),
               **({"captured_step": True} if self.capture else {})}
        if self.device.type == "cuda":
            out["cuda_capability"] = ".".join(map(str, torch.cuda.get_device_capability(self.device)))
            out["gpu_peak_mib"] = torch.cuda.max_memory_allocated(self.device) / 2**20
            out["deterministic"] = torch.backends.cudnn.deterministic
        else:
            out["threads"] = torch.get_num_threads()
        return out

    def synchronize(self) -> None:
        """Wait for the device's queued work (for honest timings)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @property
    def layout(self) -> str:
        return "channels_last" if self.channels_last else "NCHW"


def setup(runtime: Runtime, norm: str) -> Placement:
    """The placement of one model of ``norm`` under ``runtime`` (and the process settings it needs)."""
    tune_host_allocator()
    device = pick_device(runtime.device)
    if device.type == "cuda":
        if device.index is None:  # plain "cuda": the current GPU, named (set_device refuses an unindexed device before torch 2.14)
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
        # Deterministic convolution algorithms (slower); without it cuDNN's backward picks may vary run to run.
        torch.backends.cudnn.deterministic = runtime.deterministic
        torch.backends.cudnn.benchmark = not runtime.deterministic
        if runtime.deterministic:  # and deterministic kernels elsewhere where PyTorch has them (a warning where not)
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
    compile, graphs = use_compile(runtime.compile, device.type), use_graphs(runtime.compile, device.type)
    if device.type == "cuda":
        plan = card_plan(torch.cuda.get_device_capability(device), has_triton())
        if compile and not plan.compile:
            if runtime.compile != "auto":
                raise ConfigError(f"--compile {runtime.compile} cannot run on {device}: {plan.why_not}; "
                                  "use --compile off (eager) or --compile capture (one CUDA graph, no compilation)")
            compile = graphs = False  # auto: eager
    return Placement(device, pick_precision(device, runtime.precision), use_channels_last(norm, device), compile, graphs,
                     runtime.compile == "capture" and device.type == "cuda")


def use_compile(asked: str, device_type: str) -> bool:
    """torch.compile where it pays: on CUDA, where a step is launch-bound (~450 small kernels); not on a
    CPU, where it measured slower (docs/performance.md). On CUDA only where ``card_plan`` says it can run."""
    return asked in ("on", "graphs") or (asked == "auto" and device_type == "cuda")


def use_graphs(asked: str, device_type: str) -> bool:
    """The compiled network replayed as CUDA graphs: on CUDA unless ``--compile on`` asks for plain compile.
    On an H100 (bf16, bn, batch 128) a step took 3.0 ms against 7.2 ms compiled and 9.6 ms eager, whose
    kernels ran 1.1-1.8 ms of it: the host's launches were the cost (docs/performance.md, 2026-11-28)."""
    return device_type == "cuda" and asked in ("auto", "graphs")


def _first_line(e: BaseException, limit: int = 200) -> str:
    line = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _in_compiler(e: BaseException) -> bool:
    """Raised by torch.compile (dynamo, inductor, Triton) rather than by the network it compiled."""
    import traceback

    try:
        from torch._dynamo.exc import TorchDynamoException
    except ImportError:  # pragma: no cover - a torch without dynamo compiles nothing
        return False
    if isinstance(e, TorchDynamoException):
        return True
    frames = traceback.extract_tb(e.__traceback__)
    return any(f"torch{os.sep}_inductor{os.sep}" in f.filename or f"{os.sep}triton{os.sep}" in f.filename for f in frames)


def failure(e: BaseException, kept: str) -> NormlabError | None:
    """The one line for a failure of the machinery rather than of the run's settings (None for any other): the GPU
    out of memory, or torch.compile failing. ``kept`` says what is kept of the run and how it continues."""
    if isinstance(e, torch.OutOfMemoryError):
        import re

        text = str(e)
        gpu = re.search(r"GPU (\d+)", text)
        asked = re.search(r"Tried to allocate ([\d.]+ [KMGT]?i?B)", text)
        where = f"GPU {gpu[1]}'s memory (cuda:{gpu[1]})" if gpu else "GPU memory" if "CUDA" in text else "memory"
        return TrainingError(f"{where} ran out{f' allocating {asked[1]}' if asked else ''}; {kept}. Try --jobs 1 "
                             "(one model on the GPU at a time) or another --precision (bf16 or fp16 halve the activations), "
                             "and close other programs on that GPU")
    if isinstance(e, Exception) and not isinstance(e, NormlabError) and _in_compiler(e):
        cause = getattr(e, "inner_exception", None) or e  # a backend's failure: its own message, not dynamo's wrapper
        return TrainingError(f"torch.compile failed ({_first_line(cause)}); {kept}. Train with --compile off (eager) "
                             "or --compile capture (one CUDA graph, no compilation), which avoid it")
    return None


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
