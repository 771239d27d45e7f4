"""Host cost of single CUDA-related calls on this machine (median of 2000, GPU idle): the pieces
of a staged upload and a graph launch. Run: python scripts/host_call_costs.py (needs CUDA)."""
import statistics, time
import numpy as np, torch
from pymllm.executor.batch_inputs import InputStager
dev = torch.device("cuda")
def t(label, fn, n=2000):
    torch.cuda.synchronize()
    v = []
    for _ in range(n):
        t0 = time.perf_counter_ns(); fn(); v.append(time.perf_counter_ns() - t0)
        torch.cuda.synchronize()
    print(f"{label:55s} {statistics.median(v)/1e3:7.2f} us")
words = np.arange(300, dtype=np.int64)
dst = torch.zeros(256, dtype=torch.int64, device=dev)
pinned = torch.empty(512, dtype=torch.int64, pin_memory=True)
pn = pinned.numpy()
src_s, dst_s = pinned[:256], dst[:256]
t("numpy assign 300 words into pinned", lambda: pn.__setitem__(slice(0, 300), words))
t("copy_ pinned(caching alloc) -> device, non_blocking", lambda: dst_s.copy_(src_s, non_blocking=True))
reg = np.zeros(512, dtype=np.int64)
torch.cuda.cudart().cudaHostRegister(reg.ctypes.data, reg.nbytes, 0)
rt = torch.from_numpy(reg)[:256]
t("copy_ pinned(cudaHostRegister) -> device, non_blocking", lambda: dst_s.copy_(rt, non_blocking=True))
st = InputStager(dev)
t("InputStager.upload (dst given)", lambda: st.upload(words, 256, dst=dst))
ev = torch.cuda.Event(); s = torch.cuda.current_stream()
t("event.record", lambda: ev.record(s))
t("stream.synchronize (idle)", lambda: s.synchronize())
t("torch.cuda.synchronize (idle)", lambda: torch.cuda.synchronize())
x = torch.zeros(1, device=dev)
g = torch.cuda.CUDAGraph()
with torch.cuda.graph(g):
    for _ in range(300): x.add_(1)
g.replay(); torch.cuda.synchronize()
t("graph.replay() of 300 tiny kernels (GPU idle)", g.replay, 300)
