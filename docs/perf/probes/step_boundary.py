"""Probe (run T247): what lies between two overlapped decode steps, Qwen3-8B bs1 in1024.

1. What one copy between two decode graphs costs: the bs-1 graph replayed back to back, with the
   words upload (pinned HtoD, the input tokens left out) between the replays, and with a DtoD copy
   of the same words between them.
2. What the GPU runs after each step's argmax until the next step's first GEMV (torch profiler over
   bench_one_batch's overlapped loop).

    PYTHONPATH=$PWD:$PWD/mllm-kernel python docs/perf/probes/step_boundary.py benchmarks/configs/qwen3-8b-w4a16
"""
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "scripts"))
import numpy as np  # noqa: E402
import torch  # noqa: E402
from profile_decode import build_runner, kernel_label  # noqa: E402

from pymllm.bench_one_batch import _decode_overlapped  # noqa: E402
from pymllm.engine.forward_batch import ForwardMode  # noqa: E402
from pymllm.orchestrator.request import Req  # noqa: E402
from pymllm.orchestrator.schedule_batch import ScheduledBatch  # noqa: E402
from pymllm.sampling_params import SamplingParams  # noqa: E402

n = 1024
runner = build_runner(sys.argv[1], 1, n)
params = SamplingParams(max_new_tokens=10_000, temperature=0.0, ignore_eos=True).with_defaults({})
req = Req(rid="0", origin_input_ids=np.random.default_rng(0).integers(0, 1000, n).tolist(), sampling_params=params, seed=0)
req.req_pool_idx = runner.req_to_token_pool.alloc()
res = runner.run_batch(ScheduledBatch(ForwardMode.EXTEND, [req], [0], [n], runner.token_to_kv_pool_allocator.alloc(n), [True]))
req.output_ids.append(res.next_token_ids[0])
pos = n
t = _decode_overlapped(runner, [req], pos, 30)
pos += 30
print("overlapped steps ms (median of 30):", round(statistics.median(t) * 1e3, 4))

graphs = runner.cuda_graph_runner
graph, words = graphs.graphs[1], graphs.inputs.words
skip = graphs.inputs.layout.segments["input_ids"].words
host = torch.zeros(words.numel(), dtype=torch.int64, pin_memory=True)
host.copy_(words)
staging = words.clone()


def loop(kind: str, iters: int = 50) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        if kind == "htod":
            words[skip:].copy_(host[skip:], non_blocking=True)
        elif kind == "dtod":
            words[skip:].copy_(staging[skip:])
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters * 1e3


per_step = {k: [] for k in ("plain", "htod", "dtod")}
for _ in range(4):
    for kind in per_step:
        per_step[kind].append(loop(kind))
for kind, values in per_step.items():
    print(f"{kind:6s} us per step: " + " ".join(f"{x:.1f}" for x in values))
plain = statistics.median(per_step["plain"])
print("htod - plain: %.1f us, dtod - plain: %.1f us" % (statistics.median(per_step["htod"]) - plain,
                                                          statistics.median(per_step["dtod"]) - plain))

with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
    _decode_overlapped(runner, [req], pos, 8)
events = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                key=lambda e: e.time_range.start)
names = [kernel_label(e.name, 70) for e in events]
ends = [i for i, name in enumerate(names) if "argmax" in name]
for a, b in zip(ends[1:-2], ends[2:-1]):
    base = events[a].time_range.end
    print("--- after an argmax")
    j = a + 1
    while j < b and "w4a16_gemv_one_row" not in names[j]:
        e = events[j]
        print(f"  +{e.time_range.start - base:8.2f} us  dur {e.time_range.end - e.time_range.start:7.2f}  {names[j]}")
        j += 1
    if j < b:
        print(f"  +{events[j].time_range.start - base:8.2f} us  first GEMV")
    print(f"  step span (argmax to argmax): {events[b].time_range.end - base:.1f} us")
