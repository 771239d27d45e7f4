"""Small-M int8 GEMM with per-row / per-column scales (decode-time W8A8), in Triton.

out[m, n] = (sum_k a[m, k] * b[k, n]) * scale_a[m] * scale_b[n] (+ bias[n]), with the int8
products accumulated exactly in int32. b is the column-major [K, N] weight, i.e. the
checkpoint's row-major [N, K] int8 matrix, so each program streams contiguous K runs of
BLOCK_N weight rows. M == 1 uses a multiply-reduce loop; larger M pads to a tensor-core tile.
K may be split across programs (see triton_common).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from pymllm.quantization.kernels.triton_common import (
    SmallMConfig,
    pick_split_k,
    sm_count_of,
    splitk_reduce,
    store_tile,
)

MAX_M = 64


@triton.jit
def _w8a8_small_m_kernel(
    a_ptr, b_ptr, sa_ptr, sb_ptr, bias_ptr, out_ptr,
    M, N, K, stride_am, stride_bn,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, USE_DOT: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    # The host makes K a multiple of SPLIT_K * BLOCK_K, so no K masks are needed.
    k_chunk = K // SPLIT_K
    k_lo = pid_k * k_chunk
    a_rows = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am
    b_rows = b_ptr + offs_n.to(tl.int64) * stride_bn
    if USE_DOT:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
        for k0 in range(k_lo, k_lo + k_chunk, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(a_rows + offs_k[None, :], mask=m_mask[:, None], other=0)
            b = tl.load(b_rows[None, :] + offs_k[:, None], mask=n_mask[None, :], other=0)
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
    else:
        acc_n = tl.zeros([BLOCK_N], dtype=tl.int32)
        for k0 in range(k_lo, k_lo + k_chunk, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(a_ptr + offs_k).to(tl.int32)
            b = tl.load(b_rows[:, None] + offs_k[None, :], mask=n_mask[:, None], other=0).to(tl.int32)
            acc_n += tl.sum(b * a[None, :], axis=1)
        acc = acc_n[None, :]
    sa = tl.load(sa_ptr + offs_m, mask=m_mask, other=0.0)
    sb = tl.load(sb_ptr + offs_n, mask=n_mask, other=0.0)
    result = acc.to(tl.float32) * sa[:, None] * sb[None, :]
    store_tile(result, out_ptr, bias_ptr, offs_m, offs_n, m_mask, n_mask, M, N, pid_k, HAS_BIAS, SPLIT_K)


def default_config(m: int, n: int, k: int, device: torch.device) -> SmallMConfig:
    """Tiles for a small-M launch, sized so the weight stream keeps every SM busy."""
    if m == 1:
        block_m, block_n, block_k, use_dot, num_warps = 1, 32, 512, False, 4
    else:
        block_m = max(16, triton.next_power_of_2(m))
        block_n, block_k, use_dot, num_warps = 64, 128, True, 4
    while k % block_k:
        block_k //= 2
    programs = triton.cdiv(n, block_n) * triton.cdiv(m, block_m)
    split_k = pick_split_k(programs, k // block_k, sm_count_of(device))
    return SmallMConfig(block_m, block_n, block_k, split_k, use_dot, num_warps, num_stages=3)


def supports(m: int, n: int, k: int) -> bool:
    """Shapes this kernel serves: small M and K a multiple of 32 (the int8 MMA depth)."""
    return 1 <= m <= MAX_M and k % 32 == 0 and n >= 1


def int8_scaled_mm_small_m(
    a: torch.Tensor,
    b: torch.Tensor,
    scale_a: torch.Tensor,
    scale_b: torch.Tensor,
    out_dtype: torch.dtype,
    bias: Optional[torch.Tensor] = None,
    config: Optional[SmallMConfig] = None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """a int8 [M, K] row-major, b int8 [K, N] column-major, scale_a fp32 [M, 1], scale_b fp32 [N];
    ``out`` (contiguous [M, N] of ``out_dtype``) is written in place when given."""
    m, k = a.shape
    n = b.shape[1]
    cfg = config or default_config(m, n, k, a.device)
    if k % (cfg.block_k * cfg.split_k):
        raise ValueError(f"w8a8 small-M kernel: K={k} is not a multiple of BLOCK_K*SPLIT_K={cfg.block_k * cfg.split_k}")
    if not cfg.use_dot and m != 1:
        raise ValueError("w8a8 small-M kernel: the multiply-reduce loop serves M == 1 only")
    out = torch.empty((m, n), dtype=out_dtype, device=a.device) if out is None else out
    target = out if cfg.split_k == 1 else torch.empty((cfg.split_k, m, n), dtype=torch.float32, device=a.device)
    grid = (triton.cdiv(n, cfg.block_n), cfg.split_k, triton.cdiv(m, cfg.block_m))
    _w8a8_small_m_kernel[grid](
        a, b, scale_a, scale_b, bias if bias is not None else scale_b, target,
        m, n, k, a.stride(0), b.stride(1),
        HAS_BIAS=bias is not None, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        SPLIT_K=cfg.split_k, USE_DOT=cfg.use_dot, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if cfg.split_k > 1:
        splitk_reduce(target, bias, out)
    return out
