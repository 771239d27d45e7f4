"""Benchmark store_cache (mllm_kernel) against the PyTorch reference (index_put).

GPU:  python mllm-kernel/benchmarks/bench_store_cache.py
CPU smoke check:  python mllm-kernel/benchmarks/bench_store_cache.py --device cpu --smoke
"""

from __future__ import annotations

import torch
from bench_utils import device_name, median_time_us, parse_args, report

from mllm_kernel import store_cache, store_cache_reference

GPU_TOKENS = (1, 8, 64, 256, 1024, 4096, 16384)
GPU_HEADS = ((8, 128), (2, 64), (32, 128))
SMOKE_TOKENS = (0, 1, 7)
SMOKE_HEADS = ((2, 8),)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], "store_cache.jsonl")
    tokens, heads = (SMOKE_TOKENS, SMOKE_HEADS) if args.smoke else (GPU_TOKENS, GPU_HEADS)
    dtype, index_dtype = torch.bfloat16, torch.int64
    name = device_name(args.device)
    print(f"store_cache on {name}")
    for num_heads, head_dim in heads:
        for num_tokens in tokens:
            num_slots = max(2 * num_tokens, 4096 if args.smoke else 65536)
            k = torch.randn(num_tokens, num_heads, head_dim, device=args.device).to(dtype)
            v = torch.randn_like(k)
            k_cache = torch.zeros(num_slots, num_heads, head_dim, dtype=dtype, device=args.device)
            v_cache = torch.zeros_like(k_cache)
            loc = torch.randperm(num_slots, device=args.device)[:num_tokens].to(index_dtype)
            # K and V rows are each read once and written once, plus the indices.
            moved = 4 * k.numel() * k.element_size() + loc.numel() * loc.element_size()
            for impl, fn in (("mllm_kernel", store_cache), ("torch", store_cache_reference)):
                time_us = median_time_us(lambda: fn(k, v, k_cache, v_cache, loc), args.device, args.reps)
                report(
                    args.out,
                    {
                        "bench": "store_cache",
                        "impl": impl,
                        "device": name,
                        "shape": {"T": num_tokens, "H": num_heads, "D": head_dim, "slots": num_slots},
                        "dtype": str(dtype).removeprefix("torch."),
                        "index_dtype": str(index_dtype).removeprefix("torch."),
                        "time_us": time_us,
                        "bytes": moved,
                        "gbps": moved / time_us / 1e3,
                    },
                )


if __name__ == "__main__":
    main()
