#!/usr/bin/env bash
# GPU suite for the fast path (FlashInfer attention, CUDA graphs, fused Triton ops), made for
# one run on the lent H100 (Python 3.12, torch 2.11+cu130, triton 3.6, no network):
#
#   env -> JIT warm-up (FlashInfer modules built in parallel) -> pytest -m gpu -> bench_one_batch
#   (Qwen3-0.6B / Qwen3-8B / Qwen3-VL-8B shapes, dummy weights; the VL runs with one random
#   image of 448x448 and of 1024x768) -> summary table (the last lines of stdout)
#
# Every stage runs on its own: a failing or timed-out stage is reported and the next one runs.
# The whole suite keeps inside SUITE_BUDGET_S (default 520 s) by shortening or skipping stages.
#
# Run from the repository root with .whl/ (FlashInfer 0.6.7, apache-tvm-ffi, missing deps)
# carried, and optionally the kernel cache of an earlier run (see KCACHE_DIR below):
#   bash scripts/gpu_suite.sh
# Files written to $OUT (at most 7, each under 16 MiB):
#   suite.log  pytest_gpu.log  bench.jsonl  kcache.tgz.NN (compiled FlashInfer modules and
#   mllm_kernel cache; copy them into out/gpu_cache/ and carry out/gpu_cache next time)
set -uo pipefail

SUITE_START=$(date +%s)
SUITE_BUDGET_S=${SUITE_BUDGET_S:-520}
OUT=${OUT:-$PWD/out/gpu_suite}
KCACHE_DIR=${KCACHE_DIR:-out/gpu_cache}
SITE=/tmp/site
mkdir -p "$OUT"
LOG="$OUT/suite.log"
: >"$LOG"
STATUS=()

say() { echo "[gpu_suite +$(($(date +%s) - SUITE_START))s] $*" | tee -a "$LOG"; }
remaining() { echo $((SUITE_BUDGET_S - ($(date +%s) - SUITE_START))); }

# stage NAME MAX_SECONDS LOGFILE CMD...: run with a timeout cut to the budget left (keeping
# RESERVE_S for the summary and the cache), record ok / FAILED / TIMEOUT / SKIPPED.
RESERVE_S=25
stage() {
  local name=$1 max=$2 logfile=$3
  shift 3
  local left=$(($(remaining) - RESERVE_S))
  local limit=$((max < left ? max : left))
  if ((limit < 20)); then
    say "SKIPPED $name: ${left}s of budget left"
    STATUS+=("SKIPPED  $name")
    return
  fi
  say "START $name (limit ${limit}s)"
  local t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >>"$logfile" 2>&1
  local rc=$? dt=$(($(date +%s) - t0))
  local result=ok
  if ((rc == 124 || rc == 137)); then result=TIMEOUT; elif ((rc != 0)); then result="FAILED(rc=$rc)"; fi
  say "END $name: $result in ${dt}s"
  STATUS+=("$(printf '%-9s %-28s %4ss' "$result" "$name" "$dt")")
  if [[ $result != ok ]]; then
    echo "---- last lines of $(basename "$logfile") ----" | tee -a "$LOG"
    tail -n 25 "$logfile" | tee -a "$LOG"
  fi
}

# ---------------- set-up ----------------
export PYTHONUNBUFFERED=1 FLASHINFER_CUDA_ARCH_LIST=9.0 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    >>"$LOG" 2>&1 || say "WARNING: installing .whl/*.whl failed (see suite.log)"
fi
export PYTHONPATH="$PWD:$PWD/mllm-kernel:$SITE${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G "$KCACHE_DIR/kcache.tgz.*" >/dev/null; then
  # FlashInfer loads a module from flashinfer/data/aot/<name>/<name>.so without building it.
  mkdir -p /tmp/kcache && cat "$KCACHE_DIR"/kcache.tgz.* | tar -xz -C /tmp/kcache \
    && mkdir -p "$SITE/flashinfer/data/aot" ~/.cache/mllm_kernel \
    && cp -r /tmp/kcache/flashinfer_aot/. "$SITE/flashinfer/data/aot/" \
    && cp -r /tmp/kcache/mllm_kernel/. ~/.cache/mllm_kernel/ \
    && say "restored kernel cache from $KCACHE_DIR" || say "WARNING: kernel cache restore failed"
fi

# ---------------- stages ----------------
env_report() {
  nvidia-smi
  python3 -m pymllm show-env
  python3 - <<'PY'
import importlib
for name in ("torch", "triton", "flashinfer", "tvm_ffi", "mllm_kernel", "transformers", "tokenizers",
             "safetensors", "numpy", "zmq", "pytest", "pytest_timeout"):
    try:
        mod = importlib.import_module(name)
        print(f"import {name:16s} ok   {getattr(mod, '__version__', '')}")
    except Exception as e:  # report every missing package, not just the first
        print(f"import {name:16s} FAIL {type(e).__name__}: {e}")
PY
}

