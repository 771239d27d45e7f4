"""Where does a decode step's time go? Host phases, graph GPU time, and the kernel list.

    python scripts/profile_decode.py benchmarks/configs/qwen3-0.6b [--input-len 128] [--bs 1] [--critical-path]

Prints medians of: building the ForwardBatch (host; with CUDA graphs this includes padding
the batch and its one copy into the graph's static buffers), the forward call (host launch
time, i.e. prepare_replay's plan() and kv_indices plus the replay launch, and the wait for the
GPU), sampling; the GPU time of one graph replay alone (CUDA events); and torch.profiler tables
of three decode steps. ``--critical-path`` also charges each kernel of one profiled step with how
far its end moves the step's frontier (``critical_path``): under PDL the kernels overlap, so their
own durations add up to more than the step; these shares add up to the step's GPU span.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from typing import Iterable, List, Tuple

import numpy as np
import torch

from pymllm.configs.global_config import GlobalConfig
from pymllm.engine.forward_batch import ForwardMode
from pymllm.executor.model_runner import ModelRunner, load_model_runner
from pymllm.orchestrator.request import Req
from pymllm.orchestrator.schedule_batch import ScheduledBatch
from pymllm.sampling_params import SamplingParams


def critical_path(kernels: Iterable[Tuple[str, float, float]]) -> List[Tuple[str, int, float]]:
    """(name, calls, microseconds) per kernel name, largest first, from (name, start, end) of one
    step's GPU kernels: each kernel is charged with max(0, end - the latest end before it, in start
    order), so overlapped work costs nothing and the charges add up to last end - first start."""
    ordered = sorted(kernels, key=lambda k: (k[1], k[2]))
    totals = defaultdict(lambda: [0, 0.0])
    frontier = ordered[0][1] if ordered else 0.0
    for name, _, end in ordered:
        totals[name][0] += 1
        totals[name][1] += max(0.0, end - frontier)
        frontier = max(frontier, end)
    return sorted(((name, calls, us) for name, (calls, us) in totals.items()), key=lambda row: -row[2])


def kernel_label(name: str, width: int = 100) -> str:
    """A profiler kernel name without its return type and parameter list, so that instances of one
    template (the gated and plain W4A16 GEMVs) stay apart when the label is cut to ``width``."""
    label = name.removeprefix("void ").split("(", 1)[0]
    return label if len(label) <= width else label[: width - 3] + "..."


def build_runner(config_dir: str, bs: int, input_len: int) -> ModelRunner:
    config = GlobalConfig()
    s = config.server
    s.model_path, s.load_format, s.dtype, s.device = config_dir, "dummy", "bfloat16", "cuda"
    s.max_running_requests = max(bs, 1)
    s.max_total_tokens = bs * (input_len + 256)
    s.cuda_graph_max_bs = max(bs, 1)
    config.validate()
    return load_model_runner(config)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config_dir")
    parser.add_argument("--bs", type=int, default=1)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--critical-path", action="store_true")
    args = parser.parse_args()
    runner = build_runner(args.config_dir, args.bs, args.input_len)
    bs, n = args.bs, args.input_len
    params = SamplingParams(max_new_tokens=10_000, temperature=0.0, ignore_eos=True).with_defaults({})
    rng = np.random.default_rng(0)
    reqs = []
    for i in range(bs):
        req = Req(rid=str(i), origin_input_ids=rng.integers(0, 1000, n).tolist(), sampling_params=params, seed=i)
        req.req_pool_idx = runner.req_to_token_pool.alloc()
        reqs.append(req)
    slots = runner.token_to_kv_pool_allocator.alloc(bs * n)
    result = runner.run_batch(ScheduledBatch(ForwardMode.EXTEND, reqs, [0] * bs, [n] * bs, slots, [True] * bs))
    for r, t in zip(reqs, result.next_token_ids):
        r.output_ids.append(t)
    phases = {"build": [], "forward_launch": [], "forward_wait": [], "sample": [], "total": []}

    def decode_step(record: bool) -> None:
        batch = ScheduledBatch(ForwardMode.DECODE, reqs, [len(r.fill_ids) - 1 for r in reqs], [1] * bs,
                               runner.token_to_kv_pool_allocator.alloc(bs), [True] * bs)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fb = runner.build_forward_batch(batch)
        t1 = time.perf_counter()
        logits = runner.forward(fb)
        t2 = time.perf_counter()
        torch.cuda.synchronize()
        t3 = time.perf_counter()
        out = runner.sample(logits, batch)
        t4 = time.perf_counter()
        for r, t in zip(reqs, out.next_token_ids):
            r.output_ids.append(t)
        if record:
            for key, value in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0)):
                value and phases[key].append(value * 1e3)

    for _ in range(5):
        decode_step(False)
    for _ in range(args.steps):
        decode_step(True)
    print(f"== {args.config_dir} bs={bs} input={n}: medians in ms")
    for key, values in phases.items():
        print(f"  {key:15s} {statistics.median(values):8.3f}")
    graphs = runner.cuda_graph_runner
    if graphs is not None:
        padded = min(s for s in graphs.batch_sizes if s >= bs)
        g = graphs.graphs[padded]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(10):
            g.replay()
        start.record()
        for _ in range(100):
            g.replay()
        end.record()
        torch.cuda.synchronize()
        print(f"  graph replay alone (GPU, back to back): {start.elapsed_time(end) / 100:.3f} ms")
        fb = runner.build_forward_batch(ScheduledBatch(
            ForwardMode.DECODE, reqs, [len(r.fill_ids) - 1 for r in reqs], [1] * bs,
            runner.token_to_kv_pool_allocator.alloc(bs), [True] * bs))
        torch.cuda.synchronize()
        times = []
        for _ in range(30):
            t0 = time.perf_counter()
            graphs.prepare_replay(fb)
            times.append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
        print(f"  prepare_replay host time: {statistics.median(times):.3f} ms")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            decode_step(False)
    table = prof.key_averages()
    print(table.table(sort_by="self_cuda_time_total", row_limit=18, max_name_column_width=60))
    print(table.table(sort_by="self_cpu_time_total", row_limit=22, max_name_column_width=60))
    if args.critical_path:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            decode_step(False)
        kernels = [(e.name, e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA]
        rows = critical_path(kernels)
        span = sum(us for _, _, us in rows)
        print(f"critical path of one step ({len(kernels)} GPU events, {span:.1f} us): name, calls, us, us per call")
        for name, calls, us in rows[:16]:
            print(f"  {kernel_label(name):100s} {calls:5d} {us:9.1f} {us / calls:8.2f}")


if __name__ == "__main__":
    main()
