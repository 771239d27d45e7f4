"""Dynamic per-token symmetric int8 quantization of activations (the "A8" of W8A8).

The convention is compressed-tensors' own, which defines what a W8A8 checkpoint means: for
each row x of [M, K], scale = max|x| / 127.5 and q = clamp(round(x / scale), -128, 127) with
ties to even, so x ~= q * scale. The Triton kernel and the PyTorch reference perform the same
float32 operations in the same order; they agree bit for bit wherever the GPU's division is
correctly rounded, and otherwise differ by one step in rare ties.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from pymllm.layers.kernels.pdl import launch_options
from pymllm.quantization.kernels.device import cuda_capability

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs (and Jetson images without Triton) use the reference
    triton = None

# Rows whose max |x| is below this quantize to zeros instead of dividing by zero. The Triton
# kernel spells these literals out: jitted code cannot read Python globals.
_MIN_ABSMAX = 1e-10
_HALF_RANGE = 127.5  # (q_max - q_min) / 2 for int8
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Rows up to this wide are quantized in one block held in registers (Qwen3-8B's 4096 and 12288 wide
# activations included); wider rows take two passes over blocks of 4096.
ONE_BLOCK_MAX = 16384


def per_token_quant_int8_reference(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """PyTorch version: (q int8 [M, K], scale float32 [M, 1]) for x [M, K].

    Both divisions are correctly rounded (IEEE), as in the Triton kernel and mllm_kernel's
    gemv_w8a8_dynamic, so all three agree bit for bit. (On CUDA, PyTorch turns a division by a
    Python scalar into a multiplication by its reciprocal, one ulp off in many rows: the divisor
    is therefore a tensor.)"""
    x32 = x.float()
    amax = x32.abs().amax(dim=-1, keepdim=True).clamp_min(_MIN_ABSMAX)
    scale = amax / torch.full_like(amax, _HALF_RANGE)
    rounded = torch.round(x32 / scale).clamp_(-128, 127)
    return rounded.to(torch.int8), scale


if triton is not None:
    from pymllm.layers.kernels.norm_act_triton import (
        enter_with_norm_weight, norm_num_warps, rms_norm_row, silu_and_mul_cols,
    )
    from pymllm.layers.kernels.pdl import enter_dependent
    from pymllm.quantization.kernels.triton_common import sm_count_of

    def row_quant_num_warps(block: int, fewest: int) -> int:
        """Warps of a program that quantizes one row held in a block of ``block`` columns (with an
        RMSNorm in front or not): the RMSNorm's rule (``norm_num_warps``: ~16 elements per thread) with
        at least ``fewest``, but 16 from 4096 columns on: at one row the program's time is its chain of
        loads, two block reductions and the correctly rounded divisions, which more threads shorten.
        H200, Qwen3-8B W8A8 bs1 in1024 decode graph (runs T92/T93, processes alternating): 16 warps
        for both 4096-wide kernels 2.632-2.643 ms against 2.663-2.676 with 8; 32 warps 2.646-2.647."""
        return 16 if block >= 4096 else max(fewest, norm_num_warps(block))

    @triton.jit
    def _quantize_block(x, scale):
        # div_rn: correctly rounded, as the reference (Triton's "/" is the approximate division).
        scaled = tl.math.div_rn(x, scale)
        # Adding and subtracting 1.5 * 2**23 rounds |v| < 2**22 to the nearest integer with
        # ties to even (the FPU's own rounding, as torch.round), without a libdevice call.
        rounded = (scaled + 12582912.0) - 12582912.0
        return tl.minimum(tl.maximum(rounded, -128.0), 127.0).to(tl.int8)

    @triton.jit
    def _quantize_row(x, q_row, scale_at, offs, mask):
        """Quantize a whole row held in registers (float32 x, masked columns 0): its scale to
        ``scale_at``, its int8 values to ``q_row + offs``."""
        scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(x), axis=0), 1e-10), 127.5)
        tl.store(scale_at, scale)
        tl.store(q_row + offs, _quantize_block(x, scale), mask=mask)

    @triton.jit
    def _per_token_quant_int8_kernel(x_ptr, q_ptr, scale_ptr, K, stride_xm, stride_qm, BLOCK: tl.constexpr,
                                     ONE_BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
        enter_dependent(USE_PDL)
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * stride_xm
        q_row = q_ptr + row * stride_qm
        if ONE_BLOCK:
            # The row fits in one block: it stays in registers between the max and the quantization
            # (one load: at batch 1 this kernel's time is its chain of memory round trips).
            offs = tl.arange(0, BLOCK)
            mask = offs < K
            x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
            _quantize_row(x, q_row, scale_ptr + row, offs, mask)
        else:
            running = tl.zeros([BLOCK], dtype=tl.float32)
            for k0 in range(0, K, BLOCK):
                offs = k0 + tl.arange(0, BLOCK)
                x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
                running = tl.maximum(running, tl.abs(x))
            scale = tl.math.div_rn(tl.maximum(tl.max(running, axis=0), 1e-10), 127.5)
            tl.store(scale_ptr + row, scale)
            # Second pass re-reads the row from L2.
            for k0 in range(0, K, BLOCK):
                offs = k0 + tl.arange(0, BLOCK)
                mask = offs < K
                x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
                tl.store(q_row + offs, _quantize_block(x, scale), mask=mask)

    @triton.jit
    def _rms_norm_quant_int8_kernel(x_ptr, res_ptr, w_ptr, q_ptr, scale_ptr, res_out_ptr,
                                    x_stride, res_stride, q_stride, res_out_stride, n_cols, eps,
                                    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
        w = enter_with_norm_weight(w_ptr, n_cols, BLOCK, USE_PDL)
        row = tl.program_id(0).to(tl.int64)
        cols, mask, y = rms_norm_row(x_ptr, res_ptr, w, res_out_ptr, row, x_stride, res_stride, res_out_stride,
                                     n_cols, eps, HAS_RESIDUAL, BLOCK)
        _quantize_row(y.to(tl.float32), q_ptr + row * q_stride, scale_ptr + row, cols, mask)

    @triton.jit
    def _silu_mul_quant_int8_kernel(x_ptr, q_ptr, scale_ptr, x_stride, q_stride, d, BLOCK: tl.constexpr,
                                    USE_PDL: tl.constexpr):
        enter_dependent(USE_PDL)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < d
        y = silu_and_mul_cols(x_ptr + row * x_stride, cols, mask, d)
        _quantize_row(y.to(tl.float32), q_ptr + row * q_stride, scale_ptr + row, cols, mask)


def per_token_quant_int8_triton(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Launch the Triton kernel (CUDA, or CPU tensors under TRITON_INTERPRET=1)."""
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m == 0:
        return q, scale
    one_block = k <= ONE_BLOCK_MAX
    block = triton.next_power_of_2(k) if one_block else 4096
    # (Past ONE_BLOCK_MAX the kernel loops over 4096-column blocks with 8 warps, as it always has.)
    num_warps = row_quant_num_warps(block, fewest=4) if one_block else 8
    _per_token_quant_int8_kernel[(m,)](x, q, scale, k, x.stride(0), q.stride(0), BLOCK=block, ONE_BLOCK=one_block,
                                       num_warps=num_warps, **launch_options(x.device, m))
    return q, scale


