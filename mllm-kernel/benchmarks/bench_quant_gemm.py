"""Quantized GEMMs (W8A8 int8, W4A16) against bf16 cuBLAS and torch._int_mm on Qwen3-8B layers.

    python mllm-kernel/benchmarks/bench_quant_gemm.py --output quant_gemm.jsonl [--sweep] [--sweep-large]
        [--m 128 2048] [--variants w4a16_dequant_cublas w4a16_triton_large_m]

One JSON line per (layer, M, variant): time, TFLOP/s, bytes moved, the HBM floor (bytes over
the measured device-to-device copy bandwidth) and the ratios to bf16 and to the floor. Then one
line per performance target (decode step at batch 1 summed over the four layers; W8A8 GEMM
rate at M = 2048). ``--sweep`` also times the small-M Triton kernels over a grid of tile
configs (rows of kind "sweep") to tune their defaults; ``--sweep-large`` times the large-M W4A16
kernel over tilings at the --m values.

Variants: bf16 (F.linear), int_mm (torch._int_mm alone, M padded to 17), w8a8_gemm_cutlass
(and w8a8_gemm_cutlass_sm80 on Hopper), w8a8_gemm_triton (M <= 64), w8a8_linear (per-token
quantization + dispatcher: what the model runs), per_token_quant, w4a16_triton (M <= 64),
w4a16_triton_large_m (M >= 16), w4a16_dequant_cublas, w4a16_cuda_gemv (mllm_kernel's GEMV, M <= 64),
w4a16_cuda_gemm (mllm_kernel's tensor-core GEMM, its planned tiles), w4a16_linear (dispatcher). Times are medians of triton.testing.do_bench,
which flushes L2 between runs so weights come from HBM as in a real decode step.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, TextIO

import torch
import torch.nn.functional as F
import triton
import triton.testing

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "mllm-kernel")]

from mllm_kernel.cuda.jit import int8_scaled_mm_cutlass as cutlass_mm  # noqa: E402
from mllm_kernel.cuda.jit.w4a16_gemm import w4a16_gemm  # noqa: E402
from mllm_kernel.cuda.jit.w4a16_gemv import w4a16_gemv  # noqa: E402
from pymllm.quantization.kernels import w4a16_triton, w8a8_triton  # noqa: E402
from pymllm.quantization.kernels.int8_activation_triton import per_token_quant_int8  # noqa: E402
from pymllm.quantization.kernels.int8_scaled_mm import int8_scaled_mm  # noqa: E402
from pymllm.quantization.kernels.triton_common import SmallMConfig  # noqa: E402
from pymllm.quantization.kernels.w4a16 import GEMV_MAX_M, w4a16_linear  # noqa: E402

# Qwen3-8B: hidden 4096, 32 q heads and 8 kv heads of 128, intermediate 12288.
LAYERS = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (24576, 4096), "down": (4096, 12288)}
DECODE_M = [1, 2, 4, 8, 16, 32, 64]
PREFILL_M = [2048]
GROUP = 128
TARGETS = {
    "w4a16_decode_bs1_vs_floor": ("<=", 1.4),
    "w4a16_decode_bs1_speedup_vs_bf16": (">=", 2.5),
    "w8a8_decode_bs1_vs_floor": ("<=", 1.3),
    "w8a8_gemm_m2048_rate_vs_bf16": (">=", 1.5),
}


def bench(fn: Callable[[], object]) -> float:
    """Median seconds per call."""
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e-3


def copy_bandwidth(device: torch.device) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write bytes counted)."""
    src = torch.empty(1 << 28, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / bench(lambda: dst.copy_(src))


class Layer:
    """Random weights of one layer in every format, plus the activations for one M."""

    def __init__(self, n: int, k: int, device: torch.device):
        self.n, self.k = n, k
        self.w_bf16 = (torch.randn(n, k, device=device) * 0.02).bfloat16()
        self.w_int8 = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=device)
        self.w_scale = torch.rand(n, device=device) * 1e-3 + 1e-4
        self.qweight = torch.randint(-(2**31), 2**31 - 1, (k // 8, n), dtype=torch.int32, device=device)
        self.scales = (torch.rand(k // GROUP, n, device=device) * 0.01 + 0.001).bfloat16()

    def activations(self, m: int):
        x = torch.randn(m, self.k, device=self.w_bf16.device).bfloat16()
        a, sa = per_token_quant_int8(x)
        return x, a, sa


def _w8a8_linear(x: torch.Tensor, b: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """The whole W8A8 linear of a decode/prefill step: quantize the activation, then the GEMM."""
    q, scale = per_token_quant_int8(x)
    return int8_scaled_mm(q, b, scale, w_scale, torch.bfloat16)


def variants(layer: Layer, m: int, x, a, sa, sm90: bool) -> Dict[str, tuple]:
    """name -> (callable, bytes it must move at least)."""
    n, k = layer.n, layer.k
    b = layer.w_int8.t()
    act, out = m * k * 2, m * n * 2
    int8_bytes = n * k + act // 2 + out
    int4_bytes = n * k // 2 + layer.scales.numel() * 2 + act + out
    a17 = F.pad(a, (0, 0, 0, max(0, 17 - m)))
    table = {
        "bf16": (lambda: F.linear(x, layer.w_bf16), n * k * 2 + act + out),
        "int_mm": (lambda: torch._int_mm(a17, b), n * k + a17.numel() + a17.shape[0] * n * 4),
        "w8a8_linear": (lambda: _w8a8_linear(x, b, layer.w_scale), n * k + act + out),
        "per_token_quant": (lambda: per_token_quant_int8(x), act + act // 2),
        "w4a16_dequant_cublas": (
            lambda: x @ w4a16_triton.w4a16_dequantize(layer.qweight, layer.scales, None, GROUP, torch.bfloat16),
            int4_bytes),
        "w4a16_linear": (lambda: w4a16_linear(x, layer.qweight, layer.scales, None, GROUP), int4_bytes),
    }
    if cutlass_mm.unavailable_reason() is None:
        table["w8a8_gemm_cutlass"] = (lambda: cutlass_mm.int8_scaled_mm(a, b, sa, layer.w_scale, torch.bfloat16),
                                      int8_bytes)
        if sm90:
            table["w8a8_gemm_cutlass_sm80"] = (
                lambda: cutlass_mm.int8_scaled_mm_sm80(a, b, sa, layer.w_scale, torch.bfloat16), int8_bytes)
    table["w4a16_cuda_gemm"] = (
        lambda: w4a16_gemm(x, layer.qweight, layer.scales, None, GROUP, validate=False), int4_bytes)
    if m <= GEMV_MAX_M:
        table["w4a16_cuda_gemv"] = (
            lambda: w4a16_gemv(x, layer.qweight, layer.scales, None, GROUP, validate=False), int4_bytes)
    if m >= 16:
        table["w4a16_triton_large_m"] = (
            lambda: w4a16_triton.w4a16_gemm_large_m(x, layer.qweight, layer.scales, None, GROUP), int4_bytes)
    if m <= w8a8_triton.MAX_M:
        table["w8a8_gemm_triton"] = (
            lambda: w8a8_triton.int8_scaled_mm_small_m(a, b, sa, layer.w_scale, torch.bfloat16), int8_bytes)
        table["w4a16_triton"] = (
            lambda: w4a16_triton.w4a16_gemm_small_m(x, layer.qweight, layer.scales, None, GROUP), int4_bytes)
    return table


def emit(row: dict, sink: TextIO) -> None:
    sink.write(json.dumps(row) + "\n")
    sink.flush()
    print(json.dumps(row), flush=True)


def wanted(variant: str, only: Optional[List[str]]) -> bool:
    """Whether --variants selects ``variant``: all without it; bf16, the baseline of every ratio, always."""
    return not only or variant in only or variant == "bf16"


def run_gemms(device: torch.device, m_values: List[int], bandwidth: float, base: dict, sink: TextIO,
              only: Optional[List[str]] = None) -> List[dict]:
    rows = []
    sm90 = cutlass_mm.variant_for(device) == "sm90"
    for name, (n, k) in LAYERS.items():
        layer = Layer(n, k, device)
        for m in m_values:
            x, a, sa = layer.activations(m)
            timed = {}
            for variant, (fn, nbytes) in variants(layer, m, x, a, sa, sm90).items():
                if not wanted(variant, only):
                    continue
                seconds = bench(fn)
                timed[variant] = seconds
                floor = nbytes / bandwidth
                row = {**base, "kind": "gemm", "layer": name, "m": m, "n": n, "k": k, "variant": variant,
                       "time_us": seconds * 1e6, "tflops": 2 * m * n * k / seconds / 1e12,
                       "bytes": nbytes, "floor_us": floor * 1e6, "vs_floor": seconds / floor}
                rows.append(row)
            for row in rows[-len(timed):]:
                row["speedup_vs_bf16"] = timed["bf16"] / row["time_us"] * 1e6
                emit(row, sink)
    return rows


def summarize(rows: List[dict], base: dict, sink: TextIO) -> None:
    def total(variant: str, key: str, m: int = 1) -> Optional[float]:
        picked = [r[key] for r in rows if r["variant"] == variant and r["m"] == m]
        return sum(picked) if len(picked) == len(LAYERS) else None

    def rate(variant: str, m: int) -> Optional[float]:
        picked = [r for r in rows if r["variant"] == variant and r["m"] == m]
        if len(picked) != len(LAYERS):
            return None
        return sum(2 * r["m"] * r["n"] * r["k"] for r in picked) / sum(r["time_us"] for r in picked)

    values = {}
    if total("w4a16_linear", "time_us") is not None:
        values["w4a16_decode_bs1_vs_floor"] = total("w4a16_linear", "time_us") / total("w4a16_linear", "floor_us")
        values["w4a16_decode_bs1_speedup_vs_bf16"] = total("bf16", "time_us") / total("w4a16_linear", "time_us")
    if total("w8a8_linear", "time_us") is not None:
        values["w8a8_decode_bs1_vs_floor"] = total("w8a8_linear", "time_us") / total("w8a8_linear", "floor_us")
    if rate("w8a8_gemm_cutlass", 2048) is not None:
        values["w8a8_gemm_m2048_rate_vs_bf16"] = rate("w8a8_gemm_cutlass", 2048) / rate("bf16", 2048)
    for name, value in values.items():
        op, bound = TARGETS[name]
        ok = value <= bound if op == "<=" else value >= bound
        emit({**base, "kind": "target", "name": name, "value": value, "target": f"{op} {bound}", "pass": ok}, sink)


def sweep_configs(m: int) -> List[SmallMConfig]:
    configs = []
    if m == 1:
        for bn, bk, split in itertools.product((16, 32, 64, 128), (128, 256, 512), (1, 2, 4, 8)):
            configs.append(SmallMConfig(1, bn, bk, split, False, 4, 3))
    for bn, bk, split, stages in itertools.product((32, 64, 128), (64, 128, 256), (1, 2, 4), (3, 4)):
        configs.append(SmallMConfig(max(16, triton.next_power_of_2(m)), bn, bk, split, True, 4, stages))
    return configs


def run_sweep(device: torch.device, base: dict, sink: TextIO) -> None:
    for name in ("o", "gate_up", "down"):
        n, k = LAYERS[name]
        layer = Layer(n, k, device)
        b = layer.w_int8.t()
        for m in (1, 16):
            x, a, sa = layer.activations(m)
            for cfg in sweep_configs(m):
                if k % (cfg.block_k * cfg.split_k):
                    continue
                for kernel, fn in (
                    ("w4a16_triton", lambda: w4a16_triton.w4a16_gemm_small_m(x, layer.qweight, layer.scales, None,
                                                                              GROUP, config=cfg)),
                    ("w8a8_gemm_triton", lambda: w8a8_triton.int8_scaled_mm_small_m(a, b, sa, layer.w_scale,
                                                                                     torch.bfloat16, config=cfg)),
                ):
                    emit({**base, "kind": "sweep", "layer": name, "m": m, "n": n, "k": k, "variant": kernel,
                          "config": cfg.__dict__, "time_us": bench(fn) * 1e6}, sink)


# Large-M tilings (block_m, block_n, block_k, num_warps, num_stages) for --sweep-large.
LARGE_M_TILINGS = [
    (64, 64, 128, 4, 4), (64, 128, 64, 4, 4), (64, 128, 128, 4, 3), (64, 256, 64, 8, 3),
    (128, 64, 64, 4, 4), (128, 128, 64, 4, 4), (128, 128, 64, 8, 3), (128, 128, 128, 8, 3),
    (128, 256, 64, 8, 3), (256, 128, 64, 8, 3),
]


def large_m_sweep_configs(m: int, n: int, k: int, sms: int) -> List[w4a16_triton.LargeMConfig]:
    """LARGE_M_TILINGS at M rows of an N x K layer, each unsplit and split 2 or 4 ways along K
    where K divides and the split tiles stay within two per SM."""
    configs = []
    for bm, bn, bk, warps, stages in LARGE_M_TILINGS:
        tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
        for split in (1, 2, 4):
            if k % (bk * split) == 0 and (split == 1 or tiles * split <= 2 * sms):
                configs.append(w4a16_triton.LargeMConfig(bm, bn, bk, split, 8, warps, stages))
    return configs


def run_sweep_large(device: torch.device, m_values: List[int], base: dict, sink: TextIO) -> None:
    """The large-M kernel over ``large_m_sweep_configs`` at each M."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    for name, (n, k) in LAYERS.items():
        layer = Layer(n, k, device)
        for m in m_values:
            x = layer.activations(m)[0]
            for cfg in large_m_sweep_configs(m, n, k, sms):
                fn = lambda: w4a16_triton.w4a16_gemm_large_m(x, layer.qweight, layer.scales, None, GROUP,
                                                             config=cfg)
                try:
                    seconds = bench(fn)
                except Exception as error:  # e.g. out of shared memory for this tiling
                    emit({**base, "kind": "sweep", "layer": name, "m": m, "variant": "w4a16_triton_large_m",
                          "config": cfg.__dict__, "error": str(error)[:200]}, sink)
                    continue
                emit({**base, "kind": "sweep", "layer": name, "m": m, "n": n, "k": k,
                      "variant": "w4a16_triton_large_m", "config": cfg.__dict__, "time_us": seconds * 1e6,
                      "tflops": 2 * m * n * k / seconds / 1e12}, sink)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default="bench_quant_gemm.jsonl", help="JSONL file to append rows to.")
    parser.add_argument("--m", type=int, nargs="+", default=DECODE_M + PREFILL_M, help="M values (tokens).")
    parser.add_argument("--sweep", action="store_true", help="Also time the small-M Triton kernels over tile grids.")
    parser.add_argument("--variants", nargs="+", help="Time only these variants (and bf16, the baseline).")
    parser.add_argument("--sweep-large", action="store_true",
                        help="Also time the large-M W4A16 Triton kernel over tilings at the --m values.")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_quant_gemm needs a CUDA device", file=sys.stderr)
        return 1
    device = torch.device("cuda")
    torch.manual_seed(0)
    major, minor = torch.cuda.get_device_capability(device)
    bandwidth = copy_bandwidth(device)
    base = {"device": torch.cuda.get_device_name(device), "capability": f"{major}.{minor}",
            "torch": torch.__version__, "triton": triton.__version__, "copy_bandwidth_gbps": bandwidth / 1e9,
            "cutlass": cutlass_mm.unavailable_reason() or "available"}
    with open(args.output, "a") as sink:
        rows = run_gemms(device, args.m, bandwidth, base, sink, args.variants)
        summarize(rows, base, sink)
        if args.sweep:
            run_sweep(device, base, sink)
        if args.sweep_large:
            run_sweep_large(device, args.m, base, sink)
    return 0


if __name__ == "__main__":
    sys.exit(main())
