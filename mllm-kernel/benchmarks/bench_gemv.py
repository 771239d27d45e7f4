"""Benchmark gemv / gemv_w8a8 against cuBLAS (torch F.linear) at decode shapes, as decode runs them.

Decode replays one CUDA graph in which every layer's GEMV follows the previous one with a
cold L2. So each case captures a graph over enough distinct weight copies to exceed the L2 and
reports the replay time per GEMV; `vs_copy` is the time the weight bytes would take at the
measured device-to-device copy bandwidth divided by the measured time (1.0 = copy speed).

With --fused it times the fused-prologue entries instead (rmsnorm_gemv for qkv / gate_up with a
residual, silu_mul_gemv for down, and gemv_w8a8_dynamic with the same prologues) against the
unfused path they replace: pymllm's Triton RMSNorm / SiLU-and-mul (and per-token int8 quant)
kernel followed by gemv / gemv_w8a8, in the same graph. `_tiling` forces a compiled tiling:
`--tilings` lists them (plain entries: 0 = the kernel's rule, or 1 2 4 11 14 = rows per warp + 10 *
split-K, what pymllm's dispatcher measures; fused entries: 100 * warps + rows).

On SM90+ the kernels launch as programmatic dependents (mllm_kernel.pdl), so back-to-back calls
overlap their ramps as in a decode step; MLLM_KERNEL_DISABLE_PDL=1 times plain launches.

GPU:  python mllm-kernel/benchmarks/bench_gemv.py [--out FILE.jsonl] [--tilings 0 14 ...] [--fused]
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
from mllm_kernel.cuda.jit.gemv_kernels import gemv_w8a8_dynamic, rmsnorm_gemv, silu_mul_gemv

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


def bench_case(model, layer, n, k, m, bw, tilings, out, command):
    copies = max(2, min(64, _TARGET_BYTES // (n * k * 2)))
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5 for _ in range(copies)]
    rows = {}
    rows["torch_bf16"] = graph_time_us([lambda w=w: F.linear(x, w) for w in weights], _REPS)
    for t in tilings if m <= 8 else ():
        rows["gemv_bf16" + (f"_t{t}" if t else "")] = graph_time_us(
            [lambda w=w, t=t: gemv(x, w, _tiling=t) for w in weights], _REPS)
    del weights
    int8_copies = min(64, 2 * copies)
    qweights = [torch.randint(-128, 128, (n, k), device="cuda", dtype=torch.int8) for _ in range(int8_copies)]
    scale = torch.rand(n, device="cuda") / 100
    # W8A8 activations as per_token_quant_int8 hands them over (the GEMV takes them quantized).
    x_scale = x.float().abs().amax(-1, keepdim=True) / 127.5
    x_q = torch.round(x.float() / x_scale).clamp(-128, 127).to(torch.int8)
    for t in tilings if m <= 8 else ():
        rows["gemv_w8a8" + (f"_t{t}" if t else "")] = graph_time_us(
            [lambda w=w, t=t: gemv_w8a8(x_q, x_scale, w, scale, torch.bfloat16, _tiling=t) for w in qweights], _REPS)
    del qweights
    torch.cuda.empty_cache()
    for impl, t in rows.items():
        weight_bytes = n * k * (1 if impl.startswith("gemv_w8a8") else 2)
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


def _unfused_kernels():
    """pymllm's Triton prologue kernels (what the fused entries replace), or None without pymllm."""
    try:
        from pymllm.layers.kernels.norm_act_triton import rms_norm, silu_and_mul
        from pymllm.quantization.kernels.int8_activation_triton import per_token_quant_int8_triton
    except ImportError:
        return None
    return rms_norm, silu_and_mul, per_token_quant_int8_triton


