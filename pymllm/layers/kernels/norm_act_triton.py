"""Triton kernels for RMSNorm (optionally fused with the residual add) and SiLU-and-mul.

Rounding follows the PyTorch reference ops step by step, so the results match them to the last
bit in most elements (at most one unit in the last place where float32 reductions differ):

- RMSNorm: normalise in float32, round to the activation dtype, then multiply by the weight in
  the activation dtype (the HF models' order; FlashInfer's rmsnorm multiplies in float32).
- fused add: ``x + residual`` is rounded to the activation dtype before it is normalised,
  exactly as ``residual = x + residual`` does in PyTorch.
- SiLU-and-mul: ``silu(gate)`` is rounded to the activation dtype before the multiply, as
  ``F.silu(gate) * up`` does.

Each program handles one row (rows on grid axis 0, which has no 65535 limit); row counts are
never kernel arguments, so changing the batch size does not trigger a recompile.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from pymllm.layers.kernels.pdl import enter_dependent, launch_options

_ACT_BLOCK = 1024


@triton.jit
def enter_with_norm_weight(w_ptr, n_cols, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    """An RMSNorm kernel's first statements: ``enter_dependent``, with the norm weight (columns
    [0, BLOCK), masked past n_cols) loaded between the launch of the next kernel and the wait. The
    weight is a parameter that no kernel of a step writes, so it may be read early; loaded after
    the wait it would follow the sum of squares' block barrier, a second memory round trip on
    the chain of a one-row launch (the compiler does not move loads across a barrier)."""
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
    cols = tl.arange(0, BLOCK)
    w = tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
    return w


@triton.jit
def rms_norm_row(x_ptr, res_ptr, w, res_out_ptr, row, x_stride, res_stride, res_out_stride, n_cols, eps,
                 HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    """(cols, mask, y) of row ``row``: y = RMSNorm(x [+ residual]) in x's dtype, rounded where the
    reference rounds (the residual sum, stored first where there is one, and the normalised row
    before the weight ``w``, from enter_with_norm_weight). Masked columns are 0. Shared by the
    RMSNorm kernel and the RMSNorm that quantizes its output
    (pymllm.quantization.kernels.int8_activation_triton)."""
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    dtype = x_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * res_stride + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(dtype)
        tl.store(res_out_ptr + row * res_out_stride + cols, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / n_cols
    normed = (xf * tl.rsqrt(var + eps)).to(dtype).to(tl.float32)
    return cols, mask, (w.to(tl.float32) * normed).to(dtype)


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    x_stride, res_stride, out_stride, res_out_stride,
    n_cols, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr,
):
    w = enter_with_norm_weight(w_ptr, n_cols, BLOCK, USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols, mask, y = rms_norm_row(x_ptr, res_ptr, w, res_out_ptr, row, x_stride, res_stride, res_out_stride,
                                 n_cols, eps, HAS_RESIDUAL, BLOCK)
    tl.store(out_ptr + row * out_stride + cols, y, mask=mask)


@triton.jit
def silu_and_mul_cols(x_row_ptr, cols, mask, d):
    """silu(gate) * up at columns ``cols`` of one row (gate at x_row_ptr[:d], up at [d:2d]), in
    x's dtype, rounded where the reference rounds (the activation, then the product); masked
    columns are 0. Shared by the SiLU-and-mul kernel and the one that quantizes its output
    (pymllm.quantization.kernels.int8_activation_triton)."""
    dtype = x_row_ptr.dtype.element_ty
    gate = tl.load(x_row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_row_ptr + d + cols, mask=mask, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    return (act * up).to(dtype)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, x_stride, out_stride, d, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    enter_dependent(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    y = silu_and_mul_cols(x_ptr + row * x_stride, cols, mask, d)
    tl.store(out_ptr + row * out_stride + cols, y, mask=mask)


def norm_num_warps(block: int) -> int:
    # About 16 elements per thread keeps the row in registers without spilling.
    return max(1, min(16, block // 512))


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    residual_out: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(rms_norm(x [+ residual]), x + residual or None); x, residual contiguous [..., n].

    Inputs are never written; ``out`` / ``residual_out`` may be given (tests poison them).
    """
    n = x.shape[-1]
    rows = x.numel() // n if n else 0
    out = torch.empty_like(x) if out is None else out
    if residual is not None and residual_out is None:
        residual_out = torch.empty_like(x)
    if rows == 0:
        return out, residual_out
    block = triton.next_power_of_2(n)
    has_res = residual is not None
    # Unused pointer arguments get x: any tensor of the right dtype will do.
    _rms_norm_kernel[(rows,)](
        x, residual if has_res else x, weight, out, residual_out if has_res else out,
        n, n, n, n, n, eps,
        HAS_RESIDUAL=has_res, BLOCK=block, num_warps=norm_num_warps(block), **launch_options(x.device, rows),
    )
    return out, residual_out


def silu_and_mul(x: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """silu(x[..., :d]) * x[..., d:] for contiguous x [..., 2d]."""
    d = x.shape[-1] // 2
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    out = torch.empty(x.shape[:-1] + (d,), dtype=x.dtype, device=x.device) if out is None else out
    if rows == 0 or d == 0:
        return out
    block = min(_ACT_BLOCK, triton.next_power_of_2(d))
    _silu_and_mul_kernel[(rows, triton.cdiv(d, block))](
        x, out, 2 * d, d, d, BLOCK=block, num_warps=max(1, block // 256), **launch_options(x.device, rows),
    )
    return out
