"""Benchmark gemv / gemv_w8a8 against cuBLAS (torch F.linear) at decode shapes, as decode runs them.

Decode replays one CUDA graph in which every layer's GEMV follows the previous one with a
cold L2. So each case captures a graph over enough distinct weight copies to exceed the L2 and
reports the replay time per GEMV; `vs_copy` is the time the weight bytes would take at the
measured device-to-device copy bandwidth divided by the measured time (1.0 = copy speed).

GPU:  python mllm-kernel/benchmarks/bench_gemv.py [--out FILE.jsonl]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_utils import copy_bandwidth, graph_time_us

from mllm_kernel import gemv, gemv_w8a8

# (model, layer, N, K)
SHAPES = [
    ("qwen3-8b", "qkv", 6144, 4096),
    ("qwen3-8b", "o", 4096, 4096),
    ("qwen3-8b", "gate_up", 24576, 4096),
    ("qwen3-8b", "down", 4096, 12288),
    ("qwen3-8b", "lm_head", 151936, 4096),
    ("qwen3-0.6b", "qkv", 4096, 1024),
    ("qwen3-0.6b", "o", 1024, 2048),
    ("qwen3-0.6b", "gate_up", 6144, 1024),
    ("qwen3-0.6b", "down", 1024, 3072),
    ("qwen3-0.6b", "lm_head", 151936, 1024),
]
ROWS = (1, 2, 4, 8, 16)
_TARGET_BYTES = 1 << 30  # weights per case: well past any L2
_REPS = 50  # graph_time_us takes the median of reps // 10 replays


def bench_case(model, layer, n, k, m, bw, out, command):
    copies = max(2, min(64, _TARGET_BYTES // (n * k * 2)))
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5 for _ in range(copies)]
    rows = {}
    rows["torch_bf16"] = graph_time_us([lambda w=w: F.linear(x, w) for w in weights], _REPS)
    if m <= 8:
        rows["gemv_bf16"] = graph_time_us([lambda w=w: gemv(x, w) for w in weights], _REPS)
    del weights
    int8_copies = min(64, 2 * copies)
    qweights = [torch.randint(-128, 128, (n, k), device="cuda", dtype=torch.int8) for _ in range(int8_copies)]
    scale = torch.rand(n, device="cuda") / 100
    # W8A8 activations as per_token_quant_int8 hands them over (the GEMV takes them quantized).
    x_scale = x.float().abs().amax(-1, keepdim=True) / 127.5
    x_q = torch.round(x.float() / x_scale).clamp(-128, 127).to(torch.int8)
    if m <= 8:
        rows["gemv_w8a8"] = graph_time_us(
            [lambda w=w: gemv_w8a8(x_q, x_scale, w, scale, torch.bfloat16) for w in qweights], _REPS)
    del qweights
    torch.cuda.empty_cache()
    for impl, t in rows.items():
        weight_bytes = n * k * (1 if impl == "gemv_w8a8" else 2)
        row = {
            "bench": "gemv", "device": torch.cuda.get_device_name(), "impl": impl, "model": model, "layer": layer,
            "m": m, "n": n, "k": k, "time_us": round(t, 3), "weight_bytes": weight_bytes,
            "gbps": round(weight_bytes / t / 1e3, 1), "copy_gbps": round(bw, 1),
            "vs_copy": round(weight_bytes / (bw * 1e3) / t, 3),
            "speedup_vs_torch_bf16": round(rows["torch_bf16"] / t, 3), "command": command,
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        print(f"{model:>10} {layer:>8} m={m:<2} {impl:>10} {t:8.2f} us {row['gbps']:7.0f} GB/s "
              f"vs_copy {row['vs_copy']:.2f}  x{row['speedup_vs_torch_bf16']:.2f} vs cuBLAS bf16", flush=True)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gemv.jsonl"))
    parser.add_argument("--rows", type=int, nargs="+", default=list(ROWS))
    args = parser.parse_args()
    bw = copy_bandwidth(reps=40) / 1e9
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bw:.0f} GB/s")
    command = "python mllm-kernel/benchmarks/bench_gemv.py"
    for model, layer, n, k in SHAPES:
        for m in args.rows:
            bench_case(model, layer, n, k, m, bw, args.out, command)


if __name__ == "__main__":
    main()
