#!/usr/bin/env bash
# The first session on a real H100 or H200, in under 8 minutes: install, test, measure, compare.
#
#   bash benchmarks/gpu_first_run.sh [OUT_DIR]          (default: gpu-first-run/)
#
# Stages, each time-limited and logged to OUT_DIR/<stage>.log; a failed stage is recorded and
# the next runs. OUT_DIR/result.json is always written (on any exit): the GPU, each stage's exit
# status and seconds, `minidl bench` on one GPU (both towers: cuda:0,cuda:0) and on two where
# there are two, each layer's measured forward and backward ms (benchmarks/gpu_layer_times.py),
# vs_torch's figures where PyTorch is installed, and per layer the prediction of
# benchmarks/time_model.py --json (where present) against the measurement.
# Knobs: BATCH (128), STEPS (20), BUDGET (450 s), PYTHON (python3), SKIP_INSTALL=1, PYTEST_ARGS,
# PREDICTED=FILE (a time_model.py --json made beforehand, e.g. on a CPU machine: the emulation
# takes minutes). A stage the budget has no room left for is recorded with exit 125.
set -u
cd "$(dirname "$0")/.."
OUT=${1:-gpu-first-run}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
rm -f "$OUT"/*.json "$OUT"/*.log  # a result is never an earlier run's
PY=${PYTHON:-python3}
BATCH=${BATCH:-128}
STEPS=${STEPS:-20}
STAGES="$OUT/stages.tsv"
: >"$STAGES"

DEADLINE=$(( $(date +%s) + ${BUDGET:-450} ))  # the whole run's seconds: every stage fits in what is left

# stage NAME SECONDS COMMAND...: run it under a time limit (and within the budget), its output to OUT/NAME.log
stage() {
    local name=$1 limit=$2 start rc left
    shift 2
    start=$(date +%s)
    left=$(( DEADLINE - start - 10 ))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 5 ]; then
        echo "== $name: skipped, the budget is spent"
        printf '%s\t%s\t%s\n' "$name" 125 0 >>"$STAGES"
        return 0
    fi
    echo "== $name (at most ${limit}s)"
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - start ))" >>"$STAGES"
    [ "$rc" -eq 0 ] || { echo "   failed (exit $rc; 124: timed out): $OUT/$name.log"; tail -5 "$OUT/$name.log"; }
    return 0
}

write_result() {
    "$PY" - "$OUT" "$BATCH" <<'EOF' || printf '{"error": "the summary could not be written", "out": "%s"}\n' "$OUT" >"$OUT/result.json"
import json, os, sys
out, batch = sys.argv[1], int(sys.argv[2])

def load(name):
    try:
        with open(os.path.join(out, name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None

stages = {}
try:
    for line in open(os.path.join(out, "stages.tsv")):
        name, rc, seconds = line.rstrip("\n").split("\t")
        stages[name] = dict(exit=int(rc), seconds=int(seconds), log=f"{name}.log")
except OSError:
    pass
measured, predicted = load("layers_measured.json"), load("predicted.json")
layers = []
names = list((measured or {}).get("ms_by_layer", {})) + \
    [n for n in (predicted or {}).get("ms_by_layer", {}) if n not in (measured or {}).get("ms_by_layer", {})]
for name in names:
    layers.append(dict(layer=name, measured_ms=(measured or {}).get("ms_by_layer", {}).get(name),
                       predicted_ms=(predicted or {}).get("ms_by_layer", {}).get(name)))
gpu = None
try:
    gpu = open(os.path.join(out, "gpu.log")).read().strip()
except OSError:
    pass
result = dict(gpu=gpu, batch_size=batch, stages=stages,
              bench={k: load(f"bench_{k}.json") for k in ("one_gpu", "two_gpus", "one_gpu_fp16", "one_gpu_bf16")},
              step_ms=dict(measured=(measured or {}).get("ms_per_step"),
                           predicted=(predicted or {}).get("ms_per_step")),
              predicted_source=(predicted or {}).get("source"), vs_torch_log="vs_torch.log" if "vs_torch" in stages else None,
              layers=layers, note="ms per layer: [forward, backward], both towers on one GPU (cuda:0,cuda:0)")
with open(os.path.join(out, "result.json"), "w") as f:
    json.dump(result, f, indent=1)
print(f"wrote {os.path.join(out, 'result.json')}")
EOF
}
trap write_result EXIT

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$OUT/gpu.log" 2>&1
GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
echo "GPUs: ${GPUS:-0} ($(head -1 "$OUT/gpu.log"))"

# 1. install: minidl with CuPy for CUDA 12; where CuPy does not work (a CUDA 13 driver and toolkit), CUDA 13's
cupy_works() { "$PY" -c "import cupy; cupy.cuda.runtime.getDeviceCount(); assert int(cupy.arange(4).sum()) == 6" \
    >>"$OUT/install.log" 2>&1; }
if [ "${SKIP_INSTALL:-0}" != 1 ]; then
    stage install 240 "$PY" -m pip install -q -e ".[gpu,test]"
    if ! cupy_works; then
        stage install_nvrtc 120 "$PY" -m pip install -q nvidia-cuda-nvrtc-cu12
        cupy_works || { stage install_cuda13 180 bash -c "'$PY' -m pip uninstall -y -q cupy-cuda12x; \
            '$PY' -m pip install -q 'cupy-cuda13x[ctk]'"; }
    fi
fi
cupy_works && echo "CuPy works" || echo "CuPy does not work: the GPU stages will fail (see install.log)"

# 2. the GPU tests on the real GPU (no --emulate-gpus)
# shellcheck disable=SC2086 -- PYTEST_ARGS is split on purpose
stage gpu_tests 150 "$PY" -m pytest -m gpu -q -p no:cacheprovider ${PYTEST_ARGS:-} tests

# 3. minidl bench: both towers on one GPU, and on two where there are two
bench_json() {  # bench_json NAME DEVICES [PRECISION]: the bench's dict as JSON
    "$PY" -c "import json, sys
from minidl.precision import set_precision
from minidl.training.bench import bench
from minidl.training.model_file import load_model_file
set_precision('${3:-tf32}')
result = bench(load_model_file('models/alexnet.py'), batch_size=$BATCH, steps=$STEPS, devices='$2')
result.pop('step_seconds', None)
json.dump(result, open(sys.argv[1], 'w'), indent=1)
print(result)" "$OUT/bench_$1.json"
}
export -f bench_json
export PY BATCH STEPS OUT
stage bench_one_gpu 90 bash -c 'bench_json one_gpu cuda:0,cuda:0'
if [ "${GPUS:-0}" -ge 2 ]; then stage bench_two_gpus 90 bash -c 'bench_json two_gpus cuda:0,cuda:1'; fi
# mixed precision (issue 28): one GPU in fp16 and bf16
stage bench_one_gpu_fp16 60 bash -c 'bench_json one_gpu_fp16 cuda:0,cuda:0 fp16'
stage bench_one_gpu_bf16 60 bash -c 'bench_json one_gpu_bf16 cuda:0,cuda:0 bf16'

# 4. each layer's GEMMs and kernels, forward and backward, timed with device events
stage layer_times 90 "$PY" benchmarks/gpu_layer_times.py --batch-size "$BATCH" --json "$OUT/layers_measured.json"

# 5. against PyTorch, where it is installed
if "$PY" -c "import torch; assert torch.cuda.is_available()" >/dev/null 2>&1; then
    stage vs_torch 150 "$PY" benchmarks/vs_torch.py --device cuda --batch-size "$BATCH" --steps 20 --rounds 2
else
    echo "== vs_torch: skipped (no PyTorch with CUDA here)"
fi

# 6. the prediction for this GPU: a file made beforehand, else the time model now (emulated: minutes, last)
GPU_KIND=h100
grep -qi h200 "$OUT/gpu.log" && GPU_KIND=h200
if [ -n "${PREDICTED:-}" ] && [ -f "$PREDICTED" ]; then
    cp "$PREDICTED" "$OUT/predicted.json"
elif [ -f benchmarks/time_model.py ]; then
    stage time_model 120 "$PY" benchmarks/time_model.py --devices cuda:0,cuda:0 --batch-size "$BATCH" \
        --gpu "$GPU_KIND" --json "$OUT/predicted.json"
else
    echo "== time_model: benchmarks/time_model.py is not here; measured only"
fi
