"""Decode attention kernels for Qwen3 head layouts, as a CUDA-graph decode step runs them.

    python scripts/bench_decode_attention.py [--out rows.jsonl] [--triton-only]

Compares FlashInfer's decode with and without tensor cores (the rule ``decode_use_tensor_cores``
picks one per GQA group size) and pymllm's Triton split-KV kernel (``triton_decode``, used for
small graph batches because it needs no host-side plan()), in its one-launch form (splits
merged in the kernel, as the backend runs it) and its earlier two-launch form (a separate merge
kernel; ``--triton-only`` times just these two, without FlashInfer). Each case replays a graph of 20
calls, each on its own layer's K/V buffers as in a model, so K/V come from DRAM, not L2. It
also times the host side of FlashInfer's graph-mode ``plan()``, which a replay of a FlashInfer
decode graph must run first and the Triton kernel does not need. bf16, page size 1, head_dim 128.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

LAYERS = 20
HEAD_DIM = 128


def _buffers(num_qo, num_kv, bs, kv_len, device):
    slots = bs * kv_len + 1
    kv = [(torch.randn(slots, num_kv, HEAD_DIM, device=device, dtype=torch.bfloat16),
           torch.randn(slots, num_kv, HEAD_DIM, device=device, dtype=torch.bfloat16)) for _ in range(LAYERS)]
    q = torch.randn(bs, num_qo, HEAD_DIM, device=device, dtype=torch.bfloat16)
    return q, kv


def _graph_time_us(calls) -> float:
    from pymllm.layers.kernels.gemv_dispatch import graph_seconds_per_call

    return graph_seconds_per_call(calls) * 1e6


def time_flashinfer(num_qo, num_kv, bs, kv_len, tensor_cores):
    """(kernel us per call, host us of the graph-mode plan())."""
    import flashinfer

    device = torch.device("cuda")
    q, kv = _buffers(num_qo, num_kv, bs, kv_len, device)
    indptr = torch.arange(0, bs + 1, dtype=torch.int32) * kv_len
    indices = torch.arange(1, bs * kv_len + 1, dtype=torch.int32, device=device)
    last = torch.ones(bs, dtype=torch.int32)
    workspace = torch.empty(256 << 20, dtype=torch.uint8, device=device)
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
        workspace, "NHD", use_tensor_cores=tensor_cores, use_cuda_graph=True,
        paged_kv_indptr_buffer=torch.zeros(bs + 1, dtype=torch.int32, device=device),
        paged_kv_indices_buffer=indices, paged_kv_last_page_len_buffer=torch.ones(bs, dtype=torch.int32, device=device))
    plan = lambda: wrapper.plan(indptr, indices, last, num_qo, num_kv, HEAD_DIM, 1,  # noqa: E731
                                q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16)
    plan()
    kernel = _graph_time_us([lambda k=k, v=v: wrapper.run(q, (k, v)) for k, v in kv])
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(50):
        plan()
    host = (time.perf_counter() - start) / 50 * 1e6
    torch.cuda.synchronize()
    return kernel, host


def kv_bytes(bs, kv_len, num_kv):
    """Bytes of K and V (bf16) one decode step reads: the attention's memory floor."""
    return bs * kv_len * num_kv * HEAD_DIM * 2 * 2


def append_rows(path, rows):
    """Append rows to a JSONL file (nothing without a path)."""
    if path:
        with open(path, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


def page_table(bs, kv_len, device):
    """(req_to_token, req_pool_indices, seq_lens): sequence i owns slots [i * kv_len + 1, ...)."""
    req_to_token = (torch.arange(bs * kv_len, dtype=torch.int32, device=device) + 1).view(bs, kv_len)
    return req_to_token, torch.arange(bs, device=device), torch.full((bs,), kv_len, dtype=torch.int32, device=device)


def time_triton_calls(q, kv, table, splits, **launch) -> float:
    """Microseconds per decode_attention call over the layers' K/V in a graph; ``launch``:
    decode_attention's keyword settings (separate_merge, block, num_warps, num_stages)."""
    from pymllm.layers.attention.triton_decode import arrival_counters, decode_attention

    out = torch.empty_like(q)
    counters = arrival_counters(q.shape[0], kv[0][0].shape[1], q.device)
    return _graph_time_us([
        lambda k=k, v=v: decode_attention(q, k, v, *table, HEAD_DIM**-0.5, splits, out=out, counters=counters, **launch)
        for k, v in kv
    ])


def time_triton(num_qo, num_kv, bs, kv_len, separate_merge=False):
    from pymllm.layers.attention.triton_decode import num_splits_for

    device = torch.device("cuda")
    q, kv = _buffers(num_qo, num_kv, bs, kv_len, device)
    splits = num_splits_for(bs, num_kv, torch.cuda.get_device_properties(0).multi_processor_count)
    return time_triton_calls(q, kv, page_table(bs, kv_len, device), splits, separate_merge=separate_merge)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--triton-only", action="store_true", help="skip FlashInfer (not needed to be installed)")
    args = parser.parse_args()
    rows = []
    for num_qo, num_kv in ((16, 8), (32, 8)):
        for bs in (1, 4, 8, 16, 32, 64):
            for kv_len in (128, 1024, 2048):
                if args.triton_only:
                    cuda_cores = plan_us = tensor_cores = plan_tc_us = float("nan")
                else:
                    cuda_cores, plan_us = time_flashinfer(num_qo, num_kv, bs, kv_len, False)
                    tensor_cores, plan_tc_us = time_flashinfer(num_qo, num_kv, bs, kv_len, True)
                triton_us = time_triton(num_qo, num_kv, bs, kv_len)
                triton_2launch_us = time_triton(num_qo, num_kv, bs, kv_len, separate_merge=True)
                row = dict(bench="decode_attention", num_qo_heads=num_qo, num_kv_heads=num_kv, batch_size=bs,
                           kv_len=kv_len, cuda_cores_us=cuda_cores, tensor_cores_us=tensor_cores,
                           triton_us=triton_us, triton_2launch_us=triton_2launch_us, plan_host_us=plan_us, plan_tc_host_us=plan_tc_us,
                           kv_bytes=kv_bytes(bs, kv_len, num_kv), device=torch.cuda.get_device_name(),
                           command="python scripts/bench_decode_attention.py", graph_mode_wrappers=True)
                rows.append(row)
                print(f"heads {num_qo}/{num_kv} bs {bs:3d} kv {kv_len:5d}: cuda cores {cuda_cores:7.1f} us, "
                      f"tensor cores {tensor_cores:7.1f} us, triton {triton_us:7.1f} us "
                      f"(2 launches {triton_2launch_us:7.1f} us) | "
                      f"plan host {plan_us:5.0f}/{plan_tc_us:5.0f} us", flush=True)
                torch.cuda.empty_cache()
    append_rows(args.out, rows)


if __name__ == "__main__":
    main()
