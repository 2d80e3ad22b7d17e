#!/usr/bin/env bash
# The GPU check, in one device call of at most 540 s on an H100 or H200, its own start-up included:
#   here, once:  bash benchmarks/gpu_prepare.sh            (fills .gpu/, git-ignored, < 64 MiB)
#   device tool: run(command="bash benchmarks/gpu_check.sh", carry=[".gpu"], timeout_s=560)
# The headline comes first, one line per step, `step=NAME seconds=S verdict=V ...`, then a line per model:
#  (a) a_default   the plain `normlab run` (the defaults: bn, gn, ln x 20 epochs, --compile auto) on a full-size
#                  folder (the real subset written 5 times: real timings, meaningless accuracy), cold compile cache:
#                  wall time; per model the compile seconds (the first step), the first and the median epoch;
#                  verdict ok (finished within the required 60 s), slow (finished later), cut, failed;
#  (b) b_capture   the same with --compile capture (the whole step one CUDA graph, no compilation);
#      b_jobs3     the same with --jobs 3 (the 3 models at once on the one GPU), cold compile cache;
#  (c) c_default, c_capture   accuracy on the real 10,000/2,000 subset (`normlab run`, 20 epochs) against
#                  benchmarks/gpu_check_cpu_reference.json (the same command on a CPU, the defaults): verdict
#                  match when every norm is within 2 points (one seed each side: about a point is seed noise),
#                  stale_reference when the reference was trained with other settings (it must be made again);
#  (d) d_profile_* benchmarks/profile_step.py (ops and ms per step) captured and compiled, if time is left.
# Each step has its own timeout (they add up to 515 s, and 20 s for the start-up) and none starts past the budget
# (GPU_CHECK_BUDGET_S, default 535 s from the script's start): a step that is cut leaves the lines before it.
# The whole output goes to $OUT/gpu_check.log when $OUT is set (the device tool), the logs and the run folders'
# small files to $OUT/gpu_check_runs.tgz; the GPU machine's own PyTorch is used and the package runs from src/.
# Small mode, on this machine's CPU on tiny data (the same steps and lines; 1 epoch of 500 images, the
# profiles not compiled, every timeout and the budget doubled):
#   GPU_CHECK_SMALL=1 bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -n "${OUT:-}" ] && [ -z "${GPU_CHECK_LOGGED:-}" ]; then  # on the device tool: the whole log comes back in $OUT
    GPU_CHECK_LOGGED=1 bash "$PWD/benchmarks/gpu_check.sh" "$@" 2>&1 | tee "$OUT/gpu_check.log"; exit "${PIPESTATUS[0]}"
fi
START=$(date +%s.%N)
WORK=${GPU_CHECK_WORK:-/tmp/normlab_gpu_check}
SUB=${GPU_CHECK_SUB:-.gpu/sub}             # the real 10,000/2,000 subset (gpu_prepare.sh)
TOOL=.gpu/cifar10_subset.py
if [ -n "${GPU_CHECK_SMALL:-}" ]; then     # the plumbing on a CPU, small
    DEV=cpu EPOCHS=1 THREADS=${GPU_CHECK_THREADS:-0} ACC_EPOCHS=1 PROFILE_FLAGS="--steps 3 --repeats 1 --batch-size 32" COMPILED="" SCALE=2
    [ -d "$SUB" ] || SUB=${SHARED:-../shared}/cifar10
    [ -f "$TOOL" ] || TOOL=${SHARED:-../shared}/tools/cifar10_subset.py
    WORK=${GPU_CHECK_WORK:-/tmp/normlab_gpu_check_small}
else
    DEV=cuda EPOCHS=20 THREADS=${GPU_CHECK_THREADS:-0} ACC_EPOCHS=20 PROFILE_FLAGS="" COMPILED="--compile --mode reduce-overhead" SCALE=1
fi
BUDGET=${GPU_CHECK_BUDGET_S:-$((535 * SCALE))}
rm -rf "$WORK" && mkdir -p "$WORK/logs"
export PYTHONPATH="$PWD/src:$WORK/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
NORMLAB="python3 -m normlab.cli"

since() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }

