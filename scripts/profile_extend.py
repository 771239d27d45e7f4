"""Where does an extend on a cached prefix spend its time? (prefix caching, issue 5)

    PYTHONPATH=$PWD:$PWD/mllm-kernel python scripts/profile_extend.py [benchmarks/configs/qwen3-8b] \
        [--prefix-len 2000] [--new-len 32] [--reps 10] [--strategies paged,paged_fa2,cascade,cascade_fa2] \
        [--profile-strategies all|none|NAMES] --out /tmp/profile_extend.jsonl

Dummy weights, bf16, FlashInfer; no CUDA graphs unless --cuda-graph, with which extends of up to
32 new tokens replay the decode graphs (one row per token), as in the server. Medians over --reps runs, each between two
device synchronisations:
(a) a full prefill of prefix + new tokens (one ``ModelRunner.run_batch``: inputs, forward, sampling);
(b) the extend of the new tokens over a prefix already in the KV cache, set up as the scheduler
    does on a prefix-cache hit (the request's row gets the cached slots, ``cache_owned_len``),
    once per extend strategy of ``pymllm.layers.attention.flashinfer_extend``;
(c) one attention layer alone for that extend, per strategy: host time of
    ``init_forward_metadata`` (plan() and kv_indices), GPU time per layer call (its K/V store
    included; CUDA events over num_layers back-to-back calls) and the largest difference from
    torch_native;
then a torch.profiler table (top kernels by CUDA time) of (b) per strategy. Each measurement
is appended to --out as one JSON row.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from typing import List

import numpy as np
import torch

from pymllm.configs.global_config import GlobalConfig
from pymllm.engine.forward_batch import ForwardMode
from pymllm.layers.attention import flashinfer_extend as fx
from pymllm.orchestrator.request import Req
from pymllm.orchestrator.schedule_batch import ScheduledBatch
from pymllm.sampling_params import SamplingParams


def build_runner(config_dir: str, kv_tokens: int, cuda_graph: bool = False):
    from pymllm.executor.model_runner import load_model_runner

    config = GlobalConfig()
    s = config.server
    s.model_path, s.load_format, s.dtype, s.device = config_dir, "dummy", "bfloat16", "cuda"
    # With graphs, extends of up to EXTEND_AS_DECODE_MAX_TOKENS replay the decode graphs.
    s.attention_backend, s.disable_cuda_graph = "flashinfer", not cuda_graph
    s.max_running_requests, s.max_total_tokens = 4, kv_tokens
    config.validate()
    return load_model_runner(config)


def new_req(runner, rid: str, ids: List[int]) -> Req:
    params = SamplingParams(max_new_tokens=1, temperature=0.0, ignore_eos=True).with_defaults({})
    req = Req(rid=rid, origin_input_ids=ids, sampling_params=params, seed=0)
    req.req_pool_idx = runner.req_to_token_pool.alloc()
    return req


def time_batch(runner, batch, reps: int) -> List[float]:
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        runner.run_batch(batch)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def time_attention(runner, backend, batch, reps: int) -> dict:
    """One layer's attention for this batch: plan host time, GPU time per call, |diff| vs native."""
    from pymllm.layers.attention.flashinfer_backend import attention_layers
    from pymllm.layers.attention.torch_native_backend import TorchNativeAttnBackend

    layers = attention_layers(runner.model)
    layer = layers[0]
    fb = runner.build_forward_batch(batch)
    gen = torch.Generator(device="cuda").manual_seed(0)
    t, d = fb.num_tokens, layer.head_dim
    q = torch.randn(t, layer.num_heads * d, device="cuda", dtype=runner.dtype, generator=gen)
    k = torch.randn(t, layer.num_kv_heads * d, device="cuda", dtype=runner.dtype, generator=gen)
    v = torch.randn(t, layer.num_kv_heads * d, device="cuda", dtype=runner.dtype, generator=gen)
    plan_ms, per_layer_us = [], []
    with torch.inference_mode():
        for _ in range(reps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            backend.init_forward_metadata(fb)
            plan_ms.append((time.perf_counter() - t0) * 1e3)
            backend.forward(q, k, v, layer, fb)  # warm
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(len(layers)):
                backend.forward(q, k, v, layer, fb)
            end.record()
            torch.cuda.synchronize()
            per_layer_us.append(start.elapsed_time(end) * 1e3 / len(layers))
        got = backend.forward(q, k, v, layer, fb).float()
        ref = TorchNativeAttnBackend().forward(q, k, v, layer, fb).float()
    return dict(kind=backend.forward_metadata.kind, plan_host_ms=statistics.median(plan_ms),
                per_layer_us=statistics.median(per_layer_us), per_layer_us_all=per_layer_us,
                max_abs_diff_vs_torch_native=(got - ref).abs().max().item())


def parse_strategies(parser, text: str, default: List[str]) -> List[str]:
    if text == "all":
        return list(default)
    if text == "none":
        return []
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in fx.EXTEND_STRATEGIES]
    if unknown:
        parser.error(f"unknown strategies {unknown}; known: {', '.join(fx.EXTEND_STRATEGIES)}")
    return names


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config_dir", nargs="?", default="benchmarks/configs/qwen3-8b")
    parser.add_argument("--prefix-len", type=int, default=2000)
    parser.add_argument("--new-len", type=int, default=32)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--strategies", default="all", help="comma-separated, or 'all'")
    parser.add_argument("--profile-strategies", default="all", help="comma-separated, 'all' or 'none'")
    parser.add_argument("--out", required=True, help="JSONL file to append rows to")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="capture decode graphs, so short extends run as decode rows (the server's default)")
    parser.add_argument("--triton-graph-max-bs", type=int, default=None,
                        help="override flashinfer_backend.TRITON_GRAPH_DECODE_MAX_BS (graph batches up to it "
                             "decode with the Triton kernel) to compare kernels for extend rows")
    parser.add_argument("--cprofile", action="store_true",
                        help="also print the host-side Python profile (cProfile) of the default strategy's extends")
    args = parser.parse_args()
    strategies = parse_strategies(parser, args.strategies, fx.EXTEND_STRATEGIES)
    profiled = parse_strategies(parser, args.profile_strategies, strategies)
    if not torch.cuda.is_available():
        print("profile_extend.py: needs a CUDA device (torch.cuda.is_available() is False); nothing measured",
              file=sys.stderr)
        return 2
    if importlib.util.find_spec("flashinfer") is None:
        print("profile_extend.py: flashinfer is not importable (pip install flashinfer-python)", file=sys.stderr)
        return 2
    from pymllm.layers.attention.flashinfer_backend import FlashInferAttnBackend
    import flashinfer

    if args.triton_graph_max_bs is not None:
        from pymllm.layers.attention import flashinfer_backend

        flashinfer_backend.TRITON_GRAPH_DECODE_MAX_BS = args.triton_graph_max_bs
    p, n = args.prefix_len, args.new_len
    runner = build_runner(args.config_dir, kv_tokens=3 * (p + n) + 256, cuda_graph=args.cuda_graph)
    device_name = torch.cuda.get_device_name()
    base = dict(device=device_name, model=args.config_dir, prefix_len=p, new_len=n, reps=args.reps,
                flashinfer=getattr(flashinfer, "__version__", "?"), torch=torch.__version__,
                default_strategy=fx.DEFAULT_EXTEND_STRATEGY, cuda_graph=args.cuda_graph,
                timestamp=time.strftime("%Y-%m-%dT%H:%M:%S"))
    rows = []

    def emit(**row):
        rows.append({**base, **row})
        with open(args.out, "a") as f:
            f.write(json.dumps(rows[-1]) + "\n")

    rng = np.random.default_rng(0)
    prompt = rng.integers(0, 1000, p + n).tolist()
    alloc = runner.token_to_kv_pool_allocator.alloc
    # The cached prefix: computed once by its own request, as the radix cache would hold it.
    owner = new_req(runner, "prefix", prompt[:p])
    prefix_slots = alloc(p)
    runner.run_batch(ScheduledBatch(ForwardMode.EXTEND, [owner], [0], [p], prefix_slots, [True]))
    hit = new_req(runner, "hit", prompt)
    hit.kv_slots, hit.cache_owned_len = prefix_slots, p
    extend = ScheduledBatch(ForwardMode.EXTEND, [hit], [p], [n], alloc(n), [True])
    cold = new_req(runner, "cold", prompt)
    prefill = ScheduledBatch(ForwardMode.EXTEND, [cold], [0], [p + n], alloc(p + n), [True])

    time_batch(runner, prefill, 2)
    prefill_ms = time_batch(runner, prefill, args.reps)
    emit(case="prefill", strategy=None, kind=runner.attn_backend.forward_metadata.kind,
         median_ms=statistics.median(prefill_ms), times_ms=prefill_ms)
    backends = {}
    results = {}
    if args.cuda_graph:
        # The captured graphs belong to the runner's own backend: measure that one only.
        strategies = [fx.DEFAULT_EXTEND_STRATEGY]
    for s in strategies:
        try:
            if args.cuda_graph:
                backend = backends[s] = runner.attn_backend
            else:
                backend = backends[s] = FlashInferAttnBackend(runner, extend_strategy=s)
            runner.attn_backend = backend
            time_batch(runner, extend, 3)  # JIT builds and first-call set-up
            times = time_batch(runner, extend, args.reps)
            kind = backend.forward_metadata.kind
            if args.cuda_graph:  # the rows ran inside a graph: no separate op timing
                nan = float("nan")
                op = dict(kind=kind, plan_host_ms=nan, per_layer_us=nan, max_abs_diff_vs_torch_native=nan)
            else:
                op = time_attention(runner, backend, extend, args.reps)
        except Exception as e:  # one strategy failing (a JIT build, a kernel) must not hide the rest
            print(f"strategy {s}: FAILED: {type(e).__name__}: {e}", file=sys.stderr)
            emit(case="extend", strategy=s, error=f"{type(e).__name__}: {e}")
            continue
        results[s] = (statistics.median(times), kind, op)
        emit(case="extend", strategy=s, kind=kind, median_ms=results[s][0], times_ms=times)
        emit(case="attention_op", strategy=s, **op)

    pre = statistics.median(prefill_ms)
    print(f"\n== {args.config_dir} on {device_name}, bf16 dummy weights, FlashInfer "
          f"{base['flashinfer']}: medians of {args.reps}")
    print(f"(a) full prefill of {p + n} tokens: {pre:8.2f} ms")
    print(f"(b) extend of {n} tokens on {p} cached, (c) its attention alone (one layer):")
    print(f"  {'strategy':12s} {'kind':8s} {'extend ms':>10s} {'prefill/extend':>15s} "
          f"{'attn us/layer':>14s} {'x layers ms':>12s} {'plan ms':>8s} {'|diff|':>8s}")
    layers = runner.model_config.num_layers
    for s, (ext, kind, op) in results.items():
        mark = " (default)" if s == fx.DEFAULT_EXTEND_STRATEGY else ""
        print(f"  {s:12s} {kind:8s} {ext:10.2f} {pre / ext:15.2f} {op['per_layer_us']:14.1f} "
              f"{op['per_layer_us'] * layers / 1e3:12.2f} {op['plan_host_ms']:8.3f} "
              f"{op['max_abs_diff_vs_torch_native']:8.4f}{mark}")
    print("  target: prefill/extend >= 5")

    for s in profiled:
        if s not in results:
            continue
        runner.attn_backend = backends[s]
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            time_batch(runner, extend, 3)
        print(f"\n== torch.profiler, 3 extends, strategy {s}: top kernels by CUDA time")
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=70))
    if args.cprofile and fx.DEFAULT_EXTEND_STRATEGY in backends:
        import cProfile
        import pstats

        runner.attn_backend = backends[fx.DEFAULT_EXTEND_STRATEGY]
        profile = cProfile.Profile()
        profile.enable()
        time_batch(runner, extend, args.reps)
        profile.disable()
        print(f"\n== cProfile, {args.reps} extends, strategy {fx.DEFAULT_EXTEND_STRATEGY}: host time by function")
        pstats.Stats(profile).sort_stats("tottime").print_stats(30)
    print(f"rows: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
