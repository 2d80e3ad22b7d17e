#!/usr/bin/env bash
# The GPU check: on a machine with a CUDA GPU, from the repository root, in one device call
# (run(command="bash benchmarks/gpu_check.sh", carry=[".gpu"], timeout_s=540), after benchmarks/gpu_prepare.sh
# here), then, on the still-warm machine, what the first call had no time for:
# run(command='GPU_CHECK_STEPS="j e b" bash benchmarks/gpu_check.sh', carry=[".gpu"], timeout_s=240) (the steps not reached).
# Its steps, in the order they run, so that what matters most comes back if the call is cut
# (GPU_CHECK_STEPS picks some, in this order; default "c d a j e b"):
#  (c) the wall time of a whole `normlab run` (3 models x 20 epochs, data loading, compilation and the
#      report included) on a full-size folder (the real subset repeated 5 times: real timings, meaningless
#      accuracy), the whole step captured as one CUDA graph (--compile capture: no compilation), one model
#      after another, then the 3 models at once on the one GPU (--jobs 3); each model's compile_seconds and
#      first and median epoch. Extra flags in GPU_CHECK_RUN_FLAGS,
#  (d) `normlab run` on the real 10,000/2,000 subset (bf16; GPU_CHECK_ACC_PRECISIONS), --compile capture and
#      the default, compared with the same run on a CPU (benchmarks/gpu_check_cpu_reference.json, made with
#      the command in its "command"), then what repeats: two pairs of 1-epoch runs, with and without
#      --deterministic,
#  (a) the test suite with its training tests on cuda (NORMLAB_TEST_DEVICE=cuda), eager,
#  (j) as (c), the default (the compiled network replayed as CUDA graphs: about 190 s one model after
#      another on 2026-11-28) with --jobs 3, cold compile cache,
#  (e) benchmarks/profile_step.py, one step: captured whole (--capture) for bn, ln and bn with Muon, compiled with CUDA
#      graphs (the default) for bn and ln, and bn through the cudagraphs backend (eager kernels, no code
#      generation), each with its first 5 steps' time (compilation included),
#  (b) benchmarks/speed.py for bn, gn, ln in fp16 and bf16: training and evaluation images/s, warm-up +
#      compile, GPU memory.
# The whole output goes to $OUT/gpu_check.log when $OUT is set (the device tool), with the run folders'
# small files; the GPU machine's own PyTorch is used and the package runs from src/. The same plumbing
# on a CPU, small:
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_EPOCHS=1 GPU_CHECK_REPEAT=1 GPU_CHECK_PRECISIONS=fp32 GPU_CHECK_ACC_PRECISIONS=fp32 bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -n "${OUT:-}" ] && [ -z "${GPU_CHECK_LOGGED:-}" ]; then  # on the device tool: the whole log comes back in $OUT
    GPU_CHECK_LOGGED=1 bash "$PWD/benchmarks/gpu_check.sh" "$@" 2>&1 | tee "$OUT/gpu_check.log"; exit "${PIPESTATUS[0]}"
fi
DEV=${GPU_CHECK_DEVICE:-cuda}
EPOCHS=${GPU_CHECK_EPOCHS:-20}
REPEAT=${GPU_CHECK_REPEAT:-5}             # 5 x 10,000 = the full 50,000-image shape
PRECISIONS=${GPU_CHECK_PRECISIONS:-"fp16 bf16"}        # (b), speed (bf16 bn and gn measured 2026-11-28)
ACC_PRECISIONS=${GPU_CHECK_ACC_PRECISIONS:-"bf16"}     # (d), accuracy: fp16 matched the CPU on 2026-11-27 (docs/performance.md)
STEPS=${GPU_CHECK_STEPS:-"c d a j e b"}
WORK=${GPU_CHECK_WORK:-/tmp/normlab_gpu_check}
SUB=.gpu/sub
mkdir -p "$WORK"
if ls .gpu/whl/*.whl >/dev/null 2>&1 && [ ! -d "$WORK/site" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" .gpu/whl/*.whl || exit 1
fi
export PYTHONPATH="$PWD/src:$WORK/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
NORMLAB="python3 -m normlab.cli"
step() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }
wants() { [[ " $STEPS " == *" $1 "* ]]; }

step "machine"
date -u
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
python3 -c "import torch, platform; print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda); \
print('device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none', torch.cuda.get_device_capability() if torch.cuda.is_available() else '')"
[ -d "$WORK/full" ] || python3 "$SUB/../cifar10_subset.py" "$SUB" "$WORK/full" --train 10000 --test 2000 --repeat "$REPEAT" >/dev/null

whole_run() {  # $1: name, then normlab run's extra flags; a cold compile cache of its own
    local name=$1; shift
    rm -rf "$WORK/$name" "$WORK/inductor_$name"
    local start=$(date +%s.%N)
    TORCHINDUCTOR_CACHE_DIR="$WORK/inductor_$name" timeout "${GPU_CHECK_RUN_S:-150}" $NORMLAB run --data-dir "$WORK/full" --device "$DEV" --epochs "$EPOCHS" --out "$WORK/$name" "$@" ${GPU_CHECK_RUN_FLAGS:-} 2>&1
    echo "wall seconds of normlab run $* (c): $(python3 -c "import time; print(round(time.time() - $start, 1))")"
    python3 - "$WORK/$name" <<'PY'
import csv, json, statistics, sys, pathlib
for p in sorted(pathlib.Path(sys.argv[1]).glob("*/results.json")):
    r = json.loads(p.read_text())
    secs = [float(row["seconds"]) for row in csv.DictReader(open(p.parent / "metrics.csv"))]
    print(p.parent.name, {k: r.get(k) for k in ("wall_seconds", "seconds_per_epoch", "compile_seconds", "precision", "channels_last", "compile", "cuda_graphs", "gpu_peak_mib", "device", "cuda_capability")},
          "epoch seconds: first", round(secs[0], 2), "median", round(statistics.median(secs), 2))
