"""Decode attention that takes q/k before their norm and rope: the q/k-norm-rope and the KV store
run inside the attention kernel (``decode_attention(..., rope=DecodeRope(...))``).

Why: at batch 1 the separate q/k-norm-rope kernel (which also stores K/V) costs ~4-5 us per
layer on an H200 for a few kilobytes of work: it waits for the qkv GEMV, and the attention
waits for it (profile of the Qwen3-8B decode graph, run S1 in docs/perf). Inside the attention
kernel the same math adds no launch: each program normalises and rotates its GQA group's query
heads and the new token's key head in registers; the program whose slice holds the new token
stores its K/V in the pool, and the loop takes that token's K/V from registers (the store is not
ordered before the other programs' loads). The position's cos/sin row, the norm weights and the
new slot are step inputs, loaded before the PDL wait.

Numerics: the rounding of ``qk_norm_rope_triton`` (see ``norm_rope_rows``); the cache rows equal
what that kernel would store, up to its norm's sum order.

The rows of one launch must not read each other's new K/V (the stores are unordered with the
other programs' loads), so the FlashInfer backend fuses only in its one-row decode graph
(``flashinfer_backend.rope_in_attention_ok``); measured gain there: run S8/S3 in docs/perf.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from pymllm.layers.fused_ops import KVCacheWrite, qk_norm_rope_supported
from pymllm.layers.kernels.qk_norm_rope_triton import norm_rope_rows
from pymllm.layers.rotary_embedding import RotaryEmbedding


class DecodeRope(NamedTuple):
    """What the attention kernel needs to finish q and k itself. q (decode_attention's own
    argument) and ``k`` are the raw projections of the new tokens."""

    k: torch.Tensor  # [B, Hkv, D], before norm and rope (last dim dense)
    v: torch.Tensor  # [B, Hkv, D]
    positions: torch.Tensor  # [B] integer
    cos_cache: torch.Tensor  # float32 [max_position, D / 2]
    sin_cache: torch.Tensor
    q_weight: Optional[torch.Tensor]  # [D] per-head RMSNorm weights, or None for rope alone
    k_weight: Optional[torch.Tensor]
    eps: float
    out_cache_loc: torch.Tensor  # [B] int32 / int64: where the new K/V go in the pool


def decode_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    rotary_emb: RotaryEmbedding,
    q_norm,
    k_norm,
    kv_write: KVCacheWrite,
) -> Optional[DecodeRope]:
    """The DecodeRope of a layer's decode step, or None where the separate q/k-norm-rope kernel
    with its KV write could not run either (same capability checks: device, dtypes, layouts,
    plain rotary table, an activation-dtype pool)."""
    if not qk_norm_rope_supported(q, k, positions, rotary_emb, q_norm, k_norm, kv_write):
        return None
    return DecodeRope(
        k, v, positions, rotary_emb.cos_cached, rotary_emb.sin_cached,
        q_norm.weight if q_norm is not None else None, k_norm.weight if k_norm is not None else None,
        q_norm.variance_epsilon if q_norm is not None else 0.0, kv_write.out_cache_loc,
    )


def check_decode_rope(op: str, q: torch.Tensor, k_buf: torch.Tensor, rope: DecodeRope) -> None:
    """The layouts the kernel's rope path reads (q's own checks are check_attention_args')."""
    batch, _, head_dim = q.shape
    heads = k_buf.shape[1]
    for name, t in (("k", rope.k), ("v", rope.v)):
        if t.shape != (batch, heads, head_dim) or t.stride(2) != 1:
            raise ValueError(f"{op}: rope.{name} must be [{batch}, {heads}, {head_dim}] dense in its last dim")
        if t.dtype != k_buf.dtype:
            raise ValueError(f"{op}: rope.{name} must have the pool's dtype {k_buf.dtype}, got {t.dtype}")
    if q.dtype != k_buf.dtype:
        raise ValueError(f"{op}: q must have the pool's dtype {k_buf.dtype} to be stored with it, got {q.dtype}")
    half = head_dim // 2
    for name, t in (("cos_cache", rope.cos_cache), ("sin_cache", rope.sin_cache)):
        if t.dtype != torch.float32 or t.dim() != 2 or t.shape[1] != half or not t.is_contiguous():
            raise ValueError(f"{op}: rope.{name} must be contiguous float32 [positions, {half}]")
    if (rope.q_weight is None) != (rope.k_weight is None):
        raise ValueError(f"{op}: rope needs both norm weights or neither")
    for name, w in (("q_weight", rope.q_weight), ("k_weight", rope.k_weight)):
        if w is not None and (w.shape != (head_dim,) or not w.is_contiguous()):
            raise ValueError(f"{op}: rope.{name} must be contiguous [{head_dim}]")
    for name, t in (("positions", rope.positions), ("out_cache_loc", rope.out_cache_loc)):
        if t.shape != (batch,) or t.dtype not in (torch.int32, torch.int64) or not t.is_contiguous():
            raise ValueError(f"{op}: rope.{name} must be contiguous int32/int64 [{batch}]")