# timed NAME LIMIT CMD...: runs CMD (output to $WORK/logs/NAME.log) under min(LIMIT, what the budget has left);
# sets RC (124: cut by its timeout; 125: not started, no time left) and SECONDS_TAKEN.
timed() {
    local name=$1 limit=$(($2 * SCALE)); shift 2
    local left; left=$(awk -v b="$BUDGET" -v e="$(since "$START")" 'BEGIN { printf "%d", b - e - 3 }')
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 10 ]; then RC=125 SECONDS_TAKEN=0; return; fi
    local t0; t0=$(date +%s.%N)
    timeout "$limit" "$@" >"$WORK/logs/$name.log" 2>&1
    RC=$?
    SECONDS_TAKEN=$(since "$t0")
}

verdict_of() {  # the verdict of a step from RC, unless it finished
    case $RC in 0) echo "$1" ;; 124) echo cut ;; 125) echo skipped ;; *) echo failed ;; esac
}

summary() {  # PARENT [REFERENCE]: one line per model (and, with a reference, the accuracy verdict on stdout first)
    python3 - "$@" <<'PY'
import csv, json, pathlib, statistics, sys
parent = pathlib.Path(sys.argv[1])
ref = json.loads(pathlib.Path(sys.argv[2]).read_text())["models"] if len(sys.argv) > 2 else None
lines, diffs, stale = [], [], []
small = bool(__import__("os").environ.get("GPU_CHECK_SMALL"))
for norm in ("bn", "gn", "ln"):
    folder = parent / norm
    rows = list(csv.DictReader(open(folder / "metrics.csv"))) if (folder / "metrics.csv").is_file() else []
    res = json.loads((folder / "results.json").read_text()) if (folder / "results.json").is_file() else {}
    cfg = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    secs = [float(r["seconds"]) for r in rows]
    line = f"  {norm}: epochs={len(rows)}/{cfg.get('epochs', '?')}"
    if secs:
        median = statistics.median(secs)
        line += f" first_epoch_s={secs[0]:.2f} median_epoch_s={median:.2f} first_minus_median_s={secs[0] - median:.2f}"
    if res.get("compile_seconds") is not None:
        line += f" compile_s={res['compile_seconds']:.1f}"
    for k in ("precision", "compile", "cuda_graphs", "captured_step", "gpu_peak_mib", "device"):
        if k in res:
            line += f" {k}={round(res[k]) if k == 'gpu_peak_mib' else str(res[k]).replace(' ', '_')}"
    if ref is not None:
        got, want = res.get("test_acc"), ref.get(norm, {}).get("test_acc")
        if got is not None and want is not None:
            diffs.append(100 * (got - want))
            line += f" test={100 * got:.2f}% cpu_reference={100 * want:.2f}% diff={diffs[-1]:+.2f}_points"
        else:
            line += " test=none"
        if cfg and "config" in ref.get(norm, {}):  # a reference made before a default changed compares nothing
            from normlab.config import Config
            differ = [k for k, _, _ in Config.from_dict(cfg).differences(Config.from_dict(ref[norm]["config"])) if k != "epochs" or not small]
            if differ:
                stale.append(norm)
                line += f" STALE_REFERENCE_SETTINGS={','.join(differ)}"
    lines.append(line)
if ref is not None:
    print("stale_reference" if stale else "match" if len(diffs) == 3 and all(abs(d) <= 2.0 for d in diffs) else "differs")
print("\n".join(lines))
PY
}

whole_run() {  # NAME LIMIT DATA EPOCHS [normlab run flags...]: a step of its own; cold compile cache unless INDUCTOR is set
    local name=$1 limit=$2 data=$3 epochs=$4; shift 4
    TORCHINDUCTOR_CACHE_DIR=${INDUCTOR:-$WORK/inductor_$name} timed "$name" "$limit" \
        $NORMLAB run --data-dir "$data" --device "$DEV" --threads "$THREADS" --epochs "$epochs" --out "$WORK/$name" --no-report "$@"
}

run_verdict() {  # ok within 60 s, slow after (the required 60 s for 3 models x 20 epochs)
    verdict_of "$(awk -v s="$SECONDS_TAKEN" 'BEGIN { print (s <= 60 ? "ok" : "slow") }')"
}

# ---------------------------------------------------------------- start-up: packages, data, the machine
t0=$(date +%s.%N)
ok=ok
if ls .gpu/whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" .gpu/whl/*.whl >"$WORK/logs/setup.log" 2>&1 || ok=failed
fi
if [ -n "${GPU_CHECK_SMALL:-}" ]; then
    python3 "$TOOL" "$SUB" "$WORK/full" --train 500 --test 100 >>"$WORK/logs/setup.log" 2>&1 || ok=failed
    ACC_DATA=$WORK/full