PY
}

if wants c; then
    step "(c) whole normlab run, 3 models x $EPOCHS epochs one after another, the whole step captured (--compile capture), full-size data ${GPU_CHECK_RUN_FLAGS:-}"
    whole_run run_capture --compile capture
    step "(c) whole normlab run, 3 models x $EPOCHS epochs at once on one GPU, captured (--compile capture --jobs 3), full-size data ${GPU_CHECK_RUN_FLAGS:-}"
    whole_run run_capture_jobs3 --compile capture --jobs 3
fi

if wants d; then
    step "(d) accuracy on the real subset: $DEV $ACC_PRECISIONS, --compile capture and the default (CUDA graphs), against the CPU reference"
    for prec in $ACC_PRECISIONS; do
        for how in capture auto; do
            rm -rf "$WORK/sub_${prec}_$how"
            timeout 120 $NORMLAB run --data-dir "$SUB" --device "$DEV" --precision "$prec" --compile "$how" --epochs "$EPOCHS" --out "$WORK/sub_${prec}_$how" --no-report 2>&1
        done
    done
    python3 benchmarks/compare_runs.py benchmarks/gpu_check_cpu_reference.json "$WORK"/sub_*
    step "(d) what repeats: two 1-epoch bn runs with --deterministic (eager), and two without, compared weight for weight"
    for mode in det det2 fast fast2; do
        flag=$([ "${mode#det}" != "$mode" ] && echo --deterministic)
        rm -rf "$WORK/rep_$mode"
        timeout 60 $NORMLAB train --data-dir "$SUB" --norm bn --epochs 1 --device "$DEV" --compile off $flag --out "$WORK/rep_$mode" >/dev/null 2>&1 || echo "rep_$mode failed"
    done
    python3 - "$WORK" <<'PY'
import sys, torch, pathlib
w = pathlib.Path(sys.argv[1])
for a, b in (("det", "det2"), ("fast", "fast2")):
    try:
        x, y = (torch.load(w / f"rep_{m}" / "model.pt", weights_only=True)["model"] for m in (a, b))
    except FileNotFoundError as e:
        print(a, "vs", b, "missing:", e); continue
    same = sum(torch.equal(x[k], y[k]) for k in x)
    print(f"{'--deterministic' if a == 'det' else 'default'}: {same} of {len(x)} tensors identical after 1 epoch")
PY
fi

if wants a && [ "$DEV" = cuda ]; then
    # The training tests on cuda, eager (torch.compile off: a compile per tiny test would take the whole
    # budget; (c) and (d) ran the compiled path), in parallel where pytest-xdist is installed. No -x.
    step "(a) test suite, training tests on cuda (eager)"
    XDIST=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")
    NORMLAB_TEST_DEVICE=cuda TORCH_COMPILE_DISABLE=1 timeout "${GPU_CHECK_TEST_S:-120}" python3 -m pytest -q $XDIST -p no:cacheprovider tests 2>&1 \
        | grep -vE "PytestBenchmarkWarning|warner\(|^\s*$" | tail -40
fi

if wants j; then
    step "(j) whole normlab run, 3 models x $EPOCHS epochs at once on one GPU (--jobs 3), the default compilation, cold start ${GPU_CHECK_RUN_FLAGS:-}"
    whole_run run_jobs3 --jobs 3
fi

if wants e; then
    step "(e) where a step's time goes on $DEV, batch 128: captured whole, CUDA graphs (the default), and the cudagraphs backend"
    timeout 60 python3 benchmarks/profile_step.py '{"norm": "bn"}' --device "$DEV" --capture --rows 8 2>&1
    timeout 60 python3 benchmarks/profile_step.py '{"norm": "ln"}' --device "$DEV" --capture --no-profile 2>&1
    timeout 60 python3 benchmarks/profile_step.py '{"norm": "bn", "muon_lr": 0.05}' --device "$DEV" --capture --no-profile 2>&1  # Muon captured (never yet on a GPU)
    timeout 90 python3 benchmarks/profile_step.py '{"norm": "bn"}' --device "$DEV" --compile --mode reduce-overhead --no-profile 2>&1 | grep -v "^W1\|^  "
    timeout 90 python3 benchmarks/profile_step.py '{"norm": "ln"}' --device "$DEV" --compile --mode reduce-overhead --no-profile 2>&1 | grep -v "^W1\|^  "
    timeout 90 python3 benchmarks/profile_step.py '{"norm": "bn"}' --device "$DEV" --compile --backend cudagraphs --rows 8 2>&1 | grep -v "^W1\|^  "
fi

if wants b; then
    step "(b) speed.py on $DEV, $PRECISIONS"
    for prec in $PRECISIONS; do
        timeout 100 python3 benchmarks/speed.py --data-dir "$WORK/full" --device "$DEV" --precision "$prec" --no-classic --batches 100 --warmup 10
    done
fi

if [ -n "${OUT:-}" ]; then  # the run folders' small files come back with the log (models stay there)
    tar -C "$WORK" -czf "$OUT/gpu_check_runs.tgz" --exclude='*.pt' --exclude=full --exclude='inductor*' --exclude=site . 2>/dev/null
fi
step "done"
