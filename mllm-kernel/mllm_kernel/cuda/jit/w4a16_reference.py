"""Pure-PyTorch references of w4a16_gemv and w4a16_gemm (tests, self-tests and the CPU fallback's
oracle): the int4 formula W[k, n] = (q - 8 - zero) * scale evaluated exactly in float64, rounded once
to the activation dtype, as the kernels round."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from mllm_kernel.cuda.jit.gemv_kernels import silu_mul_reference
from mllm_kernel.cuda.jit.w4a16_gemv import TILE_N, norm_tile_sums


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """[K/8, N] int32 words -> [K, N] int32 nibbles 0..15 (row 8j + i = bits 4i..4i+3 of row j)."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=qweight.device)
    nibbles = (qweight.unsqueeze(1) >> shifts.view(1, 8, 1)) & 0xF
    return nibbles.reshape(qweight.shape[0] * 8, qweight.shape[1])


def dequantize_exact(qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
                     group: int) -> torch.Tensor:
    """W [K, N] = (q - 8 - zero) * scale in float64, where every value is exact."""
    rows = torch.arange(qweight.shape[0] * 8, device=qweight.device) // group
    w = unpack_int4(qweight).double() - 8.0
    if zeros is not None:
        w = w - zeros.double()[rows]
    return w * scales.double()[rows]


def dequantize_reference(qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor], group: int,
                         dtype: torch.dtype) -> torch.Tensor:
    """W [K, N] as w4a16_gemm multiplies it: (q - 8 - zero) * scale, exact in float64, rounded once."""
    return dequantize_exact(qweight, scales, zeros, group).to(dtype)


def _add_bias_and_round(acc: torch.Tensor, bias: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """A float64 product plus bias, rounded once to ``dtype`` (the kernels' epilogue)."""
    return (acc + bias.double() if bias is not None else acc).to(dtype)


def w4a16_gemv_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: Optional[torch.Tensor],
    group: int,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Pure-PyTorch equivalent: the formula in float64 (exact products), rounded once to x's dtype."""
    return _add_bias_and_round(x.double() @ dequantize_exact(qweight, scales, zeros, group), bias, x.dtype)


def w4a16_gemm_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: Optional[torch.Tensor],
    group: int,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """w4a16_gemm in PyTorch: x times the rounded weights (``dequantize_reference``) in float64,
    plus bias, rounded once."""
    w = dequantize_reference(qweight, scales, zeros, group, x.dtype).double()
    return _add_bias_and_round(x.double() @ w, bias, x.dtype)


def w4a16_gemv_add_norm_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: Optional[torch.Tensor],
    group: int,
    residual: torch.Tensor,
    norm_weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    tile_n: int = TILE_N,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``w4a16_gemv_add_norm`` in PyTorch: (norm_weight * h, h, sums of h^2 per ``tile_n``-column tile)."""
    out = w4a16_gemv_reference(x, qweight, scales, zeros, group, bias)
    h = (out.float() + residual.reshape(out.shape).float()).to(x.dtype)
    scaled = (norm_weight.reshape(h.shape).float() * h.float()).to(x.dtype)
    return scaled, h, norm_tile_sums(h, tile_n)


def w4a16_gemv_normed_reference(
    scaled: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: Optional[torch.Tensor],
    group: int,
    sumsq: torch.Tensor,
    eps: float,
    bias: Optional[torch.Tensor] = None,
    gated: bool = False,
) -> torch.Tensor:
    """``w4a16_gemv_normed`` in PyTorch: the float64 product scaled by 1 / rms, rounded once (gated:
    each half rounded, then the SiLU-and-mul)."""
    k = scaled.shape[1]
    inv_rms = torch.rsqrt(sumsq.double().sum() / k + eps)
    # A float64 x keeps the reference's product in float64 (it rounds to x's dtype).
    product = w4a16_gemv_reference(scaled.double(), qweight, scales, zeros, group)
    out = _add_bias_and_round(product * inv_rms, bias, scaled.dtype)
    return silu_mul_reference(out) if gated else out


def w4a16_gemv_gated_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: Optional[torch.Tensor],
    group: int,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``w4a16_gemv(..., gated=True)`` in PyTorch: the reference product rounded to x's dtype, then
    its SiLU-and-mul (``gemv_kernels.silu_mul_reference``)."""
    return silu_mul_reference(w4a16_gemv_reference(x, qweight, scales, zeros, group, bias))
