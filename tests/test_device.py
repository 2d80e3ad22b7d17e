"""Device, precision, layout and the records of a run: chosen in one place from what the hardware
reports; a run resumes under the runtime it is given, on the data it started on."""
from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import torch

from conftest import DEVICE, EXACT, make_cifar
from normlab import device as dev
from normlab.cli import build_parser, main, runtime_from
from normlab.device import Placement, Runtime, native_precision, use_compile, worker_devices
from normlab.norms import NORMS
from normlab.rundir import CHECKPOINT, DATA, RESULTS

TRAIN = ["--epochs", "2", "--batch-size", "50", "--threads", "1", "--device", DEVICE, *EXACT]


@pytest.mark.parametrize("device_type, capability, cpu_bf16, expected", [
    ("cuda", (9, 0), False, "bf16"),   # H100
    ("cuda", (8, 0), False, "bf16"),   # A100
    ("cuda", (7, 5), False, "fp16"),   # T4: bf16 only by emulation there
    ("cuda", (6, 0), False, "fp32"),   # P100 (card_plan: fp32 below 7.0)
    ("cpu", None, True, "bf16"),       # AVX512-BF16 or AMX
    ("cpu", None, False, "fp32"),      # most laptops
])
def test_native_precision(device_type, capability, cpu_bf16, expected):
    assert native_precision(device_type, capability, cpu_bf16) == expected


@pytest.mark.parametrize("capability, triton, precision, compiles", [
    ((9, 0), True, "bf16", True),    # H100
    ((8, 0), True, "bf16", True),    # A100
    ((8, 6), False, "bf16", False),  # an RTX 30xx under Windows: no Triton
    ((7, 5), True, "fp16", True),    # T4
    ((7, 0), True, "fp16", True),    # V100
    ((6, 1), True, "fp32", False),   # GTX 10xx: fp16 at 1/64 rate, too old for Triton
    ((6, 0), True, "fp32", False),   # P100
])
def test_one_table_decides_precision_and_compilation_per_card(capability, triton, precision, compiles):
    plan = dev.card_plan(capability, triton)
    assert (plan.precision, plan.compile) == (precision, compiles)
    assert (plan.why_not is None) == compiles
    assert plan.why_not is None or ("Triton" in plan.why_not and (f"{capability[0]}.{capability[1]}" in plan.why_not or not triton))


