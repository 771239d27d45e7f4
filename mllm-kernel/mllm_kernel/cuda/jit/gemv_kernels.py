"""Weight-streaming GEMV for decode batches of 1..8 rows (CUDA only), plain and with fused prologues.

Plain entries:

- ``gemv(x, w, bias=None) -> y``: ``x @ w.T + bias`` for fp16/bf16 weights.
- ``gemv_w8a8(x_q, x_scale, w, w_scale, out_dtype, bias=None) -> y``: the W8A8 GEMM (int8
  activations quantized per token beforehand, int8 per-channel weights) on dp4a.
- ``gemv_gated_silu(x, w, bias=None) -> y``: a stacked gate/up projection (w [2N, K]) with the
  SiLU-and-mul as its epilogue, ``silu(x @ w[:N].T) * (x @ w[N:].T)``: the gate/up output never
  reaches memory and the SiLU-and-mul launch is gone (gemv_gated.cuh).

Fused entries compute the GEMV's activation ``a`` inside the kernel from the layer's input, so a
decode step launches one kernel where it launched two or three:

- ``rmsnorm_gemv(x, residual, norm_weight, eps, w, bias=None) -> (y, residual_out)``:
  ``a = RMSNorm(x [+ residual]) * norm_weight``, ``y = a @ w.T + bias``; ``residual_out`` is
  ``x + residual`` (rounded to x's dtype) when a residual is given, else None.
- ``silu_mul_gemv(x, w, bias=None) -> y``: ``x = [gate | up]`` of width 2K,
  ``a = silu(gate) * up``.
- ``gemv_w8a8_dynamic(x, w, w_scale, out_dtype, bias=None, *, prologue="none" | "rmsnorm" |
  "silu_mul", residual=None, norm_weight=None, eps=1e-6) -> y`` (``(y, residual_out)`` for
  "rmsnorm"): the W8A8 GEMV from fp16/bf16 activations; ``a`` (x itself, or a prologue's output)
  is quantized per token in the kernel as per_token_quant_int8_reference defines it (true
  float32 divisions; see _per_token_quant_int8_reference), and the result equals ``gemv_w8a8``
  on those quantized rows bit for bit.

The fused activation is rounded step by step as pymllm's Triton norm / SiLU kernels round it,
with the same approximate exp / division instructions (see gemv_prologue.cuh): the SiLU-and-mul
activation is _silu_and_mul_kernel's bit for bit; the RMSNorm one differs only through the order
of the float32 sum of squares, which can move an element of ``a`` by one unit in the last place.
Each ``*_reference`` function is the PyTorch version of its entry (with PyTorch's exp and
division, so also within one unit in the last place of ``a``).

All entries read each weight once with 16-byte streaming loads and reduce in registers: one
launch, no workspace, CUDA-graph safe. On SM90+ they launch as programmatic dependents
(mllm_kernel.pdl): the first weight loads are issued before the wait for the previous kernel.
Larger batches belong to tensor-core GEMMs (cuBLAS / CUTLASS); the caller dispatches. The C++
templates take the activation dtype and, for the fused entries, the prologue (``PROLOGUES``: 0
none, 1 rmsnorm, 2 silu_mul) as template arguments, so each combination is a small library
compiled on first use (kernel names "gemv_prologue" for the dense fused entries,
"gemv_w8a8_dynamic").

Every block of a fused kernel computes the whole activation (its rows span all of K), so the
fusion pays off where that is cheap next to the weight stream. On an H200 (bench_gemv.py
--fused: CUDA graph, cold L2, against pymllm's Triton kernel + the plain GEMV), the dense fused
entries are as fast or faster at M = 1 for every Qwen3-0.6B and 8B layer (0.06-2.8 us saved),
and gemv_w8a8_dynamic at M = 1-2 for the 0.6B qkv / gate_up layers (0.7-1 us); with more rows
or longer rows the unfused pair is faster (up to 4x for W8A8 at 8B, M = 8), so callers should
dispatch on measurements. The fused entries take a keyword ``_tiling`` (0: the kernel's choice;
``100 * warps + rows``, e.g. 804, forces a compiled tiling) for such benchmarks.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from mllm_kernel.checks import check_same_device, check_size, check_tensor
from mllm_kernel.jit_utils import BuildStep, JitKernel, jit
from mllm_kernel.pdl import use_pdl

MAX_ROWS = 8
# Compiled tilings of the plain entries (``_tiling``): rows per warp + 10 * split-K; 0 lets the
# kernel choose by its occupancy rule.
TILINGS = (4, 2, 1, 14, 11)
# gemv_gated_silu's tilings: weight rows per warp (whole gate/up pairs) + 10 * split-K.
GATED_TILINGS = (4, 2, 14, 12)
ACT_DTYPES = (torch.float16, torch.bfloat16)
# The C++ prologue template argument (PrologueKind in gemv_prologue.cuh).
PROLOGUES = {"none": 0, "rmsnorm": 1, "silu_mul": 2}
# per_token_quant_int8: scale = max(max|a|, _MIN_ABSMAX) / _HALF_RANGE.
_MIN_ABSMAX = 1e-10
_HALF_RANGE = 127.5


def _check_common(op: str, x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor],
                  w_dtypes: tuple, k_multiple: int, out_dtype: torch.dtype, x_width: int = 1) -> None:
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
    check_size(op, "x", x, 1, x_width * w.shape[1], "K of w" if x_width == 1 else "2 * K of w")
    if w.shape[1] % k_multiple:
        raise ValueError(f"{op}: K ({w.shape[1]}) must be a multiple of {k_multiple}")
    if not w.is_contiguous():
        raise ValueError(f"{op}: w must be contiguous [N, K]")
    if x.stride(1) != 1 or (x.stride(0) * x.element_size()) % 16:
        raise ValueError(f"{op}: x needs unit inner stride and a row stride of a multiple of 16 bytes")
    if x.data_ptr() % 16 or w.data_ptr() % 16:
        raise ValueError(f"{op}: x and w must be 16-byte aligned")


def _check_tiling(op: str, tiling: int, compiled: Tuple[int, ...] = TILINGS) -> None:
    if isinstance(tiling, bool) or tiling not in (0, *compiled):
        raise ValueError(f"{op}: _tiling must be 0 or one of {compiled}, got {tiling!r}")


def _require_cuda(op: str, x: torch.Tensor) -> None:
    # Checked last, so shape mistakes are reported the same way on every device.
    if x.device.type != "cuda":
        raise ValueError(f"{op}: CUDA only, got tensors on {x.device}; use {op}_reference")


@jit("gemv", entry="mllm_kernel::gemv", cuda_sources=["cuda/csrc/gemv/gemv.cuh"])
def gemv(kernel: JitKernel, x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
         _tiling: int = 0) -> torch.Tensor:
    """x [M, K] fp16/bf16 (M <= 8) @ w [N, K]^T (+ bias [N]) -> [M, N] in x's dtype. ``_tiling``
    forces one of ``TILINGS`` (0: the kernel's own choice)."""
    check_tensor("gemv", "x", x, ndim=2, dtypes=ACT_DTYPES, shape_hint="[M, K]")
    _check_common("gemv", x, w, bias, (x.dtype,), 8, x.dtype)
    _check_tiling("gemv", _tiling)
    _require_cuda("gemv", x)
    y = torch.empty((x.shape[0], w.shape[0]), dtype=x.dtype, device=x.device)
    kernel[x.dtype](x, w, bias, y, int(_tiling), use_pdl(x.device))
    return y


@jit("gemv_w8a8", entry="mllm_kernel::gemv_w8a8", cuda_sources=["cuda/csrc/gemv/gemv.cuh"])
def gemv_w8a8(kernel: JitKernel, x_q: torch.Tensor, x_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
              out_dtype: torch.dtype, bias: Optional[torch.Tensor] = None, *, _tiling: int = 0) -> torch.Tensor:
    """W8A8 GEMM for 1..8 rows: x_q int8 [M, K] with per-row float32 scales x_scale ([M] or
    [M, 1], as per_token_quant_int8 returns), w int8 [N, K], w_scale float32 [N] ->
    ``(x_q @ w.T) * x_scale * w_scale (+ bias)`` in ``out_dtype`` (fp16/bf16), with exact int32
    products and the float32 scaling in that order. ``_tiling`` as in ``gemv``.
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
    _check_tiling(op, _tiling)
    _require_cuda(op, x_q)
    y = torch.empty((x_q.shape[0], w.shape[0]), dtype=out_dtype, device=x_q.device)
    kernel[out_dtype](x_q, x_scale, w, w_scale, bias, y, int(_tiling), use_pdl(x_q.device))
    return y


@jit("gemv_gated_silu", entry="mllm_kernel::gemv_gated_silu", cuda_sources=["cuda/csrc/gemv/gemv_gated.cuh"])
def gemv_gated_silu(kernel: JitKernel, x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                    _tiling: int = 0) -> torch.Tensor:
    """SwiGLU of a stacked gate/up projection in one kernel: w [2N, K] holds the gate rows, then
    the up rows; ``g, u = x @ w.T (+ bias)`` split in halves, each rounded to x's dtype, and
    ``silu(g) * u`` -> [M, N] rounded as pymllm's SiLU-and-mul kernel rounds it. ``_tiling``
    forces one of ``GATED_TILINGS`` (weight rows per warp + 10 * split-K; 0: the kernel's choice)."""
    op = "gemv_gated_silu"
    check_tensor(op, "x", x, ndim=2, dtypes=ACT_DTYPES, shape_hint="[M, K]")
    _check_common(op, x, w, bias, (x.dtype,), 8, x.dtype)
    if w.shape[0] % 2:
        raise ValueError(f"{op}: w must stack gate and up rows ([2N, K]), got {w.shape[0]} rows")
    _check_tiling(op, _tiling, GATED_TILINGS)
    _require_cuda(op, x)
    y = torch.empty((x.shape[0], w.shape[0] // 2), dtype=x.dtype, device=x.device)
    kernel[x.dtype](x, w, bias, y, int(_tiling), use_pdl(x.device))
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


# ---------------------------------------------------------------- fused prologues


def _check_rows_like_x(op: str, name: str, t: torch.Tensor, x: torch.Tensor) -> None:
    check_tensor(op, name, t, ndim=2, dtypes=(x.dtype,), shape_hint="[M, K], like x")
    if t.shape != x.shape:
        raise ValueError(f"{op}: {name} must have x's shape {tuple(x.shape)}, got {tuple(t.shape)}")
    if t.stride(1) != 1 or (t.stride(0) * t.element_size()) % 16 or t.data_ptr() % 16:
        raise ValueError(f"{op}: {name} needs unit inner stride, a row stride of a multiple of 16 bytes and a "
                         "16-byte aligned start")


def _check_prologue(op: str, prologue: str, x: torch.Tensor, w: torch.Tensor, residual: Optional[torch.Tensor],
                    norm_weight: Optional[torch.Tensor], eps: float) -> None:
    """The prologue's own inputs (x's shape against K is _check_common's)."""
    if prologue not in PROLOGUES:
        raise ValueError(f"{op}: prologue must be one of {sorted(PROLOGUES)}, got {prologue!r}")
    if w.shape[1] == 0:
        raise ValueError(f"{op}: K must be positive")
    tensors = {"x": x}
    if prologue == "rmsnorm":
        if norm_weight is None:
            raise ValueError(f"{op}: the rmsnorm prologue needs norm_weight")
        check_tensor(op, "norm_weight", norm_weight, ndim=1, dtypes=(x.dtype,), shape_hint="[K]")
        check_size(op, "norm_weight", norm_weight, 0, w.shape[1], "K of w")
        if not norm_weight.is_contiguous() or norm_weight.data_ptr() % 16:
            raise ValueError(f"{op}: norm_weight must be contiguous and 16-byte aligned")
        tensors["norm_weight"] = norm_weight
        if residual is not None:
            _check_rows_like_x(op, "residual", residual, x)
            tensors["residual"] = residual
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
            raise ValueError(f"{op}: eps must be a non-negative number, got {eps!r}")
    elif residual is not None or norm_weight is not None:
        raise ValueError(f"{op}: residual and norm_weight belong to the rmsnorm prologue, not {prologue!r}")
    check_same_device(op, tensors)


def _launch_prologue(kernel: JitKernel, prologue: str, x: torch.Tensor, residual: Optional[torch.Tensor],
                     norm_weight: Optional[torch.Tensor], eps: float, w: torch.Tensor, extra: tuple,
                     bias: Optional[torch.Tensor], tiling: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Allocates y (and residual_out) and runs ``kernel[x.dtype, prologue]``; extra sits between w and bias."""
    y = torch.empty((x.shape[0], w.shape[0]), dtype=x.dtype, device=x.device)
    residual_out = None if residual is None else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if w.shape[0] == 0:  # no blocks to write residual_out
        if residual_out is not None:
            residual_out.copy_((x.float() + residual.float()).to(x.dtype))
        return y, residual_out
    kernel[x.dtype, PROLOGUES[prologue]](x, residual, norm_weight, residual_out, float(eps), w, *extra, bias, y,
                                         int(tiling), use_pdl(x.device))
    return y, residual_out


@jit("gemv_prologue", entry="mllm_kernel::gemv_prologue", cuda_sources=["cuda/csrc/gemv/gemv_prologue.cuh"])
def _gemv_prologue(kernel: JitKernel, prologue: str, x: torch.Tensor, residual: Optional[torch.Tensor],
                   norm_weight: Optional[torch.Tensor], eps: float, w: torch.Tensor, bias: Optional[torch.Tensor],
                   tiling: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    op = f"{prologue}_gemv"
    check_tensor(op, "x", x, ndim=2, dtypes=ACT_DTYPES, shape_hint="[M, 2 * K]" if prologue == "silu_mul" else "[M, K]")
    _check_common(op, x, w, bias, (x.dtype,), 8, x.dtype, x_width=2 if prologue == "silu_mul" else 1)
    _check_prologue(op, prologue, x, w, residual, norm_weight, eps)
    _require_cuda(op, x)
    return _launch_prologue(kernel, prologue, x, residual, norm_weight, eps, w, (), bias, tiling)


def rmsnorm_gemv(x: torch.Tensor, residual: Optional[torch.Tensor], norm_weight: torch.Tensor, eps: float,
                 w: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                 _tiling: int = 0) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(RMSNorm(x [+ residual]) * norm_weight) @ w.T (+ bias)`` for x [M, K] fp16/bf16 (M <= 8).

    Returns ``(y [M, N], residual_out)``: residual_out is ``x + residual`` in x's dtype (a new
    tensor; x and residual are only read), or None without a residual. ``_tiling`` forces a
    compiled tiling (benchmarks only; see gemv_prologue.cuh).
    """
    return _gemv_prologue("rmsnorm", x, residual, norm_weight, eps, w, bias, _tiling)


def silu_mul_gemv(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                  _tiling: int = 0) -> torch.Tensor:
    """``(silu(x[:, :K]) * x[:, K:]) @ w.T (+ bias)`` for x [M, 2K] fp16/bf16 (M <= 8), w [N, K]."""
    return _gemv_prologue("silu_mul", x, None, None, 0.0, w, bias, _tiling)[0]


@jit("gemv_w8a8_dynamic", entry="mllm_kernel::gemv_w8a8_dynamic",
     cuda_sources=["cuda/csrc/gemv/gemv_prologue.cuh"])
def gemv_w8a8_dynamic(kernel: JitKernel, x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                      out_dtype: torch.dtype, bias: Optional[torch.Tensor] = None, *, prologue: str = "none",
                      residual: Optional[torch.Tensor] = None, norm_weight: Optional[torch.Tensor] = None,
                      eps: float = 1e-6, _tiling: int = 0):
    """W8A8 GEMV for 1..8 rows from fp16/bf16 activations: ``a`` = x ("none"), RMSNorm(x [+ residual])
    * norm_weight ("rmsnorm") or silu(gate) * up of x = [gate | up] ("silu_mul") is quantized per
    token in the kernel (per_token_quant_int8's numbers), then ``(a_q @ w.T) * a_scale * w_scale
    (+ bias)`` as gemv_w8a8 computes it. out_dtype must be x's dtype. Returns y, or
    ``(y, residual_out)`` for "rmsnorm" (residual_out as in rmsnorm_gemv).
    """
    op = "gemv_w8a8_dynamic"
    check_tensor(op, "x", x, ndim=2, dtypes=ACT_DTYPES, shape_hint="[M, 2 * K]" if prologue == "silu_mul" else "[M, K]")
    if out_dtype != x.dtype:
        raise TypeError(f"{op}: out_dtype must be x's dtype {x.dtype}, got {out_dtype}")
    _check_common(op, x, w, bias, (torch.int8,), 16, out_dtype, x_width=2 if prologue == "silu_mul" else 1)
    check_tensor(op, "w_scale", w_scale, ndim=1, dtypes=(torch.float32,), shape_hint="[N]")
    check_size(op, "w_scale", w_scale, 0, w.shape[0], "N of w")
    if w_scale.device != x.device or not w_scale.is_contiguous():
        raise ValueError(f"{op}: w_scale must be contiguous and on x's device")
    _check_prologue(op, prologue, x, w, residual, norm_weight, eps)
    _require_cuda(op, x)
    y, residual_out = _launch_prologue(kernel, prologue, x, residual, norm_weight, eps, w, (w_scale,), bias, _tiling)
    return (y, residual_out) if prologue == "rmsnorm" else y


def _rmsnorm_reference(x: torch.Tensor, residual: Optional[torch.Tensor], norm_weight: torch.Tensor,
                       eps: float) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(a, residual_out) rounded step by step as the kernels (and pymllm's Triton RMSNorm) round them."""
    h = x if residual is None else (x.float() + residual.float()).to(x.dtype)
    hf = h.float()
    var = hf.square().sum(dim=-1, keepdim=True) / hf.shape[-1]
    normed = (hf * torch.rsqrt(var + eps)).to(x.dtype)
    a = (norm_weight.float() * normed.float()).to(x.dtype)
    return a, (None if residual is None else h)


def silu_mul_reference(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of x = [gate | up] in PyTorch, rounded where pymllm's SiLU-and-mul kernel
    rounds (the activation, then the product); the reference of every fused SiLU-and-mul here."""
    gate, up = x.float().chunk(2, dim=-1)
    act = (gate / (1.0 + torch.exp(-gate))).to(x.dtype)
    return (act.float() * up).to(x.dtype)


def _per_token_quant_int8_reference(a: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [M, K], scale float32 [M, 1]): pymllm's per_token_quant_int8_reference, with
    scale = max(max|a|, 1e-10) / 127.5 and q = clamp(round_half_even(a / scale), -128, 127), every
    division a correctly rounded float32 one on any device.

    The divisor 127.5 is a tensor here: PyTorch's CUDA division by a Python number multiplies by
    its float32 reciprocal instead, which moves the scale by one ulp in about 40% of rows and
    then often turns the quantized negative maximum from -128 into -127 (on CPU both spellings
    divide).
    """
    a32 = a.float()
    absmax = a32.abs().amax(dim=-1, keepdim=True).clamp_min(_MIN_ABSMAX)
    scale = absmax / torch.full_like(absmax, _HALF_RANGE)
    return torch.round(a32 / scale).clamp_(-128, 127).to(torch.int8), scale


def rmsnorm_gemv_reference(x: torch.Tensor, residual: Optional[torch.Tensor], norm_weight: torch.Tensor,
                           eps: float, w: torch.Tensor,
                           bias: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    a, residual_out = _rmsnorm_reference(x, residual, norm_weight, eps)
    return gemv_reference(a, w, bias), residual_out


def silu_mul_gemv_reference(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    return gemv_reference(silu_mul_reference(x), w, bias)


def gemv_gated_silu_reference(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """gemv_reference (the gate/up output in x's dtype), then the SiLU-and-mul of its halves."""
    return silu_mul_reference(gemv_reference(x, w, bias))


def gemv_w8a8_dynamic_reference(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, out_dtype: torch.dtype,
                                bias: Optional[torch.Tensor] = None, *, prologue: str = "none",
                                residual: Optional[torch.Tensor] = None, norm_weight: Optional[torch.Tensor] = None,
                                eps: float = 1e-6):
    """The prologue, per_token_quant_int8 and gemv_w8a8_reference composed, as the kernel fuses them."""
    residual_out = None
    if prologue == "rmsnorm":
        a, residual_out = _rmsnorm_reference(x, residual, norm_weight, eps)
    elif prologue == "silu_mul":
        a = silu_mul_reference(x)
    elif prologue == "none":
        a = x
    else:
        raise ValueError(f"gemv_w8a8_dynamic_reference: unknown prologue {prologue!r}")
    y = gemv_w8a8_reference(*_per_token_quant_int8_reference(a), w, w_scale, out_dtype, bias)
    return (y, residual_out) if prologue == "rmsnorm" else y


BUILD_KINDS = ("dense", "dense_fused", "w8a8", "w8a8_fused")


def build_steps(kind: str, dtype: torch.dtype, device: torch.device) -> List[BuildStep]:
    """The instances that ``kind``'s calls compile for activations of ``dtype`` ("dense": gemv;
    "dense_fused": the RMSNorm and SiLU-and-mul prologue GEMVs and the gated one; "w8a8":
    gemv_w8a8; "w8a8_fused": gemv_w8a8_dynamic with each prologue), as build_in_parallel steps."""
    if kind == "dense":
        instances = [gemv.kernel[dtype]]
    elif kind == "dense_fused":
        instances = [_gemv_prologue.kernel[dtype, PROLOGUES[p]] for p in ("rmsnorm", "silu_mul")]
        instances.append(gemv_gated_silu.kernel[dtype])
    elif kind == "w8a8":
        instances = [gemv_w8a8.kernel[dtype]]
    elif kind == "w8a8_fused":
        instances = [gemv_w8a8_dynamic.kernel[dtype, p] for p in PROLOGUES.values()]
    else:
        raise ValueError(f"unknown GEMV build kind {kind!r}; expected one of {BUILD_KINDS}")
    return [instance.build_step(device) for instance in instances]
