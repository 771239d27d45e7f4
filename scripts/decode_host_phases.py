"""Host phases of bs1 decode steps, timed as bench_one_batch times a step (sync, run_batch,
sync), without a profiler: build_forward_batch, forward (stage + graph launch), sample (wait +
D2H + tolist), and the bench's own sync; medians / p10 / p90 over 300 steps. Also the graph
replayed alone and a pure-Python loop (the CPU speed of this process: the lent machines' hosts
differ, and so does a step's host share). Then 300 more steps with the calls inside run_batch
timed one by one (stage_next, the words' upload, the backend's replay metadata, the graph
launch, predict_next, the wait for the ids): where the host time before the launch goes.

    python scripts/decode_host_phases.py benchmarks/configs/qwen3-8b 1024
"""
import os, statistics, sys, time
import numpy as np, torch
sys.path.insert(0, "scripts")
from profile_decode import build_runner
from pymllm.engine.forward_batch import ForwardMode
from pymllm.orchestrator.request import Req
from pymllm.orchestrator.schedule_batch import ScheduledBatch
from pymllm.sampling_params import SamplingParams

cfg, n = sys.argv[1], int(sys.argv[2])
print("pid", os.getpid(), "cpu", os.sched_getaffinity(0).__len__(), "torch threads", torch.get_num_threads())
t0 = time.perf_counter(); x = 0
for i in range(2_000_000): x += i
print(f"pure-python 2M adds: {(time.perf_counter() - t0) * 1e3:.1f} ms")
runner = build_runner(cfg, 1, n + 1000)
params = SamplingParams(max_new_tokens=10_000, temperature=0.0, ignore_eos=True).with_defaults({})
req = Req(rid="0", origin_input_ids=np.random.default_rng(0).integers(0, 1000, n).tolist(), sampling_params=params, seed=0)
req.req_pool_idx = runner.req_to_token_pool.alloc()
res = runner.run_batch(ScheduledBatch(ForwardMode.EXTEND, [req], [0], [n], runner.token_to_kv_pool_allocator.alloc(n), [True]))
req.output_ids.append(res.next_token_ids[0])
rows = []
for i in range(330):
    b = ScheduledBatch(ForwardMode.DECODE, [req], [len(req.fill_ids) - 1], [1], runner.token_to_kv_pool_allocator.alloc(1), [True])
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fb = runner.build_forward_batch(b); t1 = time.perf_counter()
    logits = runner.forward(fb); t2 = time.perf_counter()
    out = runner.sample(logits, b); t3 = time.perf_counter()
    torch.cuda.synchronize(); t4 = time.perf_counter()
    req.output_ids.append(out.next_token_ids[0])
    if i >= 30:
        rows.append((t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0))
def q(v, p): return sorted(v)[int(p * (len(v) - 1))] * 1e6
for name, col in zip(("build", "forward", "sample", "sync", "step"), zip(*rows)):
    print(f"{name:8s} median {statistics.median(col)*1e6:8.1f} us  p10 {q(col, .1):8.1f}  p90 {q(col, .9):8.1f}")
g = runner.cuda_graph_runner
print(f"graph back-to-back {g.replay_seconds(1, 50)*1e6:.1f} us")
gr = g.graphs[1]; solo = []
for _ in range(50):
    torch.cuda.synchronize(); t0 = time.perf_counter(); gr.replay(); torch.cuda.synchronize(); solo.append(time.perf_counter() - t0)
print(f"graph alone sync-to-sync {statistics.median(solo)*1e6:.1f} us")
# launch cost of the replay call itself, GPU busy (no waiting inside)
torch.cuda.synchronize(); launch = []
for _ in range(20):
    t0 = time.perf_counter(); gr.replay(); launch.append(time.perf_counter() - t0)
torch.cuda.synchronize()
print(f"replay() call alone (queued behind others) median {statistics.median(launch)*1e6:.1f} us")


# The calls inside a step, each wrapped with a clock (the wrappers add ~0.3 us per call).
spent: dict = {}


def clocked(obj, name, key):
    inner = getattr(obj, name)

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter_ns()
        out = inner(*args, **kwargs)
        spent.setdefault(key, []).append(time.perf_counter_ns() - t0)
        return out

    setattr(obj, name, wrapper)


class ClockedGraph:
    def __init__(self, graph):
        self.graph = graph

    def replay(self):
        t0 = time.perf_counter_ns()
        self.graph.replay()
        spent.setdefault("graph.replay() launch", []).append(time.perf_counter_ns() - t0)


clocked(g, "stage_next", "stage_next (all of build's staged path)")
clocked(g._upload, "upload", "  static words upload (in stage_next)")
clocked(g, "_launch", "  _launch (in stage_next: metadata, launch, seal, predict_next)")
clocked(g, "_prepare_staged", "    backend replay metadata (in _launch)")
clocked(g, "predict_next", "    predict_next (in _launch, after the launch)")
clocked(runner, "_argmax", "wait + ids to host")
clocked(runner, "build_forward_batch", "build_forward_batch")
clocked(runner, "forward", "forward")
g.graphs[1] = ClockedGraph(gr)
for i in range(330):
    b = ScheduledBatch(ForwardMode.DECODE, [req], [len(req.fill_ids) - 1], [1], runner.token_to_kv_pool_allocator.alloc(1), [True])
    torch.cuda.synchronize()
    t0 = time.perf_counter_ns()
    out = runner.run_batch(b)
    spent.setdefault("run_batch", []).append(time.perf_counter_ns() - t0)
    req.output_ids.append(out.next_token_ids[0])
for key, vals in spent.items():
    vals = vals[30:]
    print(f"{key:45s} median {statistics.median(vals) / 1e3:8.1f} us  p90 {sorted(vals)[int(0.9 * (len(vals) - 1))] / 1e3:8.1f}")
