#!/usr/bin/env bash
# Prefix-cache benchmark on the GPU: requests sharing a 2,000-token system prompt, TTFT with the
# radix cache vs --server.disable_radix_cache, through the real server and bench_serving.
# Run from the repository root on the GPU machine after the wheels of .whl/ are on PYTHONPATH:
#   bash scripts/gpu_prefix_cache_bench.sh [config dir, default benchmarks/configs/qwen3-8b]
# PREFIX_LEN overrides the shared prefix length (a CPU smoke run with a tiny config uses less).
# Appends one JSONL row per setting to $OUT/prefix_cache.jsonl.
# Where the time goes: PYMLLM_HOP_TRACE=/tmp/hops with scripts/hop_trace first on PYTHONPATH
# records every process's hops; python scripts/hop_trace/analyze.py /tmp/hops breaks TTFT down.
set -uo pipefail
source "$(dirname "$0")/serving_lib.sh"
setup_dummy_bench "${1:-benchmarks/configs/qwen3-8b}" /tmp/prefix-bench-model
ROWS="$OUT/prefix_cache.jsonl"
SERVER_FLAGS="--server.dtype bfloat16 --server.max_running_requests 8 --server.max_total_tokens 65536"
BENCH_ARGS="--num-prompts 24 --shared-prefix-len ${PREFIX_LEN:-2000} --input-len 32 --output-len 8 --concurrency 1
  --vocab-size 1400 --backend generate --seed 1"

run_setting radix "$ROWS"
run_setting chunk "$ROWS" --server.disable_radix_cache
python3 - "$ROWS" <<'PY'
import json, sys
rows = {r["setting"]: r for r in map(json.loads, open(sys.argv[1]))}
radix, chunk = rows["radix"], rows["chunk"]
print(f"TTFT median: radix {radix['median_ttft_ms']:.2f} ms, no cache {chunk['median_ttft_ms']:.2f} ms, "
      f"ratio {chunk['median_ttft_ms'] / radix['median_ttft_ms']:.2f}x; cached prompt tokens "
      f"{radix['total_cached_tokens']} vs {chunk['total_cached_tokens']} of {radix['total_input_tokens']}")
PY
