#!/usr/bin/env bash
# Quantization suite for the lent GPU (H100/H200): GPU tests of the W8A8/W4A16 kernels and
# runtime, the GEMM benchmark, and bench_one_batch of Qwen3-8B (dummy weights) in bf16, W8A8
# and W4A16. Everything lands in $OUT; a step that fails or times out is logged and the suite
# goes on. Budget: about 7 minutes on an H100, the first CUTLASS compile (~2 min) included.
#
# Run from the repository root on the device:
#   OUT=/path/to/out bash scripts/gpu_quant_suite.sh
# Carried paths it uses when present:
#   .whl/                      wheels (flashinfer-python 0.6.7: bundles the CUTLASS headers;
#                              apache-tvm-ffi; compressed-tensors), installed into /tmp/site
#   .cache/mllm_kernel.tar.gz  a kernel cache from an earlier run ($OUT/mllm_kernel_cache.tar.gz)
# Environment knobs: SWEEP=1 adds the small-M Triton tile sweep (~3 min).
set -uo pipefail

OUT=${OUT:-/tmp/gpu_quant_suite}
mkdir -p "$OUT"
ROOT=$(pwd)
export PYTHONPATH="$ROOT:$ROOT/mllm-kernel${PYTHONPATH:+:$PYTHONPATH}"
export FLASHINFER_CUDA_ARCH_LIST=${FLASHINFER_CUDA_ARCH_LIST:-9.0}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
LOG="$OUT/suite.log"
START=$(date +%s)

log() { echo "[$(($(date +%s) - START))s] $*" | tee -a "$LOG"; }

# step NAME TIMEOUT_S CMD...: run, record rc and duration, never abort the suite.
step() {
  local name=$1 limit=$2
  shift 2
  local t0=$(date +%s)
  log "start $name"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  log "end   $name rc=$rc $(($(date +%s) - t0))s"
  echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $(($(date +%s) - t0))}" >>"$OUT/steps.jsonl"
}

if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | tail -3
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
if [ -f .cache/mllm_kernel.tar.gz ]; then
  mkdir -p "$HOME/.cache" && tar -xzf .cache/mllm_kernel.tar.gz -C "$HOME/.cache"
fi

{
  nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  $PY -m mllm_kernel show-env
} >"$OUT/env.txt" 2>&1

# 1. CUTLASS builds, one process each so nvcc runs in parallel; meanwhile the W4A16 tests,
#    which need no CUTLASS, use the GPU.
PREBUILD='import logging, sys, time, torch
logging.basicConfig(level=logging.INFO)
from mllm_kernel.cuda.jit import int8_scaled_mm_cutlass as m
start = time.perf_counter()
m.load_kernel(sys.argv[1], getattr(torch, sys.argv[2]), torch.device("cuda"))
print(f"{sys.argv[1]} {sys.argv[2]} ready in {time.perf_counter() - start:.1f} s")'
variant=$($PY -c "import torch; from mllm_kernel.cuda.jit.int8_scaled_mm_cutlass import variant_for; print(variant_for(torch.device('cuda')))")
builds=("$variant bfloat16" "$variant float16")
[ "$variant" = sm90 ] && builds+=("sm80 bfloat16" "sm80 float16")
log "CUTLASS builds: ${builds[*]}"
pids=()
for b in "${builds[@]}"; do
  set -- $b
  (step "cutlass_build_$1_$2" 420 $PY -c "$PREBUILD" "$1" "$2") &
  pids+=($!)
done
step gpu_tests_w4a16 300 $PY -m pytest -q -m gpu -p no:cacheprovider mllm-kernel/tests/test_w4a16_triton.py \
  --junitxml="$OUT/gpu_tests_w4a16.xml"
wait "${pids[@]}"

# 2. int8 kernel tests and the whole-model GPU tests.
step gpu_tests_int8 300 $PY -m pytest -q -m gpu -p no:cacheprovider mllm-kernel/tests/test_int8_scaled_mm_cutlass.py \
  --junitxml="$OUT/gpu_tests_int8.xml"
step gpu_tests_runtime 240 $PY -m pytest -q -m gpu -p no:cacheprovider pymllm/tests/test_compressed_tensors_runtime.py \
  --junitxml="$OUT/gpu_tests_runtime.xml"

# 3. GEMM benchmark (JSONL rows + target rows).
step bench_quant_gemm 300 $PY mllm-kernel/benchmarks/bench_quant_gemm.py --output "$OUT/bench_quant_gemm.jsonl"

# 4. Model level: one 2048-token prefill and decode steps at batch 1, Qwen3-8B shapes.
for scheme in bf16 w8a8 w4a16; do
  config=benchmarks/configs/qwen3-8b$([ $scheme = bf16 ] || echo "-$scheme")
  step "bench_one_batch_$scheme" 240 $PY -m pymllm.bench_one_batch \
    --server.model_path "$config" --server.load_format dummy --server.dtype bfloat16 \
    --server.max_running_requests 1 --server.max_total_tokens 4096 --server.log_level info \
    --run-name "qwen3-8b-$scheme" --batch-size 1 --input-len 2048 --output-len 32 \
    --result-filename "$OUT/bench_one_batch.jsonl"
done

if [ "${SWEEP:-0}" = 1 ]; then
  step bench_quant_gemm_sweep 240 $PY mllm-kernel/benchmarks/bench_quant_gemm.py --m 1 \
    --output "$OUT/bench_quant_gemm_sweep.jsonl" --sweep
fi

tar -czf "$OUT/mllm_kernel_cache.tar.gz" -C "$HOME/.cache" mllm_kernel 2>/dev/null
{
  echo "== targets"
  grep -h '"kind": "target"' "$OUT/bench_quant_gemm.jsonl" 2>/dev/null
  echo "== bench_one_batch"
  cat "$OUT/bench_one_batch.jsonl" 2>/dev/null
  echo "== steps"
  cat "$OUT/steps.jsonl"
} >"$OUT/summary.txt"
cat "$OUT/summary.txt"
log "suite done"
