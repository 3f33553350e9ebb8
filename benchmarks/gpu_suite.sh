#!/usr/bin/env bash
# All GPU work of the project, in one command, for a lent H100/H200:
#
#     bash benchmarks/gpu_suite.sh            # writes to ${OUT:-benchmarks/out}
#
# The machine has torch, triton and transformers only: no vLLM, no network, this
# package not pip-installed (it is put on PYTHONPATH here). Ends within 10 minutes on
# an H100: each step has its own time limit (the sum stays under 9.5 minutes).
#
# Outputs (few files: the device tool brings back at most 8): gpu_suite.log (every
# step's output), summary.txt (one line per step), bench_quant.json, ptx_report.json,
# bench_quantizer.json, bench_vllm_absmax.json (only where vLLM runs), bench_gptq_gpu.json.
#
# To add a step, append a line `step NAME SECONDS command args...` in the STEPS
# section below and keep the total of the SECONDS under 570. A failing step does not
# stop the others; the script exits non-zero if any step failed.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# the lent machines' Python with torch is `python3` (there may be no `python`)
PY="${PYTHON:-python3}"
unset TRITON_INTERPRET
LOG="$OUT/gpu_suite.log"
SUMMARY="$OUT/summary.txt"
: >"$LOG"
: >"$SUMMARY"
FAILED=0
T0=$(date +%s)

step() {
  local name=$1 limit=$2
  shift 2
  local t=$(date +%s)
  echo "=== step $name (limit ${limit}s): $*" | tee -a "$LOG"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  local line="$name rc=$rc $(( $(date +%s) - t ))s"
  echo "=== $line" | tee -a "$LOG"
  echo "$line" >>"$SUMMARY"
  [ "$rc" -eq 0 ] || FAILED=1
}

# ------------------------------------------------------------------- STEPS
step environment 30 bash -c '(nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true); "$0" -c "import torch, triton; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__, torch.cuda.get_device_name(0))"' "$PY"

# GPU tests: only the files named here are collected, so no module that imports vLLM
# is ever imported (add your GPU test files to this list).
GPU_TESTS="tests/test_kernels_gpu.py"
step gpu_tests 175 "$PY" -m pytest -q -m gpu -p no:cacheprovider $GPU_TESTS

step bench_quant 150 "$PY" benchmarks/bench_quant.py --check --out "$OUT"

step ptx_report 60 "$PY" benchmarks/ptx_report.py --out "$OUT/ptx_report.json"

# The offline quantizer on random Llama-3.2-1B weights: its weight path (shared global
# scales + Triton sweep + AbsMax comparison), then quantize_model end to end on the GPU
# (calibration on 64x256 random tokens, writing to a temp dir): seconds per 1e9 params.
step bench_quantizer 80 "$PY" benchmarks/bench_quantizer.py --end-to-end --num-samples 64 --seq-len 256 --out "$OUT"

# Our AbsMax quantizer vs vLLM's CUDA quantizer scaled_fp4_quant (approximate
# reciprocals): fraction of differing scales and codes on random and tie-heavy inputs.
# Needs vLLM, and vLLM 0.33 runs that kernel on SM100-SM121 only: elsewhere (the lent
# Hopper machines have no vLLM) it prints one "skipped" line and passes in seconds.
step bench_vllm_absmax 30 "$PY" benchmarks/bench_vllm_absmax.py --out "$OUT"

# GPTQ on ScaleSweep scales (quantize --gptq, issue 17): per Llama-3.2-1B-shaped decoder
# layer (random weights, random positive definite H), RTN vs GPTQ through quantize_group
# on the device; 2 timed layers + 1 warm-up: seconds per billion quantized parameters.
step bench_gptq_gpu 40 "$PY" benchmarks/bench_gptq_gpu.py --layers 2 --out "$OUT"

# (append further steps here)
# ----------------------------------------------------------------- END STEPS

echo "=== gpu_suite done in $(( $(date +%s) - T0 ))s, failed=$FAILED" | tee -a "$LOG"
cat "$SUMMARY"
exit "$FAILED"
