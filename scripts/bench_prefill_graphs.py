"""Prefill latency with the piecewise prefill graphs against the eager forward, one process.

    PYTHONPATH=$PWD:$PWD/mllm-kernel python scripts/bench_prefill_graphs.py \
        --server.model_path benchmarks/configs/qwen3-0.6b --server.load_format dummy \
        --input-len 64 256 1024 --reps 20 --run-name NAME --out rows.jsonl

One runner, its prefill graphs captured (``--server.prefill_cuda_graph_max_tokens``); for each
prompt length, ``--reps`` prefills of one request alternate between the graphs and the eager
forward (the runner's graphs set aside), each one ``ModelRunner.run_batch`` (inputs, forward,
greedy sampling, the token read back) between two device synchronisations, on empty pools.
Every length's medians go to --out as one JSON row with the device, commit and command, and
the ratio eager / graphs (above 1: the graphs are faster).
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import statistics
import sys
import time
from typing import List

import numpy as np
import torch

from pymllm.bench_one_batch import git_commit
from pymllm.configs.global_config import add_config_arguments, config_from_namespace
from pymllm.engine.forward_batch import ForwardMode
from pymllm.executor.model_runner import ModelRunner, load_model_runner
from pymllm.executor.prefill_graphs import bucket_for
from pymllm.orchestrator.request import Req
from pymllm.orchestrator.schedule_batch import ScheduledBatch
from pymllm.sampling_params import SamplingParams


def one_prefill(runner: ModelRunner, ids: List[int]) -> float:
    runner.clear()
    req = Req(rid="0", origin_input_ids=ids,
              sampling_params=SamplingParams(max_new_tokens=1, temperature=0.0).with_defaults({}), seed=0)
    req.req_pool_idx = runner.req_to_token_pool.alloc()
    slots = runner.token_to_kv_pool_allocator.alloc(len(ids))
    batch = ScheduledBatch(ForwardMode.EXTEND, [req], [0], [len(ids)], slots, [True])
    torch.cuda.synchronize(runner.device)
    start = time.perf_counter()
    runner.run_batch(batch)
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize(runner.device)
    return elapsed


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_config_arguments(parser)
    parser.add_argument("--input-len", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--run-name", default="default")
    parser.add_argument("--out", required=True)
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    config = config_from_namespace(ns)
    server = config.server
    server.max_total_tokens = server.max_total_tokens or max(ns.input_len) + 16
    runner = load_model_runner(config)
    graphs = runner.prefill_graphs
    if graphs is None:
        sys.exit("the runner has no prefill graphs (see the log for why)")
    rng = np.random.default_rng(0)
    vocab = runner.model_config.vocab_size
    device = torch.cuda.get_device_name(runner.device)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    quant = getattr(runner.model_config.hf_config, "quantization_config", None)
    for n in ns.input_len:
        ids = rng.integers(0, vocab, n).tolist()
        times = {"eager": [], "graphs": []}
        for rep in range(ns.reps + 1):  # the first of each is a warm-up
            for mode in ("eager", "graphs"):
                runner.prefill_graphs = graphs if mode == "graphs" else None
                t = one_prefill(runner, ids)
                if rep:
                    times[mode].append(t)
        runner.prefill_graphs = graphs
        eager, piece = statistics.median(times["eager"]), statistics.median(times["graphs"])
        row = {
            "run_name": ns.run_name, "input_len": n, "bucket": bucket_for(n, graphs.buckets), "reps": ns.reps,
            "eager_ms": eager * 1e3, "graphs_ms": piece * 1e3,
            "eager_min_ms": min(times["eager"]) * 1e3, "graphs_min_ms": min(times["graphs"]) * 1e3,
            "eager_over_graphs": eager / piece,
            "device": device, "dtype": str(runner.dtype).replace("torch.", ""),
            "attention_backend": runner.attn_backend.name, "model": runner.model_config.model_path,
            "architecture": runner.model_config.architecture, "load_format": server.load_format,
            "quantization": quant.get("format") if isinstance(quant, dict) else None,
            "num_buckets": len(graphs.buckets), "commit": git_commit(), "command": command,
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        print(json.dumps(row), flush=True)
        with open(ns.out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