def fake_cuda(monkeypatch, capability, triton):
    """setup() on a CUDA card of this capability, with or without Triton: what it reports, faked."""
    monkeypatch.setattr(dev.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(dev.torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(dev.torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(dev.torch.cuda, "get_device_capability", lambda d=None: capability)
    monkeypatch.setattr(dev.torch.cuda, "set_device", lambda d: None)
    monkeypatch.setattr(dev.torch.backends.cudnn, "benchmark", False)
    monkeypatch.setattr(dev.torch.backends.cudnn, "deterministic", False)
    monkeypatch.setattr(dev, "has_triton", lambda: triton)


@pytest.mark.parametrize("capability, triton, precision, compiled", [
    ((9, 0), True, "bf16", True), ((7, 5), True, "fp16", True), ((6, 0), True, "fp32", False), ((9, 0), False, "bf16", False)])
def test_setup_follows_the_card_table(monkeypatch, capability, triton, precision, compiled):
    """--precision auto and --compile auto per card; where torch.compile cannot run, auto is eager, capture still
    records (it compiles nothing), and an explicit --compile on or graphs is one line that names the flags that work."""
    fake_cuda(monkeypatch, capability, triton)
    place = dev.setup(Runtime("cuda"), "bn")
    assert (place.precision, place.compile, place.graphs, place.capture) == (precision, compiled, compiled, False)
    captured = dev.setup(Runtime("cuda", compile="capture"), "bn")
    assert captured.capture and not captured.compile
    assert dev.setup(Runtime("cuda", precision="fp16"), "bn").precision == "fp16"  # asked: kept
    for asked in ("on", "graphs"):
        if compiled:
            assert dev.setup(Runtime("cuda", compile=asked), "bn").compile
        else:
            with pytest.raises(dev.ConfigError, match=rf"--compile {asked} cannot run on cuda:0: .*; use --compile off \(eager\) "
                                                      r"or --compile capture"):
                dev.setup(Runtime("cuda", compile=asked), "bn")


def test_cpu_bf16_is_read_from_the_flags():
    assert dev.cpu_has_bf16("flags : fpu avx512f avx512_bf16 avx512_vnni")
    assert dev.cpu_has_bf16("flags : fpu amx_bf16 amx_tile")
    assert not dev.cpu_has_bf16("flags : fpu avx2 avx512f avx512_vnni")


def test_asked_precision_wins_and_auto_follows_the_cpu(monkeypatch):
    cpu = torch.device("cpu")
    assert dev.pick_precision(cpu, "fp16") == "fp16"
    monkeypatch.setattr(dev, "cpu_has_bf16", lambda: False)
    assert dev.pick_precision(cpu, "auto") == "fp32"
    monkeypatch.setattr(dev, "cpu_has_bf16", lambda: True)
    assert dev.pick_precision(cpu, "auto") == "bf16"


def test_layout_per_norm_and_device():
    for name, spec in NORMS.items():
        assert dev.use_channels_last(name, torch.device("cpu")) == spec.cpu_channels_last
        assert dev.use_channels_last(name, torch.device("cuda")) == spec.cuda_channels_last
    assert dev.use_channels_last("gn", torch.device("cuda")) is False  # CUDA group norm works on NCHW


def test_compile_only_where_it_pays():
    assert use_compile("auto", "cuda") and not use_compile("auto", "cpu")
    assert use_compile("on", "cpu") and not use_compile("off", "cuda")
    assert use_compile("graphs", "cpu") and use_compile("graphs", "cuda")
    cpu = dev.setup(Runtime("cpu", compile="graphs"), "bn")
    assert cpu.compile and not cpu.graphs and "cuda_graphs" not in cpu.record()  # CUDA graphs on CUDA only: plain compile here
    model = torch.nn.Linear(2, 2)
    assert Placement(torch.device("cpu"), "fp32", False, compile=False).compiled(model) is model


def test_jobs_spread_over_the_visible_gpus(monkeypatch):
    assert worker_devices(Runtime(device="cpu"), 3) == ["cpu"] * 3
    monkeypatch.setattr(dev.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(dev.torch.cuda, "device_count", lambda: 2)
    assert worker_devices(Runtime(), 5) == ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"]
    assert worker_devices(Runtime(device="cuda:1"), 2) == ["cuda:1", "cuda:1"]  # one named GPU: all share it


def test_runtime_flags_and_errors(capsys):
    args = build_parser().parse_args(["train", "--precision", "fp16", "--compile", "off", "--deterministic", "--device", "cuda:1"])
    assert runtime_from(args) == Runtime(device="cuda:1", precision="fp16", compile="off", deterministic=True)
    assert main(["train", "--device", "tpu"]) == 2
    assert "--device must be auto, cpu, cuda or cuda:N" in capsys.readouterr().err


def test_gradient_scaler_only_for_fp16():
    cpu = torch.device("cpu")
    assert Placement(cpu, "fp16", False).grad_scaler().is_enabled()
    assert not Placement(cpu, "bf16", False).grad_scaler().is_enabled()
    assert not Placement(cpu, "fp32", False).grad_scaler().is_enabled()


def test_host_allocator_is_tuned_on_linux():
    import sys

    assert dev.tune_host_allocator() == sys.platform.startswith("linux")


# ---------------------------------------------------------------- whole runs
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_trains_on_a_cpu(data_dir, tmp_path, precision):
    """The T4's path (fp16 autocast with a gradient scaler) and the bf16 path run end to end on a CPU."""
    out = tmp_path / precision
    assert main(["train", "--data-dir", str(data_dir), *TRAIN, "--precision", precision, "--out", str(out)]) == 0
    results = json.loads((out / RESULTS).read_text())
    assert results["precision"] == precision
    assert (results["threads"] == 1 and "gpu_peak_mib" not in results) if DEVICE == "cpu" else results["gpu_peak_mib"] > 0
    ck = torch.load(out / CHECKPOINT, weights_only=True)
    assert ("scaler" in ck) == (precision == "fp16")
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


def test_resume_takes_the_runtime_of_the_command_line(data_dir, tmp_path, capsys):
    from test_cli import ctrl_c_in
    from normlab import loop as T

    out = tmp_path / "run"
    real = T.train_epoch
    T.train_epoch = ctrl_c_in("bn epoch 2/")
    try:
        assert main(["train", "--data-dir", str(data_dir), *TRAIN, "--precision", "fp32", "--out", str(out)]) == 130
    finally:
        T.train_epoch = real
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--threads", "1", "--precision", "bf16"]) == 0
    assert json.loads((out / RESULTS).read_text())["precision"] == "bf16"


def _cut_after_epoch_1(data_dir: Path, out: Path, capsys) -> list[str]:
    from test_cli import ctrl_c_in
    from normlab import loop as T

    real = T.train_epoch
    T.train_epoch = ctrl_c_in("bn epoch 2/")
    try:
        assert main(["train", "--data-dir", str(data_dir), *TRAIN, "--out", str(out)]) == 130
    finally:
        T.train_epoch = real
    return shlex.split(capsys.readouterr().err.split("Resume with: ", 1)[1])


def test_resume_finds_its_own_data_not_normlab_data(data_dir, tmp_path, monkeypatch, capsys):
    """Killed in epoch 2 and resumed without --data-dir while NORMLAB_DATA points elsewhere: the run
    finishes on the data it started on, exactly as if never stopped."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main(["train", "--data-dir", str(data_dir), *TRAIN, "--out", str(whole)]) == 0
    _cut_after_epoch_1(data_dir, cut, capsys)
    assert json.loads((cut / DATA).read_text())["data_dir"] == str(data_dir.resolve())
    monkeypatch.setenv("NORMLAB_DATA", str(make_cifar(tmp_path / "other", per_batch=60, seed=1)))
    assert main(["train", "--resume", str(cut), "--threads", "1"]) == 0
    assert (cut / "predictions.csv").read_text() == (whole / "predictions.csv").read_text()
    assert torch.equal(torch.load(cut / "model.pt", weights_only=True)["model"]["C1.0.weight"],
                       torch.load(whole / "model.pt", weights_only=True)["model"]["C1.0.weight"])


def test_resume_refuses_other_data(data_dir, tmp_path, capsys):
    cut = tmp_path / "cut"
    _cut_after_epoch_1(data_dir, cut, capsys)
    other = make_cifar(tmp_path / "other", per_batch=40, seed=7)  # same size, other images and labels
    assert main(["train", "--resume", str(cut), "--threads", "1", "--data-dir", str(other)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds other training data" in err and f"--data-dir {data_dir.resolve()}" in err
    assert torch.load(cut / CHECKPOINT, weights_only=True)["epoch"] == 1  # nothing touched


def test_plain_cuda_is_set_as_the_current_gpu_with_its_index(monkeypatch):
    """torch.cuda.set_device refuses an unindexed "cuda" before torch 2.14 (seen on torch 2.11 on an
    H100: every command with --device cuda or auto failed); setup names the current GPU instead."""
    calls = []
    monkeypatch.setattr(dev.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(dev.torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(dev.torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(dev.torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    monkeypatch.setattr(dev.torch.cuda, "set_device", lambda d: calls.append(torch.device(d)))
    monkeypatch.setattr(dev.torch.backends.cudnn, "benchmark", False)
    monkeypatch.setattr(dev.torch.backends.cudnn, "deterministic", False)
    for asked in ("cuda", "auto"):
        place = dev.setup(dev.Runtime(asked), "bn")
        assert calls[-1] == torch.device("cuda", 1) and calls[-1].index == 1 and place.device == torch.device("cuda", 1)
    dev.setup(dev.Runtime("cuda:0"), "bn")
    assert calls[-1] == torch.device("cuda", 0)
    assert dev.setup(dev.Runtime("cuda", compile="graphs"), "bn").graphs and dev.setup(dev.Runtime("cuda"), "bn").graphs
    assert not dev.setup(dev.Runtime("cuda", compile="on"), "bn").graphs and not dev.setup(dev.Runtime("cuda", compile="off"), "bn").compile


# ---------------------------------------------------------------- failures of the machinery, one line each
def fail_in_epoch(epoch: int, error: BaseException):
    """A train_epoch that raises ``error`` at the start of training epoch ``epoch`` (after the earlier ones' checkpoints)."""
    from normlab import loop as T

    real = T.train_epoch

    def train_epoch(*args, desc="", **kwargs):
        if f"epoch {epoch}/" in desc:
            raise error
        return real(*args, desc=desc, **kwargs)

    return train_epoch


OOM = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 14.74 GiB of which 1.06 GiB is free. "
       "Of the allocated memory 12.1 GiB is allocated by PyTorch ...\nSee documentation for Memory Management")


def test_out_of_memory_is_one_line_and_resume_finishes(data_dir, tmp_path, monkeypatch, capsys):
    """CUDA running out of memory in epoch 2: one line (what ran out, where, what to try), exit 2, epoch 1 kept; --resume
    then ends as the run would have."""
    from normlab import loop as T

    out = tmp_path / "run"
    monkeypatch.setattr(T, "train_epoch", fail_in_epoch(2, torch.OutOfMemoryError(OOM)))
    assert main(["train", "--data-dir", str(data_dir), *TRAIN, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "GPU 0's memory (cuda:0) ran out allocating 2.00 GiB" in err and "--jobs 1" in err and "--precision" in err
    assert f"the finished epochs are kept in {out} and --resume continues" in err
    assert torch.load(out / CHECKPOINT, weights_only=True)["epoch"] == 1
    monkeypatch.undo()
    assert main(["train", "--resume", str(out), "--threads", "1"]) == 0
    assert json.loads((out / RESULTS).read_text())["epochs"] == 2


def test_out_of_memory_in_the_first_epoch_keeps_nothing_and_says_so(data_dir, tmp_path, monkeypatch, capsys):
    from normlab import loop as T

    monkeypatch.setattr(T, "train_epoch", fail_in_epoch(1, torch.OutOfMemoryError("CUDA out of memory.")))
    assert main(["train", "--data-dir", str(data_dir), *TRAIN, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "GPU memory ran out; nothing was kept. Try --jobs 1" in err
    assert not (tmp_path / "run" / CHECKPOINT).exists()


def test_a_failure_inside_torch_compile_is_one_line_that_names_the_flag_avoiding_it(data_dir, tmp_path, monkeypatch, capsys):
    """torch.compile raising at the first step (here a backend that fails as inductor does without Triton): one line
    naming --compile off, no traceback; the run resumes with that flag."""
    def no_triton(gm, example_inputs):
        raise RuntimeError("Cannot find a working triton installation. Either the package is not installed or it is too old.")

    out = tmp_path / "run"
    monkeypatch.setattr(Placement, "compiled", lambda self, model: torch.compile(model, backend=no_triton) if self.compile else model)
    assert main(["train", "--data-dir", str(data_dir), *TRAIN, "--compile", "on", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "torch.compile failed (" in err and "Cannot find a working triton installation" in err
    assert "nothing was kept. Train with --compile off (eager) or --compile capture" in err
    assert main(["train", "--data-dir", str(data_dir), *TRAIN, "--compile", "off", "--out", str(out)]) == 0


def test_other_errors_are_not_taken_for_the_machinerys():
    assert dev.failure(ValueError("bad"), "kept") is None
    assert dev.failure(RuntimeError("a plain runtime error"), "kept") is None
    assert dev.failure(KeyboardInterrupt(), "kept") is None