def triton_supported(x: torch.Tensor) -> bool:
    """The capability check of the dispatcher: Triton present, a CUDA tensor on SM80+, rows dense."""
    return (
        triton is not None
        and cuda_capability(x.device) >= (8, 0)
        and x.dtype in _SUPPORTED_DTYPES
        and x.dim() == 2
        and x.stride(-1) == 1
    )


def rms_norm_quant_int8_triton(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``per_token_quant_int8(rms_norm(x [+ residual]))`` and ``x [+ residual]`` from one kernel
    (CUDA, or CPU tensors under TRITON_INTERPRET=1): (q int8 [M, K], scale float32 [M, 1], residual).
    x, residual contiguous [M, K] with K <= ONE_BLOCK_MAX; the RMSNorm rounds as
    ``norm_act_triton.rms_norm`` does, so the result is that kernel's output quantized (bit for bit
    in the interpreter; compiled, the two kernels may round a rare element one unit apart, which
    moves it one quantization step: 2-4 of 8.4M elements on an H200)."""
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    residual_out = torch.empty_like(x) if residual is not None else x
    if m == 0:
        return q, scale, residual_out
    block = triton.next_power_of_2(k)
    has_res = residual is not None
    _rms_norm_quant_int8_kernel[(m,)](
        x, residual if has_res else x, weight, q, scale, residual_out if has_res else x,
        k, k, k, k, k, eps, HAS_RESIDUAL=has_res, BLOCK=block, num_warps=row_quant_num_warps(block, fewest=1),
        **launch_options(x.device, m),
    )
    return q, scale, residual_out


def rms_norm_quant_int8(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: Optional[torch.Tensor] = None,
) -> Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """rms_norm_quant_int8_triton where it can run (the checks of the RMSNorm and quantization
    kernels, a 2-D x of at most ONE_BLOCK_MAX columns), else None: the caller then runs the RMSNorm
    and the quantization as two launches. Why one: a W8A8 decode step otherwise launches a
    quantization kernel after each of its two RMSNorms per layer, a kernel boundary each."""
    from pymllm.layers.fused_ops import rms_norm_supported

    if triton is None or x.dim() != 2 or x.shape[-1] > ONE_BLOCK_MAX:
        return None
    if not (triton_supported(x) and rms_norm_supported(x, weight, residual)):
        return None
    return rms_norm_quant_int8_triton(x, weight, eps, residual)


def silu_mul_quant_int8_triton(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``per_token_quant_int8(silu_and_mul(x))`` from one kernel (CUDA, or CPU tensors under
    TRITON_INTERPRET=1): x contiguous [M, 2d] holding (gate, up) with d <= ONE_BLOCK_MAX ->
    (q int8 [M, d], scale float32 [M, 1]). One program holds a whole row, so the product is
    ``norm_act_triton.silu_and_mul``'s, rounded the same way, and its quantization the same."""
    m, d = x.shape[0], x.shape[1] // 2
    q = torch.empty((m, d), dtype=torch.int8, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m == 0:
        return q, scale
    block = triton.next_power_of_2(d)
    _silu_mul_quant_int8_kernel[(m,)](x, q, scale, x.stride(0), d, d, BLOCK=block, num_warps=norm_num_warps(block),
                                      **launch_options(x.device, m))
    return q, scale


def one_kernel_silu_quant_pays(rows: int, sm_count: int) -> bool:
    """Whether SiLU-and-mul should quantize its own output (one program per row) rather than run
    as two kernels (the product over many programs per row, then the quantization): only once the
    rows fill the GPU. Then it saves writing and re-reading the bf16 product (W8A8 prefill of 2048
    tokens, H200: 28.44 / 28.27 ms against 30.99 / 29.03 (T12b)); with fewer rows each SM's program
    does a whole row's SiLU too, and at one row that costs more than the kernel boundary it saves
    (Qwen3-8B W8A8 decode graph 2.715-2.727 ms against 2.655-2.662, T12a)."""
    return rows >= sm_count


def silu_mul_quant_int8(x: torch.Tensor) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """silu_mul_quant_int8_triton where it can run (CUDA SM80+, fp16/bf16, a contiguous 2-D x of
    even width at most 2 x ONE_BLOCK_MAX) and pays (``one_kernel_silu_quant_pays``), else None:
    the caller then runs SiLU-and-mul and the quantization as two launches."""
    from pymllm.layers.fused_ops import can_use_fast_path

    if triton is None or x.dim() != 2 or x.shape[-1] % 2 or not 0 < x.shape[-1] <= 2 * ONE_BLOCK_MAX:
        return None
    # First the row count: decode batches stop here, before the capability checks.
    if not one_kernel_silu_quant_pays(x.shape[0], sm_count_of(x.device)):
        return None
    if not (triton_supported(x) and can_use_fast_path(x) and x.is_contiguous()):
        return None
    return silu_mul_quant_int8_triton(x)


def prologue_quant_int8(
    x: torch.Tensor, prologue: str, residual: Optional[torch.Tensor] = None,
    norm_weight: Optional[torch.Tensor] = None, eps: float = 1e-6,
) -> Optional[Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]]:
    """The op in front of a W8A8 layer, quantizing its own output per token in one kernel:
    (q, scale, residual) for "rmsnorm" (``rms_norm_quant_int8``), (q, scale, None) for "silu_mul"
    (``silu_mul_quant_int8``), or None where that kernel does not run here (the caller then runs
    the op and the quantization as two launches). x is 2-D. The one place both the W8A8 scheme and
    the fused-GEMV decision (``fused_gemv.w8a8_fused_linear``'s separate path) take it from, so the
    decision times what the scheme runs."""
    if prologue == "rmsnorm":
        return rms_norm_quant_int8(x, norm_weight, eps, residual)
    if prologue == "silu_mul":
        quantized = silu_mul_quant_int8(x)
        return None if quantized is None else (*quantized, None)
    raise ValueError(f"prologue_quant_int8: unknown prologue {prologue!r}")


def per_token_quant_int8(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (fp16/bf16/fp32) -> (q int8 [M, K], scale float32 [M, 1]) with x ~= q * scale."""
    if x.dim() != 2:
        raise ValueError(f"per_token_quant_int8: x must be 2-D [M, K], got shape {tuple(x.shape)}")
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"per_token_quant_int8: x must be float16/bfloat16/float32, got {x.dtype}")
    if triton_supported(x):
        return per_token_quant_int8_triton(x)
    return per_token_quant_int8_reference(x)