else
    python3 "$TOOL" "$SUB" "$WORK/full" --train 10000 --test 2000 --repeat 5 >>"$WORK/logs/setup.log" 2>&1 || ok=failed
    ACC_DATA=$SUB
fi
machine=$(python3 -c "import torch; c = torch.cuda.is_available(); print('device=' + (torch.cuda.get_device_name().replace(' ', '_') + ' capability=%d.%d' % torch.cuda.get_device_capability() if c else 'cpu'), 'torch=' + torch.__version__, 'cuda=' + str(torch.version.cuda))" 2>>"$WORK/logs/setup.log") || ok=failed
echo "step=setup seconds=$(since "$t0") verdict=$ok $machine date=$(date -u +%Y-%m-%dT%H:%MZ) small=${GPU_CHECK_SMALL:-0}"

# ---------------------------------------------------------------- (a) the plain default run
whole_run a_default 170 "$WORK/full" "$EPOCHS"
echo "step=a_default seconds=$SECONDS_TAKEN verdict=$(run_verdict) command=\"normlab run --epochs $EPOCHS\" (3 models, full-size data, cold compile cache)"
summary "$WORK/a_default"

# ---------------------------------------------------------------- (b) captured, and 3 at once
whole_run b_capture 80 "$WORK/full" "$EPOCHS" --compile capture
echo "step=b_capture seconds=$SECONDS_TAKEN verdict=$(run_verdict) command=\"normlab run --compile capture\""
summary "$WORK/b_capture"
whole_run b_jobs3 100 "$WORK/full" "$EPOCHS" --jobs 3
echo "step=b_jobs3 seconds=$SECONDS_TAKEN verdict=$(run_verdict) command=\"normlab run --jobs 3\" (cold compile cache)"
summary "$WORK/b_jobs3"

# ---------------------------------------------------------------- (c) accuracy against the CPU's
for how in default capture; do
    flags=$([ $how = capture ] && echo "--compile capture")
    INDUCTOR=$WORK/inductor_a_default whole_run "c_$how" $([ $how = default ] && echo 80 || echo 55) "$ACC_DATA" "$ACC_EPOCHS" $flags
    step_rc=$RC step_s=$SECONDS_TAKEN
    out=$(summary "$WORK/c_$how" benchmarks/gpu_check_cpu_reference.json)
    RC=$step_rc
    echo "step=c_$how seconds=$step_s verdict=$(verdict_of "$(head -1 <<<"$out")") command=\"normlab run${flags:+ $flags}\" (real 10,000/2,000 subset, warm compile cache) against the CPU reference"
    tail -n +2 <<<"$out"
done

# ---------------------------------------------------------------- (d) profiles, if time is left
timed d_profile_capture 15 python3 benchmarks/profile_step.py '{"norm": "bn"}' --device "$DEV" --capture --no-profile $PROFILE_FLAGS
echo "step=d_profile_capture seconds=$SECONDS_TAKEN verdict=$(verdict_of ok) $(grep -h "ops_per_step\|ms/step" "$WORK/logs/d_profile_capture.log" 2>/dev/null | tr '\n' ' ')"
TORCHINDUCTOR_CACHE_DIR=$WORK/inductor_a_default timed d_profile_graphs 15 python3 benchmarks/profile_step.py '{"norm": "bn"}' --device "$DEV" \
    $COMPILED --no-profile $PROFILE_FLAGS
echo "step=d_profile_graphs seconds=$SECONDS_TAKEN verdict=$(verdict_of ok) $(grep -h "ops_per_step\|ms/step" "$WORK/logs/d_profile_graphs.log" 2>/dev/null | tr '\n' ' ')"

echo "step=total seconds=$(since "$START") verdict=done"
if [ -n "${OUT:-}" ]; then  # the logs and the run folders' small files (no models, no data)
    tar -C "$WORK" -czf "$OUT/gpu_check_runs.tgz" --exclude='*.pt' --exclude=full --exclude='inductor*' --exclude=site . 2>/dev/null
fi
echo
echo "details: the logs in $WORK/logs (the last lines of each below)"
for f in "$WORK"/logs/*.log; do echo "--- $(basename "$f")"; tail -n 5 "$f"; done
