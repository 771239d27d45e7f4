"""Roofline numbers for the benchmarks: the device's measured ceilings (copy bandwidth, dense
matmul rate) and a model's bytes and FLOPs per step, so measured times can be put next to what
the hardware allows."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import List, Optional

import torch

from pymllm.layers.linear import LinearBase
from pymllm.layers.radix_attention import RadixAttention
from pymllm.layers.vocab_embedding import LMHead, VocabEmbedding


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_copy_bandwidth(device: torch.device, nbytes: Optional[int] = None, iters: int = 10,
                           rounds: int = 5) -> float:
    """Bytes per second of a large device-to-device copy, reads plus writes: the best of
    ``rounds`` timings of ``iters`` copies. One timing moved by 2 % between processes on one
    H200 (the floor of the same model 1.970 vs 2.011 ms, T102); the best round is what the
    memory demonstrably sustains, so the floor built on it is the tightest one measured."""
    nbytes = nbytes or ((1 << 30) if device.type == "cuda" else (32 << 20))
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync(device)
    best = 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(iters):
            dst.copy_(src)
        _sync(device)
        best = max(best, 2 * src.numel() * 4 * iters / (time.perf_counter() - start))
    return best


def measure_matmul_rate(device: torch.device, dtype: torch.dtype, n: Optional[int] = None, iters: int = 10) -> float:
    """FLOP/s of a large square matmul in ``dtype``."""
    n = n or (8192 if device.type == "cuda" else 256)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    torch.matmul(a, b)
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        torch.matmul(a, b)
    _sync(device)
    return 2 * n**3 * iters / (time.perf_counter() - start)


# ---------------- model cost ----------------
@dataclass
class ModelCost:
    decode_weight_bytes: int  # weights one decode step reads
    kv_bytes_per_token: int  # K and V of one token over all layers
    linear_macs_per_token: int  # every LinearBase layer
    lm_head_macs: int  # per sampled position
    attention: List[tuple]  # per layer (num_heads, head_dim, sliding_window)


def model_cost(model: torch.nn.Module, kv_pool) -> ModelCost:
    sizes = {}
    for p in model.parameters():
        sizes[p.data_ptr()] = p.numel() * p.element_size()
    lm_head = next(m for m in model.modules() if isinstance(m, LMHead))
    # The input embedding is a row gather (batch-size rows), unless it is the tied LM head.
    for m in model.modules():
        if type(m) is VocabEmbedding and m.weight.data_ptr() != lm_head.weight.data_ptr():
            sizes.pop(m.weight.data_ptr(), None)
    elem = torch.empty((), dtype=kv_pool.dtype).element_size()
    return ModelCost(
        decode_weight_bytes=sum(sizes.values()),
        kv_bytes_per_token=kv_pool.num_layers * kv_pool.num_kv_heads * (kv_pool.head_dim + kv_pool.v_head_dim) * elem,
        linear_macs_per_token=sum(m.input_size * m.output_size for m in model.modules() if isinstance(m, LinearBase)),
        lm_head_macs=lm_head.weight.shape[0] * lm_head.weight.shape[1],
        attention=[(m.num_heads, m.head_dim, m.sliding_window) for m in model.modules() if isinstance(m, RadixAttention)],
    )


def causal_pairs(length: int, window: Optional[int]) -> int:
    """(query, key) pairs a causal prompt of ``length`` attends, with an optional window."""
    if window is None or window >= length:
        return length * (length + 1) // 2
    return window * (window + 1) // 2 + (length - window) * window


def prefill_flops(cost: ModelCost, bs: int, input_len: int) -> float:
    linear = 2 * (bs * input_len * cost.linear_macs_per_token + bs * cost.lm_head_macs)
    attention = sum(4 * h * d * bs * causal_pairs(input_len, w) for h, d, w in cost.attention)
    return float(linear + attention)


def decode_floor_seconds(cost: ModelCost, bs: int, input_len: int, output_len: int, bandwidth: float) -> float:
    """HBM time of a decode step at the mean attended length (input_len + output_len / 2)."""
    kv_tokens = bs * (input_len + output_len / 2)
    return (cost.decode_weight_bytes + kv_tokens * cost.kv_bytes_per_token) / bandwidth


# ---------------- image prompts ----------------
