"""Benchmark create_kv_indices (mllm_kernel) against the PyTorch reference.

The reference needs the total length on the host, so its time includes a sync.
GPU:  python mllm-kernel/benchmarks/bench_create_kv_indices.py
CPU smoke check:  python mllm-kernel/benchmarks/bench_create_kv_indices.py --device cpu --smoke
"""

from __future__ import annotations

import torch
from bench_utils import device_name, median_time_us, parse_args, report

from mllm_kernel import create_kv_indices, create_kv_indices_reference

GPU_BATCHES = (1, 8, 64, 256)
GPU_CONTEXTS = (128, 1024, 4096, 32768)
SMOKE_BATCHES = (1, 4)
SMOKE_CONTEXTS = (16, 100)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], "create_kv_indices.jsonl")
    batches, contexts = (SMOKE_BATCHES, SMOKE_CONTEXTS) if args.smoke else (GPU_BATCHES, GPU_CONTEXTS)
    device = args.device
    name = device_name(device)
    print(f"create_kv_indices on {name}")
    for context in contexts:
        for batch_size in batches:
            max_reqs = 2 * batch_size
            req_to_token = torch.randint(0, 1 << 30, (max_reqs, context), dtype=torch.int32, device=device)
            pool = torch.randperm(max_reqs, device=device)[:batch_size]
            # Every request uses its whole row, the decode-time worst case.
            lens = torch.full((batch_size,), context, dtype=torch.int32, device=device)
            indptr = torch.zeros(batch_size + 1, dtype=torch.int32, device=device)
            indptr[1:] = torch.cumsum(lens, 0)
            out = torch.empty(batch_size * context, dtype=torch.int32, device=device)
            # Each gathered index is read once and written once, plus the per-request metadata.
            moved = 2 * out.numel() * 4 + batch_size * (8 + 4 + 4)
            for impl, fn in (("mllm_kernel", create_kv_indices), ("torch", create_kv_indices_reference)):
                time_us = median_time_us(lambda: fn(req_to_token, pool, lens, indptr, None, out), device, args.reps)
                report(
                    args.out,
                    {
                        "bench": "create_kv_indices",
                        "impl": impl,
                        "device": name,
                        "shape": {"bs": batch_size, "context": context},
                        "dtype": "int32",
                        "index_dtype": "int64",
                        "time_us": time_us,
                        "bytes": moved,
                        "gbps": moved / time_us / 1e3,
                    },
                )


if __name__ == "__main__":
    main()
