#!/usr/bin/env bash
# Overlapped decoding through the real server: one request at a time streaming OUTPUT_LEN tokens,
# inter-token latency (and time per output token) with overlap (the default) against
# --server.disable_overlap_schedule, servers alternating ROUNDS times. Dummy weights, token-id
# prompts (scripts/serving_lib.sh).
# Run from the repository root on the GPU machine after the wheels of .whl/ are on PYTHONPATH:
#   bash scripts/gpu_overlap_serving_bench.sh [config dir, default benchmarks/configs/qwen3-0.6b]
# Appends one JSONL row per server to $OUT/overlap_serving.jsonl and prints the medians.
set -uo pipefail
source "$(dirname "$0")/serving_lib.sh"
setup_dummy_bench "${1:-benchmarks/configs/qwen3-0.6b}" /tmp/overlap-bench-model
ROWS="$OUT/overlap_serving.jsonl"
SERVER_FLAGS="--server.max_running_requests 8 --server.max_total_tokens 16384"
BENCH_ARGS="--num-prompts ${NUM_PROMPTS:-6} --input-len ${INPUT_LEN:-128} --output-len ${OUTPUT_LEN:-256}
  --concurrency 1 --vocab-size 1400 --backend generate --seed 1"

for _ in $(seq 1 ${ROUNDS:-2}); do
  run_setting overlap "$ROWS"
  run_setting sync "$ROWS" --server.disable_overlap_schedule
done
python3 - "$ROWS" "$CONFIG" <<'PY'
import json, sys
from collections import defaultdict
rows = [r for r in map(json.loads, open(sys.argv[1])) if r.get("model_config") == sys.argv[2]]
by_setting = defaultdict(list)
for r in rows:
    by_setting[r["setting"]].append(r)
def joined(rs, key):
    return " / ".join("%.3f" % r[key] for r in rs)
for name, rs in by_setting.items():
    print(f"{name}: median ITL {joined(rs, 'median_itl_ms')} ms, median TPOT {joined(rs, 'median_tpot_ms')} ms")
PY
