"""W4A16: the one checkpoint -> runtime repack, the PyTorch reference, and the GEMM dispatcher.

Checkpoint (compressed-tensors ``pack-quantized``, 4 bits):
  weight_packed [N, K/8] int32, word (n, j) holds w[n, 8j + i] + 8 in bits 4i..4i+3;
  weight_scale [N, K/G]; weight_zero_point [N/8, K/G] int32 (asymmetric), packed the same way
  along N. Runtime layout: see ``w4a16_triton`` (words transposed to [K/8, N], scales and
  unpacked zero points as [K/G, N]).

Dispatch: M <= 64 on SM80+ runs the fused Triton dequant-GEMM (decode is memory-bound and
reads the int4 weights once); larger M dequantizes the weight once into a scratch matrix and
uses cuBLAS, which is compute-bound anyway; everything else (CPU, odd shapes) uses the reference.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from pymllm.quantization.kernels.device import cuda_capability, triton_available

_SHIFTS = torch.arange(8, dtype=torch.int32) * 4


def _unpack_rows(words: torch.Tensor) -> torch.Tensor:
    """[R, C] int32 words -> [R, 8C] int32 nibbles (unsigned, 0..15), nibble i of word c at 8c + i."""
    nibbles = (words.unsqueeze(-1) >> _SHIFTS.to(words.device)) & 0xF
    return nibbles.reshape(words.shape[0], -1)


def repack_wna16(
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: Optional[torch.Tensor],
    dtype: torch.dtype,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Checkpoint tensors -> (qweight [K/8, N] int32, scales [K/G, N], zeros [K/G, N] or None)."""
    qweight = weight_packed.t().contiguous()
    scales = weight_scale.t().to(dtype).contiguous()
    zeros = None
    if weight_zero_point is not None:
        n = weight_scale.shape[0]
        unpacked = _unpack_rows(weight_zero_point.t().contiguous())[:, :n] - 8  # [K/G, N]
        zeros = unpacked.to(dtype).contiguous()
    return qweight, scales, zeros


def dequantize_wna16_reference(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor], group: int, dtype: torch.dtype
) -> torch.Tensor:
    """Dense W^T [K, N] of ``dtype`` from the runtime layout, in float32 then rounded once."""
    k = qweight.shape[0] * 8
    q = _unpack_rows(qweight.t().contiguous()).t().float() - 8.0  # [K, N]
    rows = torch.arange(k, device=qweight.device) // group
    if zeros is not None:
        q = q - zeros.float()[rows]
    return (q * scales.float()[rows]).to(dtype)


def w4a16_linear_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: Optional[torch.Tensor],
    group: int,
    bias: Optional[torch.Tensor],
) -> torch.Tensor:
    w = dequantize_wna16_reference(qweight, scales, zeros, group, x.dtype)
    out = x @ w
    return out + bias if bias is not None else out


def fast_path_supported(x: torch.Tensor, n: int, k: int, group: int) -> bool:
    """The capability check of the dispatcher: Triton, SM80+, fp16/bf16, dense rows, K tiles."""
    return (
        triton_available()
        and cuda_capability(x.device) >= (8, 0)
        and x.dtype in (torch.float16, torch.bfloat16)
        and x.stride(-1) == 1
        and k % 64 == 0
        and k % group == 0
        and n % 8 == 0
    )


def w4a16_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: Optional[torch.Tensor],
    group: int,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """x [M, K] @ W^T (+ bias) -> [M, N] in x.dtype, W in the runtime layout of ``repack_wna16``."""
    m, k = x.shape
    n = qweight.shape[1]
    if m == 0 or not fast_path_supported(x, n, k, group):
        return w4a16_linear_reference(x, qweight, scales, zeros, group, bias)
    from pymllm.quantization.kernels import w4a16_triton

    if m <= w4a16_triton.MAX_M:
        return w4a16_triton.w4a16_gemm_small_m(x, qweight, scales, zeros, group, bias)
    w = w4a16_triton.w4a16_dequantize(qweight, scales, zeros, group, x.dtype)
    return torch.addmm(bias, x, w) if bias is not None else x @ w