# Build FlashInfer's modules for the suite's shapes (bf16, head_dim 128): CUDA-core decode
# (GQA 2), tensor-core decode (GQA 4, FA2 prefill module) and prefill (FA3 on Hopper), one
# process each so the compiles run side by side; also compiles mllm_kernel's KV kernels.
warm_one() {
  python3 - "$@" <<'PY'
import sys, types, torch
from pymllm.engine.forward_batch import ForwardBatch, ForwardMode
from pymllm.layers.attention.flashinfer_backend import FlashInferAttnBackend
from pymllm.layers.radix_attention import RadixAttention
from pymllm.mem_cache.memory_pool import KVPool, ReqToTokenPool
heads, kv_heads, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
dev, dt = torch.device("cuda"), torch.bfloat16
layer = RadixAttention(heads, 128, 128 ** -0.5, kv_heads, 0)
pool, reqs = KVPool(64, 1, kv_heads, 128, dt, dev), ReqToTokenPool(2, 64, dev)
reqs.req_to_token[0, :8] = torch.arange(1, 9, dtype=torch.int32)
runner = types.SimpleNamespace(device=dev, dtype=dt, kv_pool=pool, req_to_token_pool=reqs,
                               model=torch.nn.ModuleList([layer]))
backend = FlashInferAttnBackend(runner)
cases = [(0, 8), (4, 4)] if mode == "extend" else [(7, 1)]
for prefix, new in cases:
    fb = ForwardBatch(
        forward_mode=ForwardMode.EXTEND if mode == "extend" else ForwardMode.DECODE, batch_size=1,
        input_ids=torch.zeros(new, dtype=torch.int64, device=dev),
        positions=torch.arange(prefix, prefix + new, device=dev),
        req_pool_indices=torch.zeros(1, dtype=torch.int64, device=dev),
        seq_lens=torch.tensor([prefix + new], dtype=torch.int32, device=dev),
        out_cache_loc=torch.arange(1 + prefix, 1 + prefix + new, device=dev), seq_lens_cpu=[prefix + new],
        req_to_token_pool=reqs, kv_pool=pool, extend_seq_lens_cpu=[new], extend_prefix_lens_cpu=[prefix])
    backend.init_forward_metadata(fb)
    q = torch.randn(new, heads * 128, device=dev, dtype=dt)
    kv = torch.randn(new, kv_heads * 128, device=dev, dtype=dt)
    backend.forward(q, kv, kv, layer, fb)
torch.cuda.synchronize()
print(f"warm {heads}/{kv_heads} {mode}: {backend.forward_metadata.kind} ok, "
      f"tensor-core decode={backend.use_tensor_cores}, mllm_kernel={backend.kv_ops.uses_mllm_kernel}")
PY
}
warm_all() {
  warm_one 16 8 decode & local a=$!
  warm_one 32 8 decode & local b=$!
  warm_one 16 8 extend & local c=$!
  local rc=0
  wait $a || rc=1
  wait $b || rc=1
  wait $c || rc=1
  return $rc
}

pytest_gpu() {
  # One session per package: their conftest files and test module names stay apart. A module
  # that cannot be imported here (a missing wheel) must not keep the others from running.
  local rc=0 args=(-m gpu -q -rfEs -p no:cacheprovider --continue-on-collection-errors)
  python3 -m pytest "${args[@]}" pymllm/tests || rc=1
  python3 -m pytest "${args[@]}" mllm-kernel/tests || rc=1
  return $rc
}

export BENCH_JSONL="$OUT/bench.jsonl"
BENCH_LOG="$OUT/bench.log"
: >"$BENCH_JSONL"
bench() {
  local name=$1 config=$2
  shift 2
  python3 -m pymllm.bench_one_batch --server.model_path "benchmarks/configs/$config" \
    --server.load_format dummy --server.dtype bfloat16 --server.log_level info \
    --run-name "$name" --result-filename "$BENCH_JSONL" "$@"
}

# Qwen3-VL-8B shape: one run per image size (--image takes one WxH); rows carry vit_latency
# (the vision tower inside the prefill) and prefill_text_latency (prefill - ViT).
VL_IMAGE_SIZES="448x448 1024x768"
export VL_IMAGE_SIZES
bench_vl() {
  local rc=0 size
  for size in $VL_IMAGE_SIZES; do
    bench "qwen3-vl-8b-${size%%x*}" qwen3-vl-8b --image "$size" "$@" || rc=1
  done
  return $rc
}

# `timeout` runs programs, not shell functions: the stages call exported functions via bash -c.
export -f env_report warm_one warm_all pytest_gpu bench bench_vl
stage env 40 "$LOG" bash -c env_report
stage jit-warmup 240 "$LOG" bash -c warm_all
stage pytest-gpu 240 "$OUT/pytest_gpu.log" bash -c pytest_gpu
stage bench-0.6b-graph 110 "$BENCH_LOG" bash -c 'bench "$@"' _ qwen3-0.6b-graph qwen3-0.6b \
  --batch-size 1 --input-len 128 2048 --output-len 32