class RopeKernelArgs(NamedTuple):
    """The rope arguments of the attention kernel, grouped as its signature has them."""

    pointers: tuple  # k, v, q_weight, k_weight, cos, sin, positions, out_cache_loc
    strides: tuple  # k's and v's (batch, head) strides
    eps: float


def rope_kernel_args(rope: Optional[DecodeRope], placeholder: torch.Tensor) -> RopeKernelArgs:
    """The kernel's rope arguments; without rope every pointer is ``placeholder`` (never read)
    and the strides are 0."""
    if rope is None:
        return RopeKernelArgs((placeholder,) * 8, (0, 0, 0, 0), 0.0)
    q_w = rope.q_weight if rope.q_weight is not None else placeholder
    k_w = rope.k_weight if rope.k_weight is not None else placeholder
    return RopeKernelArgs(
        (rope.k, rope.v, q_w, k_w, rope.cos_cache, rope.sin_cache, rope.positions, rope.out_cache_loc),
        (rope.k.stride(0), rope.k.stride(1), rope.v.stride(0), rope.v.stride(1)),
        float(rope.eps),
    )


@triton.jit
def rope_operands(q_norm_ptr, k_norm_ptr, cos_ptr, sin_ptr, pos_ptr, loc_ptr, b, dims,
                  HEAD_DIM: tl.constexpr, APPLY_NORM: tl.constexpr, dtype: tl.constexpr):
    """Row b's step inputs for norm_rope_rows, which may be read before a PDL wait: each column's
    rotate-half partner, cos, signed sin, the q and k norm weights at each column and at its
    partner, and the slot of the new K/V. Without norm the weights are unused zeros."""
    half: tl.constexpr = HEAD_DIM // 2
    partner = (dims + half) % HEAD_DIM
    freq = dims % half
    pos = tl.load(pos_ptr + b, cache_modifier=".cg").to(tl.int64)
    cos = tl.load(cos_ptr + pos * half + freq).to(dtype).to(tl.float32)
    sin = tl.load(sin_ptr + pos * half + freq).to(dtype).to(tl.float32)
    sin = tl.where(dims < half, -sin, sin)
    if APPLY_NORM:
        q_w = tl.load(q_norm_ptr + dims).to(tl.float32)
        q_wp = tl.load(q_norm_ptr + partner).to(tl.float32)
        k_w = tl.load(k_norm_ptr + dims).to(tl.float32)
        k_wp = tl.load(k_norm_ptr + partner).to(tl.float32)
    else:
        q_w = tl.zeros([HEAD_DIM], tl.float32)
        q_wp = q_w
        k_w = q_w
        k_wp = q_w
    slot = tl.load(loc_ptr + b, cache_modifier=".cg").to(tl.int64)
    return partner, cos, sin, q_w, q_wp, k_w, k_wp, slot


@triton.jit
def rope_new_token(q_rows, q_row_ok, k_row, v_row, dims, partner, cos, sin, q_w, q_wp, k_w, k_wp, eps,
                   HEAD_DIM: tl.constexpr, APPLY_NORM: tl.constexpr, dtype: tl.constexpr):
    """(q [R, D], k [1, D], v [1, D]) of the new token, q and k normalised and rotated: q from
    the head pointers ``q_rows`` [R] (rows off ``q_row_ok`` are zeros), k and v from one head
    each; the other operands as rope_operands returns them. Reads activations: after the PDL wait."""
    q = norm_rope_rows(q_rows, q_row_ok, dims, partner, q_w, q_wp, cos, sin, eps, HEAD_DIM, APPLY_NORM, dtype)
    one = tl.zeros([1], tl.int64)
    k = norm_rope_rows(k_row + one, one == 0, dims, partner, k_w, k_wp, cos, sin, eps, HEAD_DIM, APPLY_NORM, dtype)
    v = tl.load(v_row + one[:, None] + dims[None, :])
    return q, k, v
