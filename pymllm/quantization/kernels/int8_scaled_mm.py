"""The W8A8 GEMM dispatcher: ``out = (a @ b) * scale_a * scale_b (+ bias)`` on int8 operands.

Paths, in order of preference, each behind an explicit check:
  1. M <= SMALL_M_MAX on SM80+ with Triton: the split-K Triton kernel; decode is memory-bound
     and a 64- or 128-row tensor-core tile would leave most SMs idle on N = 4096 layers.
  2. SM80+ with CUTLASS headers and nvcc: the CUTLASS kernel (mllm_kernel), scales and bias
     fused into its epilogue.
  3. Any CUDA GPU: ``torch._int_mm`` (cuBLASLt int8) and the scaling in PyTorch. It refuses
     M <= 16, so short inputs are padded to 17 rows.
  4. CPU and everything else: a float matmul (exact up to float32 rounding).
"""

from __future__ import annotations

import functools
import logging
from typing import Optional

import torch

from pymllm.quantization.kernels.device import cuda_capability, triton_available

logger = logging.getLogger(__name__)

SMALL_M_MAX = 16
_INT_MM_MIN_M = 17


@functools.lru_cache(maxsize=None)
def cutlass_unavailable_reason() -> Optional[str]:
    """None when the CUTLASS kernel can be built here; else why not (logged once by the caller)."""
    try:
        from mllm_kernel.cuda.jit import int8_scaled_mm_cutlass
    except ImportError as error:  # mllm_kernel or tvm_ffi missing
        return f"mllm_kernel is not importable ({error})"
    return int8_scaled_mm_cutlass.unavailable_reason()


@functools.lru_cache(maxsize=None)
def _warn_fallback(reason: str) -> None:
    logger.warning("int8_scaled_mm: CUTLASS kernel unavailable (%s); using torch._int_mm", reason)


def cutlass_builds(device: torch.device, out_dtype: torch.dtype) -> list:
    """The CUTLASS build this device and output dtype use, as build_in_parallel steps: none where
    the kernel does not run (the fallback's reason is logged once)."""
    if cuda_capability(device) < (8, 0) or out_dtype not in (torch.float16, torch.bfloat16):
        return []
    reason = cutlass_unavailable_reason()
    if reason is not None:
        _warn_fallback(reason)
        return []
    from mllm_kernel.cuda.jit import int8_scaled_mm_cutlass

    step = int8_scaled_mm_cutlass.build_step(device, out_dtype)
    return [] if step is None else [step]


def prepare_int8_scaled_mm(device: torch.device, out_dtype: torch.dtype) -> None:
    """Build (or load from the disk cache) the CUTLASS kernel this device will use, so the
    first-use compile happens while the model loads rather than inside the first request."""
    for step in cutlass_builds(device, out_dtype):
        step.run()


def int8_scaled_mm_float(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
                         out_dtype: torch.dtype, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Float32 matmul of the int8 values, then the scales: the CPU path."""
    out = (a.float() @ b.float()) * scale_a.reshape(-1, 1) * scale_b.reshape(1, -1)
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def int8_scaled_mm_torch(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
                         out_dtype: torch.dtype, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """cuBLASLt int8 GEMM through ``torch._int_mm`` (exact int32), scales applied in float32."""
    m = a.shape[0]
    padded = a if m >= _INT_MM_MIN_M else torch.nn.functional.pad(a, (0, 0, 0, _INT_MM_MIN_M - m))
    acc = torch._int_mm(padded, b)[:m]
    out = acc.float() * scale_a.reshape(-1, 1) * scale_b.reshape(1, -1)
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def _cutlass_shapes_ok(a: torch.Tensor, b: torch.Tensor, scale_b: torch.Tensor, out_dtype: torch.dtype,
                       bias: Optional[torch.Tensor]) -> bool:
    k, n = b.shape
    return (
        out_dtype in (torch.float16, torch.bfloat16)
        and (bias is None or (bias.dtype == out_dtype and bias.is_contiguous()))
        and scale_b.is_contiguous()
        and k % 16 == 0
        and n % 8 == 0
        and a.stride(1) == 1
        and b.stride(0) == 1
        and a.stride(0) % 16 == 0
        and b.stride(1) % 16 == 0
    )


def choose_int8_gemm(m: int, is_cuda: bool, sm80: bool, cutlass_ok: bool, small_m_triton_ok: bool,
                     int_mm_shapes_ok: bool) -> str:
    """Which W8A8 GEMM runs. Measured on an H200 (Qwen3-8B layers, docs/perf): the CUTLASS SM90
    kernel beats bf16 cuBLAS at every M, M = 1 included (18 us vs 23 us for qkv), while the
    split-K Triton kernel took 73-174 us at M = 1; so Triton serves small M only without CUTLASS."""
    if not is_cuda or m == 0:
        return "float"
    if sm80 and cutlass_ok:
        return "cutlass"
    if sm80 and m <= SMALL_M_MAX and small_m_triton_ok:
        return "triton_small_m"
    if int_mm_shapes_ok:
        return "int_mm"
    return "float"


def int8_scaled_mm(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
                   out_dtype: torch.dtype, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """a int8 [M, K] row-major, b int8 [K, N] column-major, scale_a fp32 [M, 1], scale_b fp32 [N]
    (or [1, N]), bias [N] of ``out_dtype`` -> [M, N] of ``out_dtype``."""
    m, k = a.shape
    n = b.shape[1]
    is_cuda = a.is_cuda
    sm80 = is_cuda and cuda_capability(a.device) >= (8, 0)
    cutlass_ok = False
    if sm80 and _cutlass_shapes_ok(a, b, scale_b, out_dtype, bias):
        reason = cutlass_unavailable_reason()
        cutlass_ok = reason is None
        if reason is not None:
            _warn_fallback(reason)
    small_m_ok = False
    if sm80 and not cutlass_ok and m <= SMALL_M_MAX and triton_available() and out_dtype in (torch.float16, torch.bfloat16):
        from pymllm.quantization.kernels import w8a8_triton

        small_m_ok = (w8a8_triton.supports(m, n, k) and a.stride(1) == 1 and b.stride(0) == 1
                      and scale_a.is_contiguous())
    choice = choose_int8_gemm(m, is_cuda, sm80, cutlass_ok, small_m_ok, k % 8 == 0 and n % 8 == 0)
    if choice == "cutlass":
        from mllm_kernel.cuda.jit.int8_scaled_mm_cutlass import int8_scaled_mm as cutlass_int8_scaled_mm

        return cutlass_int8_scaled_mm(a, b, scale_a, scale_b, out_dtype, bias)
    if choice == "triton_small_m":
        from pymllm.quantization.kernels import w8a8_triton

        return w8a8_triton.int8_scaled_mm_small_m(a, b, scale_a, scale_b, out_dtype, bias)
    if choice == "int_mm":
        return int8_scaled_mm_torch(a, b, scale_a, scale_b, out_dtype, bias)
    return int8_scaled_mm_float(a, b, scale_a, scale_b, out_dtype, bias)
