"""Measure FlashInfer decode with and without tensor cores for Qwen3 head layouts.

    python scripts/bench_decode_attention.py [--out rows.jsonl]

The backend's rule (``decode_use_tensor_cores``) picks one per GQA group size; this prints the
times behind that choice: bf16, page size 1, head_dim 128, several batch sizes and lengths.
"""

from __future__ import annotations

import argparse
import json

import torch


def time_decode(num_qo: int, num_kv: int, bs: int, kv_len: int, tensor_cores: bool) -> float:
    import flashinfer

    device = torch.device("cuda")
    head_dim = 128
    slots = bs * kv_len + 1
    k = torch.randn(slots, num_kv, head_dim, device=device, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q = torch.randn(bs, num_qo, head_dim, device=device, dtype=torch.bfloat16)
    indptr = torch.arange(0, bs + 1, dtype=torch.int32) * kv_len
    indices = torch.arange(1, bs * kv_len + 1, dtype=torch.int32, device=device)
    last = torch.ones(bs, dtype=torch.int32)
    workspace = torch.empty(256 << 20, dtype=torch.uint8, device=device)
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD", use_tensor_cores=tensor_cores)
    wrapper.plan(indptr, indices, last, num_qo, num_kv, head_dim, 1,
                 q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16)
    for _ in range(5):
        wrapper.run(q, (k, v))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    # Replaying a graph of 20 calls takes launch overhead out of the kernel times.
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(20):
            wrapper.run(q, (k, v))
    graph.replay()
    start.record()
    for _ in range(10):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 200 * 1e3  # microseconds per call


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = []
    for num_qo, num_kv in ((16, 8), (32, 8)):
        for bs in (1, 8, 64):
            for kv_len in (128, 1024, 2048):
                cuda_cores = time_decode(num_qo, num_kv, bs, kv_len, False)
                tensor_cores = time_decode(num_qo, num_kv, bs, kv_len, True)
                row = dict(num_qo_heads=num_qo, num_kv_heads=num_kv, batch_size=bs, kv_len=kv_len,
                           cuda_cores_us=cuda_cores, tensor_cores_us=tensor_cores,
                           device=torch.cuda.get_device_name())
                rows.append(row)
                print(f"heads {num_qo}/{num_kv} bs {bs:3d} kv {kv_len:5d}: "
                      f"cuda cores {cuda_cores:7.1f} us, tensor cores {tensor_cores:7.1f} us")
    if args.out:
        with open(args.out, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