def bench_fused_case(model, layer, n, k, m, tilings, out, command):
    """Fused entry (per tiling) vs the unfused kernels it replaces, dense bf16 and W8A8."""
    kind = "silu_mul" if layer == "down" else "rmsnorm"
    dtype, eps = torch.bfloat16, 1e-6
    x = torch.randn(m, (2 if kind == "silu_mul" else 1) * k, device="cuda", dtype=dtype)
    res = torch.randn(m, k, device="cuda", dtype=dtype)
    norm_w = torch.rand(k, device="cuda", dtype=dtype) + 0.5
    unfused = _unfused_kernels()
    for fmt in ("bf16", "w8a8"):
        copies = max(2, min(64, _TARGET_BYTES // (n * k * (2 if fmt == "bf16" else 1))))
        if fmt == "bf16":
            weights = [torch.randn(n, k, device="cuda", dtype=dtype) / k**0.5 for _ in range(copies)]
        else:
            weights = [torch.randint(-128, 128, (n, k), device="cuda", dtype=torch.int8) for _ in range(copies)]
        w_scale = torch.rand(n, device="cuda") / 100
        rows = {}
        if unfused is not None:
            rms_norm, silu_and_mul, quant = unfused

            def prologue():
                return rms_norm(x, norm_w, eps, res)[0] if kind == "rmsnorm" else silu_and_mul(x)

            if fmt == "bf16":
                rows["unfused"] = graph_time_us([lambda w=w: gemv(prologue(), w) for w in weights], _REPS)
            else:
                rows["unfused"] = graph_time_us(
                    [lambda w=w: gemv_w8a8(*quant(prologue()), w, w_scale, dtype) for w in weights], _REPS)
        for t in tilings:
            if fmt == "bf16" and kind == "rmsnorm":
                call = lambda w, t=t: rmsnorm_gemv(x, res, norm_w, eps, w, _tiling=t)  # noqa: E731
            elif fmt == "bf16":
                call = lambda w, t=t: silu_mul_gemv(x, w, _tiling=t)  # noqa: E731
            else:
                extra = dict(residual=res, norm_weight=norm_w) if kind == "rmsnorm" else {}
                call = lambda w, t=t: gemv_w8a8_dynamic(x, w, w_scale, dtype, prologue=kind,  # noqa: E731
                                                        _tiling=t, **extra)
            rows[f"fused_t{t}" if t else "fused"] = graph_time_us([lambda w=w: call(w) for w in weights], _REPS)
        del weights
        torch.cuda.empty_cache()
        for impl, t in rows.items():
            row = {
                "bench": "gemv_fused", "device": torch.cuda.get_device_name(), "impl": f"{fmt}_{impl}",
                "prologue": kind, "model": model, "layer": layer, "m": m, "n": n, "k": k, "time_us": round(t, 3),
                "speedup_vs_unfused": round(rows["unfused"] / t, 3) if "unfused" in rows else None,
                "command": command, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            speedup = f"x{row['speedup_vs_unfused']:.2f} vs unfused" if "unfused" in rows else ""
            print(f"{model:>10} {layer:>8} m={m:<2} {kind:>8} {fmt + '_' + impl:>16} {t:8.2f} us  {speedup}",
                  flush=True)
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gemv.jsonl"))
    parser.add_argument("--rows", type=int, nargs="+", default=None)
    parser.add_argument("--fused", action="store_true", help="time the fused-prologue entries")
    parser.add_argument("--tilings", type=int, nargs="+", default=[0],
                        help="0 (the kernel's choice) and/or forced tilings: rows per warp + 10 * split-K "
                             "(1 2 4 11 14), or with --fused 100 * warps + rows")
    args = parser.parse_args()
    command = "python mllm-kernel/benchmarks/bench_gemv.py" + (" --fused" if args.fused else "")
    if args.fused:
        for model, layer, n, k in SHAPES:
            if layer in ("o", "lm_head"):  # no prologue in front of these
                continue
            for m in args.rows or [1, 2, 4, 8]:
                bench_fused_case(model, layer, n, k, m, args.tilings, args.out, command)
        return
    bw = copy_bandwidth(reps=40) / 1e9
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bw:.0f} GB/s")
    for model, layer, n, k in SHAPES:
        for m in args.rows or ROWS:
            bench_case(model, layer, n, k, m, bw, args.tilings, args.out, command)


if __name__ == "__main__":
    main()
