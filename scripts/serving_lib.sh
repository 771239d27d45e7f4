# Shared by the serving benchmarks on the GPU (source it): a dummy-weight model directory that
# carries the tiny test tokenizer, a server started in the background, and the result rows
# labelled with their setting.

# prepare_dummy_model CONFIG_DIR MODEL_DIR: config.json of CONFIG_DIR plus the tiny tokenizer.
# Dummy weights need no tokenizer of the real model: prompts are token ids below the tiny
# tokenizer's vocabulary. The model's vocabulary is cut to the tokenizer's so every generated id
# decodes to text; a step's cost barely depends on it (the LM head shrinks, which the serving
# comparisons here do not measure).
prepare_dummy_model() {
  mkdir -p "$2"
  cp "$1/config.json" "$2/"
  python3 - "$2" <<'PY'
import json, sys
from transformers import AutoTokenizer
from pymllm.testing.tiny_models import build_tiny_tokenizer
model = sys.argv[1]
build_tiny_tokenizer(model)
config = json.load(open(f"{model}/config.json"))
config["vocab_size"] = len(AutoTokenizer.from_pretrained(model))
json.dump(config, open(f"{model}/config.json", "w"))
PY
}

# setup_dummy_bench CONFIG_DIR MODEL_DIR: the $OUT folder and the dummy model; sets CONFIG and MODEL.
setup_dummy_bench() {
  CONFIG=$1 MODEL=$2
  OUT=${OUT:-$PWD/out}
  mkdir -p "$OUT"
  prepare_dummy_model "$CONFIG" "$MODEL"
}

# run_setting NAME ROWS [server flags...]: a server on $MODEL with $SERVER_FLAGS plus the given
# flags, bench_serving with $BENCH_ARGS appending to ROWS, that row labelled NAME, the server
# stopped. bench_serving is imported rather than run as __main__, so scripts/hop_trace can
# patch it when tracing.
run_setting() {
  local name=$1 rows=$2 port=31234
  shift 2
  # shellcheck disable=SC2086  # the flag lists split on spaces
  start_server "$MODEL" $port "$OUT/server_$name.log" $SERVER_FLAGS "$@" || return 1
  # shellcheck disable=SC2086
  python3 -c 'import sys; from pymllm import bench_serving; sys.exit(bench_serving.main(sys.argv[1:]))' \
    --base-url "http://127.0.0.1:$port" $BENCH_ARGS --result-filename "$rows" 2>&1 | tail -12
  label_last_row "$rows" "$name" "$CONFIG"
  stop_server
}

# start_server MODEL_DIR PORT LOG [server flags...]: launch and wait for /health; sets SERVER_PID.
start_server() {
  local model=$1 port=$2 log=$3
  shift 3
  python3 -m pymllm.server.launch --server.model_path "$model" --server.load_format dummy \
    --server.port "$port" --server.log_level warning "$@" >"$log" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 1 240); do
    python3 -c "import httpx,sys; sys.exit(httpx.get('http://127.0.0.1:$port/health', timeout=1).status_code != 200)" 2>/dev/null && return 0
    kill -0 $SERVER_PID 2>/dev/null || { echo "server died:"; tail -20 "$log"; return 1; }
    sleep 1
  done
  echo "server did not come up in 240 s"; return 1
}

stop_server() {
  kill -TERM "$SERVER_PID"
  wait "$SERVER_PID"
}

# label_last_row ROWS_FILE SETTING CONFIG_DIR: add setting, model config, device and commit to
# the last row bench_serving appended.
label_last_row() {
  python3 - "$@" <<'PY'
import json, subprocess, sys
import torch
path, name, config = sys.argv[1:]
rows = [json.loads(l) for l in open(path)]
rows[-1].update(setting=name, model_config=config,
                device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                commit=subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip())
open(path, "w").write("".join(json.dumps(r) + "\n" for r in rows))
PY
}
