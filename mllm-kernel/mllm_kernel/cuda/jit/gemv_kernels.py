"""gemv / gemv_w8a8: weight-streaming GEMV for decode batches of 1..8 rows (CUDA only).

``gemv(x, w, bias)`` is ``x @ w.T + bias`` for fp16/bf16 weights; ``gemv_w8a8(x_q, x_scale,
w, w_scale, out_dtype, bias)`` is the W8A8 GEMM (int8 activations quantized per token
beforehand, int8 per-channel weights) with dp4a dot products. Both read each weight
once with 16-byte streaming loads and reduce in registers: one launch, no workspace, CUDA-graph
safe. Larger batches belong to tensor-core GEMMs (cuBLAS / CUTLASS); the caller dispatches.
"""

from __future__ import annotations

from typing import Optional

import torch

from mllm_kernel.checks import check_same_device, check_size, check_tensor
from mllm_kernel.jit_utils import JitKernel, jit

MAX_ROWS = 8
ACT_DTYPES = (torch.float16, torch.bfloat16)


def _check_common(op: str, x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor],
                  w_dtypes: tuple, k_multiple: int, out_dtype: torch.dtype) -> None:
    check_tensor(op, "w", w, ndim=2, dtypes=w_dtypes, shape_hint="[N, K]")
    tensors = {"x": x, "w": w}
    if bias is not None:
        check_tensor(op, "bias", bias, ndim=1, dtypes=(out_dtype,), shape_hint="[N]")
        check_size(op, "bias", bias, 0, w.shape[0], "N of w")
        if not bias.is_contiguous():
            raise ValueError(f"{op}: bias must be contiguous")
        tensors["bias"] = bias
    check_same_device(op, tensors)
    if not 1 <= x.shape[0] <= MAX_ROWS:
        raise ValueError(f"{op}: x must have 1..{MAX_ROWS} rows, got {x.shape[0]}")
    check_size(op, "x", x, 1, w.shape[1], "K of w")
    if w.shape[1] % k_multiple:
        raise ValueError(f"{op}: K ({w.shape[1]}) must be a multiple of {k_multiple}")
    if not w.is_contiguous():
        raise ValueError(f"{op}: w must be contiguous [N, K]")
    if x.stride(1) != 1 or (x.stride(0) * x.element_size()) % 16:
        raise ValueError(f"{op}: x needs unit inner stride and a row stride of a multiple of 16 bytes")
    if x.data_ptr() % 16 or w.data_ptr() % 16:
        raise ValueError(f"{op}: x and w must be 16-byte aligned")


def _require_cuda(op: str, x: torch.Tensor) -> None:
    # Checked last, so shape mistakes are reported the same way on every device.
    if x.device.type != "cuda":
        raise ValueError(f"{op}: CUDA only, got tensors on {x.device}; use {op}_reference")


@jit("gemv", entry="mllm_kernel::gemv", cuda_sources=["cuda/csrc/gemv/gemv.cuh"])
def gemv(kernel: JitKernel, x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [M, K] fp16/bf16 (M <= 8) @ w [N, K]^T (+ bias [N]) -> [M, N] in x's dtype."""
    check_tensor("gemv", "x", x, ndim=2, dtypes=ACT_DTYPES, shape_hint="[M, K]")
    _check_common("gemv", x, w, bias, (x.dtype,), 8, x.dtype)
    _require_cuda("gemv", x)
    y = torch.empty((x.shape[0], w.shape[0]), dtype=x.dtype, device=x.device)
    kernel[x.dtype](x, w, bias, y)
    return y


@jit("gemv_w8a8", entry="mllm_kernel::gemv_w8a8", cuda_sources=["cuda/csrc/gemv/gemv.cuh"])
def gemv_w8a8(kernel: JitKernel, x_q: torch.Tensor, x_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
              out_dtype: torch.dtype, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """W8A8 GEMM for 1..8 rows: x_q int8 [M, K] with per-row float32 scales x_scale ([M] or
    [M, 1], as per_token_quant_int8 returns), w int8 [N, K], w_scale float32 [N] ->
    ``(x_q @ w.T) * x_scale * w_scale (+ bias)`` in ``out_dtype`` (fp16/bf16), with exact int32
    products and the float32 scaling in that order.
    """
    op = "gemv_w8a8"
    if out_dtype not in ACT_DTYPES:
        raise TypeError(f"{op}: out_dtype must be float16 or bfloat16, got {out_dtype}")
    check_tensor(op, "x_q", x_q, ndim=2, dtypes=(torch.int8,), shape_hint="[M, K]")
    _check_common(op, x_q, w, bias, (torch.int8,), 16, out_dtype)
    check_tensor(op, "w_scale", w_scale, ndim=1, dtypes=(torch.float32,), shape_hint="[N]")
    check_size(op, "w_scale", w_scale, 0, w.shape[0], "N of w")
    if x_scale.dtype != torch.float32 or x_scale.numel() != x_q.shape[0] or not x_scale.is_contiguous():
        raise ValueError(f"{op}: x_scale must be a contiguous float32 tensor with one scale per row of x_q")
    for name, t in (("x_scale", x_scale), ("w_scale", w_scale)):
        if t.device != x_q.device or not t.is_contiguous():
            raise ValueError(f"{op}: {name} must be contiguous and on x_q's device")
    _require_cuda(op, x_q)
    y = torch.empty((x_q.shape[0], w.shape[0]), dtype=out_dtype, device=x_q.device)
    kernel[out_dtype](x_q, x_scale, w, w_scale, bias, y)
    return y


def gemv_reference(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """float32 product rounded once to x's dtype: what the kernel computes, up to summation order."""
    out = x.float() @ w.float().t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def gemv_w8a8_reference(x_q: torch.Tensor, x_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                        out_dtype: torch.dtype, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Exact integer product (float64 holds it exactly for any K served), float32 scaling."""
    acc = (x_q.double() @ w.double().t()).float()
    out = acc * x_scale.reshape(-1, 1).float() * w_scale.reshape(1, -1)
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)
