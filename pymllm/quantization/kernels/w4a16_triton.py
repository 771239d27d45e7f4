"""W4A16 kernels in Triton: fused dequant-GEMMs (small M: decode rows; large M: batches and
prefills) and a dequantizer for the largest M.

Runtime layout (made once by ``w4a16.repack_wna16``):
  qweight [K/8, N] int32: word (j, n) holds w[8j + i, n] + 8 in bits 4i..4i+3 (i = 0..7), so a
      [BLOCK_K/8, BLOCK_N] tile is a set of contiguous N runs and unpacks straight into the
      [BLOCK_K, BLOCK_N] operand of ``x @ W^T``;
  scales  [K/G, N] (activation dtype), zeros [K/G, N] (same dtype, asymmetric only):
      w[k, n] = (q - zero[k // G, n]) * scale[k // G, n], with G = K for channel-wise.

A nibble becomes a float exactly without a conversion instruction: OR-ing it into the mantissa
of 2^23 and subtracting 2^23 + 8 gives the signed value.
"""

from __future__ import annotations

from dataclasses import dataclass
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
def _nibbles(packed):
    """[R, C] int32 words -> [R, 8, C] float32 signed nibbles (nibble i of word r is row 8r + i)."""
    shifts = tl.arange(0, 8) * 4
    nibbles = (packed[:, None, :] >> shifts[None, :, None]) & 0xF
    return (nibbles | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0


@triton.jit
def _dot_tile(x, packed, s_ptr, z_ptr, k0, offs_n, n_mask, N,
              GROUP: tl.constexpr, HAS_ZP: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """x [BLOCK_M, BLOCK_K] (fp16/bf16) @ one dequantized weight tile, on tensor cores."""
    w = tl.reshape(_nibbles(packed), (BLOCK_K, BLOCK_N))
    if GROUP >= BLOCK_K:
        # One scale row for the tile: scale the [M, N] partial instead of every weight.
        meta = (k0 // GROUP) * N + offs_n
        part = tl.dot(x, w.to(x.dtype))
        if HAS_ZP:
            zero = tl.load(z_ptr + meta, mask=n_mask, other=0.0).to(tl.float32)
            part -= tl.sum(x.to(tl.float32), axis=1)[:, None] * zero[None, :]
        out = part * tl.load(s_ptr + meta, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    else:
        # An explicit else: Triton compiles code after a constexpr-if's return too, and
        # BLOCK_K // GROUP is 0 for channel-wise groups.
        NUM_GROUPS: tl.constexpr = BLOCK_K // GROUP
        meta = (k0 // GROUP + tl.arange(0, NUM_GROUPS)).to(tl.int64)[:, None] * N + offs_n[None, :]
        w3 = tl.reshape(w, (NUM_GROUPS, GROUP, BLOCK_N))
        if HAS_ZP:
            w3 = w3 - tl.load(z_ptr + meta, mask=n_mask[None, :], other=0.0).to(tl.float32)[:, None, :]
        w3 = w3 * tl.load(s_ptr + meta, mask=n_mask[None, :], other=0.0).to(tl.float32)[:, None, :]
        out = tl.dot(x, tl.reshape(w3, (BLOCK_K, BLOCK_N)).to(x.dtype))
    return out


@triton.jit
def _gemv_tile(x_ptr, packed, s_ptr, z_ptr, k0, offs_k8, offs_n, n_mask, N,
               GROUP: tl.constexpr, HAS_ZP: tl.constexpr, BLOCK_K: tl.constexpr):
    """One row of x (M == 1) against one weight tile, without reshaping the unpacked tile:
    x is read as [BLOCK_K/8, 8] to match the [words, nibble, N] unpacked weights."""
    x = tl.load(x_ptr + offs_k8[:, None] * 8 + tl.arange(0, 8)[None, :]).to(tl.float32)  # [BK/8, 8]
    per_word = tl.sum(_nibbles(packed) * x[:, :, None], axis=1)  # [BK/8, BN]: dot of each 8-run
    if GROUP >= BLOCK_K:
        meta = (k0 // GROUP) * N + offs_n
        part = tl.sum(per_word, axis=0)
        if HAS_ZP:
            part -= tl.sum(tl.sum(x, axis=1), axis=0) * tl.load(z_ptr + meta, mask=n_mask, other=0.0).to(tl.float32)
        out = part * tl.load(s_ptr + meta, mask=n_mask, other=0.0).to(tl.float32)
    else:
        # Several groups per tile: every 8-run lies in one group, so scale the per-word partials.
        meta = ((offs_k8 * 8) // GROUP).to(tl.int64)[:, None] * N + offs_n[None, :]
        if HAS_ZP:
            per_word -= tl.sum(x, axis=1)[:, None] * tl.load(z_ptr + meta, mask=n_mask[None, :], other=0.0).to(tl.float32)
        out = tl.sum(per_word * tl.load(s_ptr + meta, mask=n_mask[None, :], other=0.0).to(tl.float32), axis=0)
    return out


@triton.jit
def _w4a16_small_m_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, out_ptr,
    M, N, K, stride_xm,
    GROUP: tl.constexpr, HAS_ZP: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    USE_DOT: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    k_chunk = K // SPLIT_K  # a multiple of BLOCK_K (host-checked)
    k_lo = pid_k * k_chunk
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_lo, k_lo + k_chunk, BLOCK_K):
        offs_k8 = k0 // 8 + tl.arange(0, BLOCK_K // 8)
        packed = tl.load(w_ptr + offs_k8.to(tl.int64)[:, None] * N + offs_n[None, :], mask=n_mask[None, :], other=0)
        if USE_DOT:
            x = tl.load(x_rows + (k0 + tl.arange(0, BLOCK_K))[None, :], mask=m_mask[:, None], other=0.0)
            acc += _dot_tile(x, packed, s_ptr, z_ptr, k0, offs_n, n_mask, N, GROUP, HAS_ZP, BLOCK_K, BLOCK_N)
        else:
            acc += _gemv_tile(x_ptr, packed, s_ptr, z_ptr, k0, offs_k8, offs_n, n_mask, N, GROUP, HAS_ZP,
                              BLOCK_K)[None, :]
    store_tile(acc, out_ptr, bias_ptr, offs_m, offs_n, m_mask, n_mask, M, N, pid_k, HAS_BIAS, SPLIT_K)


@triton.jit
def _w4a16_dequant_kernel(
    w_ptr, s_ptr, z_ptr, out_ptr, N,
    GROUP: tl.constexpr, HAS_ZP: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out [K, N] = dequantized weight (transposed W), one [BLOCK_K, BLOCK_N] tile per program."""
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k8 = pid_k * (BLOCK_K // 8) + tl.arange(0, BLOCK_K // 8)
    cols = offs_n % N  # in range: the loads need no mask, the store has one
    packed = tl.load(w_ptr + offs_k8.to(tl.int64)[:, None] * N + cols[None, :])
    w = _dequantized_tile(packed, s_ptr, z_ptr, pid_k * BLOCK_K, cols, N, GROUP, HAS_ZP, BLOCK_K, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    out = out_ptr + offs_k.to(tl.int64)[:, None] * N + offs_n[None, :]
    tl.store(out, w.to(out_ptr.dtype.element_ty), mask=n_mask[None, :])


@triton.jit
def _dequantized_tile(packed, s_ptr, z_ptr, k0, cols, N,
                      GROUP: tl.constexpr, HAS_ZP: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """The weight tile W^T[k0:k0 + BLOCK_K, cols] in float32, (q - zero) * scale: the values the
    dequantizer writes, so the large-M GEMM multiplies exactly what dequantize + cuBLAS would.
    ``cols`` are in range (edge columns repeat a real one): unmasked loads, measurably faster in
    the GEMM's loop than masked ones (run T190)."""
    w = tl.reshape(_nibbles(packed), (BLOCK_K, BLOCK_N))
    if GROUP % BLOCK_K == 0:  # the tile lies inside one group: one scale row
        meta = (k0 // GROUP) * N + cols
        if HAS_ZP:
            w = w - tl.load(z_ptr + meta).to(tl.float32)[None, :]
        w = w * tl.load(s_ptr + meta).to(tl.float32)[None, :]
    else:
        meta = ((k0 + tl.arange(0, BLOCK_K)) // GROUP).to(tl.int64)[:, None] * N + cols[None, :]
        if HAS_ZP:
            w = w - tl.load(z_ptr + meta).to(tl.float32)
        w = w * tl.load(s_ptr + meta).to(tl.float32)
    return w


@triton.jit
def _w4a16_large_m_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, out_ptr,
    M, N, K, stride_xm,
    GROUP: tl.constexpr, HAS_ZP: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """out = x @ W^T for batches and prefills: each weight tile is dequantized in registers (scale
    applied to the weights, not to the partial, so the tensor-core accumulator stays in place
    across K) and multiplied by GROUP_M consecutive row tiles in a row, which then find it in L2."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    band = GROUP_M * tiles_n
    first_m = (pid // band) * GROUP_M
    band_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % band) % band_m
    pid_n = (pid % band) // band_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Rows and columns past the edge wrap onto real ones: no load in the loop is masked (T190: 13-25 %
    # faster than masked edge loads at 128 rows), and those lanes are never stored.
    rows = offs_m % M
    cols = offs_n % N
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    w_cols = w_ptr + cols[None, :]
    k_chunk = K // SPLIT_K  # a multiple of BLOCK_K (host-checked)
    k_lo = pid_k * k_chunk
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_lo, k_lo + k_chunk, BLOCK_K):
        x = tl.load(x_rows + (k0 + tl.arange(0, BLOCK_K))[None, :])
        packed = tl.load(w_cols + (k0 // 8 + tl.arange(0, BLOCK_K // 8)).to(tl.int64)[:, None] * N)
        w = _dequantized_tile(packed, s_ptr, z_ptr, k0, cols, N, GROUP, HAS_ZP, BLOCK_K, BLOCK_N)
        acc = tl.dot(x, w.to(x.dtype), acc)
    store_tile(acc, out_ptr, bias_ptr, offs_m, offs_n, offs_m < M, offs_n < N, M, N, pid_k, HAS_BIAS, SPLIT_K)


def default_config(m: int, n: int, k: int, group: int, device: torch.device) -> SmallMConfig:
    """Tiles for a small-M launch: wide K runs per program, K split until every SM has work."""
    if m == 1:
        block_m, block_n, block_k, use_dot, num_warps = 1, 64, 256, False, 4
    else:
        block_m = max(16, triton.next_power_of_2(m))
        block_n, block_k, use_dot, num_warps = 64, 128, True, 4
    while k % block_k or (group < block_k and block_k % group) or (group > block_k and group % block_k):
        block_k //= 2
    programs = triton.cdiv(n, block_n) * triton.cdiv(m, block_m)
    split_k = pick_split_k(programs, k // block_k, sm_count_of(device))
    return SmallMConfig(block_m, block_n, block_k, split_k, use_dot, num_warps, num_stages=3)


def supports(m: int, n: int, k: int, group: int) -> bool:
    """Shapes the fused kernel serves: small M, K a multiple of 64 and of the group size."""
    return 1 <= m <= MAX_M and k % 64 == 0 and k % group == 0 and n >= 1


def w4a16_gemm_small_m(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: Optional[torch.Tensor],
    group: int,
    bias: Optional[torch.Tensor] = None,
    config: Optional[SmallMConfig] = None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """x [M, K] fp16/bf16 (rows dense) @ W^T -> [M, N] in x.dtype, W given in the runtime layout;
    ``out`` (contiguous [M, N] of x.dtype) is written in place when given."""
    m, k = x.shape
    n = qweight.shape[1]
    cfg = config or default_config(m, n, k, group, x.device)
    if k % (cfg.block_k * cfg.split_k) or not (group % cfg.block_k == 0 or cfg.block_k % group == 0):
        raise ValueError(f"w4a16 kernel: K={k}, group={group} do not tile with BLOCK_K={cfg.block_k}, SPLIT_K={cfg.split_k}")
    if not cfg.use_dot and m != 1:
        raise ValueError("w4a16 kernel: the multiply-reduce loop serves M == 1 only")
    grid = (triton.cdiv(n, cfg.block_n), cfg.split_k, triton.cdiv(m, cfg.block_m))
    return _launch(_w4a16_small_m_kernel, grid, cfg, x, qweight, scales, zeros, group, bias, out, USE_DOT=cfg.use_dot)


def _launch(kernel, grid: tuple, cfg, x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
            zeros: Optional[torch.Tensor], group: int, bias: Optional[torch.Tensor], out: Optional[torch.Tensor],
            **constexprs) -> torch.Tensor:
    """Both fused GEMMs' launch: the output (or, split along K, float32 partials that
    ``splitk_reduce`` sums with the bias), the shared arguments, then the kernel's own ``constexprs``."""
    m, n = x.shape[0], qweight.shape[1]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device) if out is None else out
    if m == 0 or n == 0:  # nothing to compute (and the large-M kernel's edge wrap divides by M and N)
        return out
    target = out if cfg.split_k == 1 else torch.empty((cfg.split_k, m, n), dtype=torch.float32, device=x.device)
    kernel[grid](
        x, qweight, scales, zeros if zeros is not None else scales, bias if bias is not None else scales, target,
        m, n, x.shape[1], x.stride(0),
        GROUP=group, HAS_ZP=zeros is not None, HAS_BIAS=bias is not None,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **constexprs,
    )
    if cfg.split_k > 1:
        splitk_reduce(target, bias, out)
    return out


@dataclass(frozen=True)
class LargeMConfig:
    """Tiles of one large-M launch: GROUP_M row tiles reuse each weight tile from L2 in turn."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int
    group_m: int
    num_warps: int
    num_stages: int


def large_m_config(m: int, n: int, k: int, device: torch.device) -> LargeMConfig:
    """Tiles for a large-M launch, from the sweeps of runs T185 and T190 (H100, Qwen3-8B layers):
    up to 256 rows 128 x 128 tiles of 4 warps with K split (at most 4 ways) until every SM has
    one (down_proj at 128 rows: 72 us split 4 against 162 unsplit); past that the 8-warp
    256-row tiles that were fastest from 512 rows on."""
    block_n, block_k = 128, 64
    block_m, num_warps, num_stages = ((64 if m <= 64 else 128), 4, 4) if m <= 256 else (256, 8, 3)
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    split_k, sms = 1, sm_count_of(device)
    while tiles * split_k < sms and split_k < 4 and (k // block_k) % (split_k * 2) == 0:
        split_k *= 2
    return LargeMConfig(block_m, block_n, block_k, split_k, 8, num_warps, num_stages)


def w4a16_gemm_large_m(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: Optional[torch.Tensor],
    group: int,
    bias: Optional[torch.Tensor] = None,
    config: Optional[LargeMConfig] = None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """x [M, K] fp16/bf16 (rows dense) @ W^T -> [M, N] in x.dtype for any M, W in the runtime layout
    and dequantized tile by tile in registers; ``out`` (contiguous [M, N]) is written when given."""
    m, k = x.shape
    n = qweight.shape[1]
    cfg = config or large_m_config(m, n, k, x.device)
    if k % (cfg.block_k * cfg.split_k) or k % group:
        raise ValueError(f"w4a16 kernel: K={k}, group={group} do not tile with BLOCK_K={cfg.block_k}, SPLIT_K={cfg.split_k}")
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), cfg.split_k)
    return _launch(_w4a16_large_m_kernel, grid, cfg, x, qweight, scales, zeros, group, bias, out, GROUP_M=cfg.group_m)


def w4a16_dequantize(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor], group: int, dtype: torch.dtype
) -> torch.Tensor:
    """W^T as a dense [K, N] matrix of ``dtype`` (K a multiple of 64 and of ``group``)."""
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    out = torch.empty((k, n), dtype=dtype, device=qweight.device)
    block_k, block_n = 64, 128
    _w4a16_dequant_kernel[(k // block_k, triton.cdiv(n, block_n))](
        qweight, scales, zeros if zeros is not None else scales, out, n,
        GROUP=group, HAS_ZP=zeros is not None, BLOCK_K=block_k, BLOCK_N=block_n, num_warps=4,
    )
    return out