stage bench-0.6b-eager 80 "$BENCH_LOG" bash -c 'bench "$@"' _ qwen3-0.6b-eager qwen3-0.6b \
  --server.disable_cuda_graph --batch-size 1 --input-len 128 2048 --output-len 32
stage bench-8b-bs1 120 "$BENCH_LOG" bash -c 'bench "$@"' _ qwen3-8b-bs1 qwen3-8b \
  --batch-size 1 --input-len 1024 2048 --output-len 128
stage bench-8b-bs64 120 "$BENCH_LOG" bash -c 'bench "$@"' _ qwen3-8b-bs64 qwen3-8b \
  --batch-size 64 --input-len 1024 --output-len 32 --server.max_total_tokens 68000
stage bench-vl-8b-image 120 "$BENCH_LOG" bash -c 'bench_vl "$@"' _ \
  --batch-size 1 --input-len 256 --output-len 32
cat "$BENCH_LOG" >>"$LOG" 2>/dev/null
rm -f "$BENCH_LOG"  # folded into suite.log: $OUT returns at most 8 files

# ---------------- kernel cache for the next run ----------------
(
  set -e
  rm -rf /tmp/kcache_out && mkdir -p /tmp/kcache_out/flashinfer_aot /tmp/kcache_out/mllm_kernel
  for so in ~/.cache/flashinfer/*/*/cached_ops/*/*.so; do
    [[ -f $so ]] || continue
    name=$(basename "$(dirname "$so")")
    mkdir -p "/tmp/kcache_out/flashinfer_aot/$name" && cp "$so" "/tmp/kcache_out/flashinfer_aot/$name/"
  done
  [[ -d ~/.cache/mllm_kernel ]] && cp -r ~/.cache/mllm_kernel/. /tmp/kcache_out/mllm_kernel/
  tar -C /tmp/kcache_out -cz . | split -b 15m -d - "$OUT/kcache.tgz."
  parts=$(ls "$OUT"/kcache.tgz.* | wc -l)
  if ((parts > 4)); then rm -f "$OUT"/kcache.tgz.*; echo "kernel cache too large ($parts parts): not kept"; fi
) >>"$LOG" 2>&1 || say "WARNING: could not pack the kernel cache"
say "kernel cache: $(ls "$OUT"/kcache.tgz.* 2>/dev/null | wc -l) part(s), $(du -ch "$OUT"/kcache.tgz.* 2>/dev/null | tail -1 | cut -f1)"

# ---------------- summary ----------------
{
  echo
  echo "==================== gpu_suite summary ($(($(date +%s) - SUITE_START))s) ===================="
  printf '%s\n' "${STATUS[@]}"
  grep -E "(passed|failed|error|skipped|no tests ran).* in [0-9.]+s" "$OUT/pytest_gpu.log" 2>/dev/null | sed 's/^/pytest: /'
  python3 - "$BENCH_JSONL" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
head = f"{'run':18s} {'bs':>3s} {'in':>5s} {'out':>4s} {'prefill ms':>10s} {'tok/s':>8s} {'/mm':>5s} " \
       f"{'decode ms':>9s} {'tok/s':>7s} {'/floor':>6s} {'floor ms':>8s} graph"
print(head)
for r in rows:
    d = r["median_decode_latency"]
    print(f"{r['run_name']:18s} {r['batch_size']:3d} {r['input_len']:5d} {r['output_len']:4d} "
          f"{r['prefill_latency'] * 1e3:10.2f} {r['prefill_throughput']:8.0f} {r['prefill_vs_matmul_rate']:5.2f} "
          + (f"{d * 1e3:9.3f} {r['median_decode_throughput']:7.0f} {r['decode_vs_floor']:6.2f} "
             f"{r['decode_floor_latency'] * 1e3:8.3f}" if d else f"{'-':>9s} {'-':>7s} {'-':>6s} {'-':>8s}")
          + f" {r['cuda_graph']}")
vl = [r for r in rows if r.get("vit_latency") is not None]
if vl:
    print(f"{'run (images)':18s} {'image':>9s} {'img tok':>7s} {'prompt':>6s} {'ViT ms':>8s} {'text prefill ms':>15s}")
for r in vl:
    print(f"{r['run_name']:18s} {r['image_size']:>9s} {r['image_tokens']:7d} {r['prompt_len']:6d} "
          f"{r['vit_latency'] * 1e3:8.2f} {r['prefill_text_latency'] * 1e3:15.2f}")
if rows:
    r = rows[0]
    print(f"device {r['device']}, {r['dtype']}, copy {r['hbm_bandwidth_gbs']:.0f} GB/s, "
          f"matmul {r['matmul_tflops']:.0f} TFLOP/s, attention {r['attention_backend']}")
PY
} 2>&1 | tee -a "$LOG"
